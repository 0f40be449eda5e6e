"""Parity of an exported model with the real `transformers`: logits, greedy decoding, tokenizer ids,
decoding and the chat template. One export per model, loaded once per module (transformers' import is slow)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from interop_models import CHAT, random_model, save_model, trained_model

transformers = pytest.importorskip("transformers", reason="parity tests need transformers (pip install -e '.[hf]')")
pytest.importorskip("safetensors", reason="the Hugging Face export needs safetensors (pip install -e '.[hf]')")

from minigpt.generate import GenerationConfig, TextGenerator  # noqa: E402
from minigpt.interop.hf_llama import export_hf  # noqa: E402

pytestmark = pytest.mark.integration

MIXED_TEXTS = [
    "First Citizen: Before we proceed any further, hear me speak.",
    "学而时习之，不亦说乎？ 有朋自远方来 — mixed with English, 数字 12345 and 3.14159.",
    "emoji 🦙🚀 and rare characters: Ωμέγα, Ж, ﬁ, é (e + combining acute), 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "  leading spaces, trailing spaces   \n\n\ttabs\tand\r\nnewlines\n",
    " ", "\n", "", "x",
]


def load_hf(path: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def random_pair(tmp_path_factory, data_tokenizer):
    """(our model, transformers' model) for random untied weights, exported in fp32."""
    ours = random_model(data_tokenizer.vocab_size, seed=3, tie_embeddings=False, max_seq_len=128)
    out = export_hf(save_model(tmp_path_factory.mktemp("random") / "final", ours, data_tokenizer),
                    tmp_path_factory.mktemp("hf") / "random")
    return ours, load_hf(out)[0]


@pytest.fixture(scope="module")
def trained_export(tmp_path_factory, data_tokenizer):
    """(our generator, transformers' model, transformers' tokenizer) for briefly trained tied weights."""
    ours = trained_model(data_tokenizer, steps=30, max_seq_len=128)
    out = export_hf(save_model(tmp_path_factory.mktemp("trained") / "final", ours, data_tokenizer),
                    tmp_path_factory.mktemp("hf") / "trained")
    hf_model, hf_tokenizer = load_hf(out)
    return TextGenerator(ours, data_tokenizer), hf_model, hf_tokenizer


@pytest.fixture(scope="module", params=[(2, 2), (3, 0)], ids=["top2-2shared", "top3-noshared"])
def moe_pair(request, tmp_path_factory, data_tokenizer):
    """(our mixture-of-experts model, transformers' GraniteMoeShared) for random weights, exported in fp32:
    top-2 with two shared experts (stacked into one shared MLP), and top-3 without shared experts."""
    k, shared = request.param
    ours = random_model(data_tokenizer.vocab_size, seed=5, tie_embeddings=False, max_seq_len=128, num_experts=4,
                        experts_per_token=k, num_shared_experts=shared, ffn_hidden_size=32)
    out = export_hf(save_model(tmp_path_factory.mktemp("moe") / "final", ours, data_tokenizer),
                    tmp_path_factory.mktemp("hf") / "moe")
    hf_model = load_hf(out)[0]
    assert type(hf_model).__name__ == "GraniteMoeSharedForCausalLM"
    return ours, hf_model


def padded_batch(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids (pad 0) and the attention mask, as both generators batch prompts."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def max_logit_difference(ours, hf_model, rows: list[list[int]]) -> float:
    ids, mask = padded_batch(rows)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, position_ids=positions)
        b = hf_model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    return (a - b)[mask.bool()].abs().max().item()


def test_fp32_logits_of_random_weights_equal_ours_on_a_padded_batch(random_pair):
    ours, hf_model = random_pair
    torch.manual_seed(0)
    rows = [torch.randint(6, ours.config.vocab_size, (n,)).tolist() for n in (40, 17, 3)]
    assert max_logit_difference(ours, hf_model, rows) <= 1e-4


def test_fp32_logits_of_a_random_moe_model_equal_ours_on_a_padded_batch(moe_pair):
    ours, hf_model = moe_pair
    torch.manual_seed(0)
    rows = [torch.randint(6, ours.config.vocab_size, (n,)).tolist() for n in (40, 17, 3)]
    assert max_logit_difference(ours, hf_model, rows) <= 1e-4


def test_fp32_logits_of_trained_weights_equal_ours_on_a_padded_batch(trained_export, data_tokenizer):
    generator, hf_model, _ = trained_export
    rows = [data_tokenizer.encode(text) or [data_tokenizer.eos_id] for text in MIXED_TEXTS[:4]]
    rows.append(data_tokenizer.encode_chat(CHAT, add_generation_prompt=True).ids)
    assert max_logit_difference(generator.model, hf_model, rows) <= 1e-4


def hf_greedy(hf_model, prompts: list[list[int]], stop_ids: list[int] | None) -> list[list[int]]:
    """transformers' greedy `generate()` on a left-padded batch, each row cut after its first stop id."""
    ids, mask = padded_batch(prompts)
    saved = hf_model.generation_config.eos_token_id
    hf_model.generation_config.eos_token_id = stop_ids  # None: generate all 64 (the export says [eos, im_end])
    try:
        with torch.no_grad():
            out = hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=64, do_sample=False,
                                    pad_token_id=0)
    finally:
        hf_model.generation_config.eos_token_id = saved
    rows = []
    for row in out[:, ids.shape[1]:].tolist():
        stop = next((i for i, token in enumerate(row) if stop_ids and token in stop_ids), None)
        rows.append(row if stop is None else row[:stop + 1])
    return rows


def test_greedy_generate_gives_the_same_64_tokens_as_our_generator(random_pair, data_tokenizer):
    ours, hf_model = random_pair
    prompts = [data_tokenizer.encode("First Citizen:"), data_tokenizer.encode("学而")]
    expected = TextGenerator(ours, data_tokenizer).generate_ids(
        prompts, GenerationConfig(max_new_tokens=64, do_sample=False, stop_token_ids=(),
                                  whole_characters=False))
    assert [len(row) for row in expected] == [64, 64]
    assert hf_greedy(hf_model, prompts, None) == expected


def test_greedy_generate_of_a_moe_model_gives_the_same_64_tokens_as_our_generator(moe_pair, data_tokenizer):
    ours, hf_model = moe_pair
    prompts = [data_tokenizer.encode("First Citizen:"), data_tokenizer.encode("学而")]
    expected = TextGenerator(ours, data_tokenizer).generate_ids(
        prompts, GenerationConfig(max_new_tokens=64, do_sample=False, stop_token_ids=(),
                                  whole_characters=False))
    assert [len(row) for row in expected] == [64, 64]
    assert hf_greedy(hf_model, prompts, None) == expected


def test_greedy_generate_of_trained_weights_stops_where_ours_does(trained_export, data_tokenizer):
    generator, hf_model, _ = trained_export
    prompts = [data_tokenizer.encode("First Citizen:"),
               data_tokenizer.encode_chat(CHAT[:2], add_generation_prompt=True).ids]
    expected = generator.generate_ids(prompts, GenerationConfig(max_new_tokens=64, do_sample=False,
                                                                whole_characters=False))
    assert expected[1][-1] == data_tokenizer.im_end_id  # the answer ends its turn
    assert hf_greedy(hf_model, prompts, hf_model.generation_config.eos_token_id) == expected


def test_tokenizer_ids_equal_ours_and_decoding_round_trips(trained_export, data_tokenizer):
    _, _, hf_tokenizer = trained_export
    for text in MIXED_TEXTS:
        ids = hf_tokenizer(text)["input_ids"]
        assert ids == data_tokenizer.encode(text), text
        assert hf_tokenizer.decode(ids) == text == data_tokenizer.decode(ids)
    byte_pieces = [i for t in MIXED_TEXTS for i in data_tokenizer.encode(t) if data_tokenizer.sp.is_byte(i)]
    assert byte_pieces, "the sample must exercise byte fallback"


def test_apply_chat_template_equals_our_chat_encoding(trained_export, data_tokenizer):
    _, _, hf_tokenizer = trained_export
    conversations = [CHAT, CHAT[1:2], [{"role": "user", "content": "学而时习之 🦙\n  two lines "}]]
    for messages in conversations:
        for prompt in (True, False):
            theirs = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=True)
            theirs = theirs["input_ids"] if hasattr(theirs, "keys") else theirs
            assert list(theirs) == data_tokenizer.encode_chat(messages, add_generation_prompt=prompt).ids
    assert hf_tokenizer.convert_ids_to_tokens([data_tokenizer.im_start_id, data_tokenizer.im_end_id]) == [
        "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def resaved(tmp_path_factory, data_tokenizer):
    """An exported model that transformers loaded and saved again: tokenizer.json, no tokenizer.model."""
    ours = random_model(data_tokenizer.vocab_size, seed=3, tie_embeddings=False, max_seq_len=128)
    out = export_hf(save_model(tmp_path_factory.mktemp("resave") / "final", ours, data_tokenizer),
                    tmp_path_factory.mktemp("hf") / "exported")
    model, tokenizer = load_hf(out)
    again = tmp_path_factory.mktemp("hf") / "resaved"
    model.save_pretrained(again)
    tokenizer.save_pretrained(again)
    return ours, again


def test_a_directory_resaved_by_transformers_imports_from_its_tokenizer_json(resaved, data_tokenizer, tmp_path):
    from minigpt.interop.hf_llama import import_hf_llama
    from minigpt.tokenizer import Tokenizer
    from minigpt.weights import load_consolidated

    ours, again = resaved
    assert not (again / "tokenizer.model").exists() and (again / "tokenizer.json").is_file()
    imported = import_hf_llama(again, tmp_path / "imported")
    tokenizer = Tokenizer(imported)
    for text in MIXED_TEXTS + ["床前明月光，疑是地上霜。", "▁typed meta symbol ▁▁"]:
        assert tokenizer.encode(text) == data_tokenizer.encode(text), text
        assert tokenizer.decode(tokenizer.encode(text)) == text
    messages = [{"role": "user", "content": "计算 27+45"}]
    assert tokenizer.encode_chat(messages, add_generation_prompt=True).ids == \
        data_tokenizer.encode_chat(messages, add_generation_prompt=True).ids
    model = load_consolidated(imported)[0]
    for name, tensor in ours.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


@pytest.mark.parametrize("change,named", [
    (lambda spec: spec["pre_tokenizer"].update(prepend_scheme="first"), "pre_tokenizer"),
    (lambda spec: spec["model"].update(byte_fallback=False), "model.byte_fallback"),
    (lambda spec: spec["model"]["merges"].reverse(), "merges out of vocabulary order"),
    (lambda spec: spec["model"].update(type="Unigram"), "model.type"),
])
def test_a_tokenizer_json_that_would_encode_differently_is_refused_by_field(resaved, tmp_path, change, named):
    import json
    import shutil

    from minigpt.interop.hf_llama import InteropError, load_hf_llama

    _, again = resaved
    damaged = tmp_path / "damaged"
    shutil.copytree(again, damaged)
    spec = json.loads((damaged / "tokenizer.json").read_text())
    change(spec)
    (damaged / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(InteropError, match=named):
        load_hf_llama(damaged)
