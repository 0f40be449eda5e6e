"""The standalone generator: KV cache parity, left-padded batches, logit filters, stops, streaming, CLI."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from model_factory import seeded_model, small_test_config
from spm_fixture import build_tokenizer

from minigpt.config import ConfigError, MiniGPTConfig
from minigpt.generate import (
    GenerationConfig,
    TextGenerator,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    filter_logits,
)
from minigpt.model import KVCache, MiniGPT
from minigpt.tokenizer import Tokenizer
from minigpt.weights import save_consolidated

REPO = Path(__file__).resolve().parents[1]
GREEDY = GenerationConfig(max_new_tokens=12, do_sample=False)
TRAIN_TEXTS = ["First Citizen: Before we proceed any further, hear me speak.",
               "学而时习之，不亦说乎？"]
CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there, how are you?"}]


def small_config(**overrides) -> MiniGPTConfig:
    return small_test_config(**{"vocab_size": 384, **overrides})


def random_model(seed: int = 0, **overrides) -> MiniGPT:
    """Random weights with a wide init, so greedy outputs vary instead of repeating one token."""
    model = seeded_model(small_config(tie_embeddings=False, **overrides), seed)
    for name, param in model.named_parameters():
        if "norm" not in name:
            torch.nn.init.normal_(param, std=0.15)
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return Tokenizer(build_tokenizer(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="session")
def trained(tokenizer) -> TextGenerator:
    """A tiny model overfitted on two sentences and one conversation, so generations are real text."""
    torch.manual_seed(0)
    model = MiniGPT(small_config())
    # Documents as MiniGPT's data builder writes them: text then EOS; conversations as rendered.
    docs = [tokenizer.encode(t, eos=True) for t in TRAIN_TEXTS]
    docs.append(tokenizer.encode_chat(CHAT).ids)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        for doc in docs:
            ids = torch.tensor([doc])
            loss = F.cross_entropy(model(ids)[0, :-1], ids[0, 1:])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return TextGenerator(model.eval(), tokenizer)


# --- KV cache and batching -------------------------------------------------------------------------

def test_incremental_decoding_with_kv_cache_matches_full_forward():
    model = random_model()
    ids = torch.randint(0, 384, (2, 20))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config, batch_size=2, max_len=20)
        steps = [model(ids[:, :8], cache=cache)]
        steps += [model(ids[:, i:i + 1], cache=cache) for i in range(8, 20)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)


def test_batched_greedy_with_left_padding_equals_each_prompt_alone():
    generator = TextGenerator(random_model(), tokenizer=None)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15], [20]]
    config = GenerationConfig(max_new_tokens=16, do_sample=False)
    batched, batched_logprobs = generator.generate_ids(prompts, config, return_logprobs=True)
    for prompt, ids, logprobs in zip(prompts, batched, batched_logprobs, strict=True):
        alone, alone_logprobs = generator.generate_ids([prompt], config, return_logprobs=True)
        assert ids == alone[0]
        assert logprobs == pytest.approx(alone_logprobs[0], abs=1e-4)
    assert len({tuple(ids) for ids in batched}) == 3 and len(set(batched[1])) > 1


def test_generation_without_cache_gives_the_same_tokens():
    generator = TextGenerator(random_model(seed=1), tokenizer=None)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    config = GenerationConfig(max_new_tokens=10, do_sample=False)
    assert generator.generate_ids(prompts, config) == generator.generate_ids(prompts, config, use_cache=False)


def test_returned_logprobs_are_the_models_token_logprobs():
    model = random_model(seed=2)
    generator = TextGenerator(model, tokenizer=None)
    prompt = [4, 9, 16, 25]
    config = GenerationConfig(max_new_tokens=10, temperature=0.7, top_k=20, seed=3)
    (ids,), (logprobs,) = generator.generate_ids([prompt], config, return_logprobs=True)
    with torch.no_grad():
        expected = model.token_logprobs(torch.tensor([prompt + ids]))[0, len(prompt) - 1:]
    assert logprobs == pytest.approx(expected.tolist(), abs=1e-4)


def test_sampling_is_reproducible_with_a_seed_and_top_k_1_is_greedy():
    generator = TextGenerator(random_model(seed=4), tokenizer=None)
    prompts = [[1, 2, 3], [7, 8]]
    sampled = GenerationConfig(max_new_tokens=12, seed=7)
    assert generator.generate_ids(prompts, sampled) == generator.generate_ids(prompts, sampled)
    other = generator.generate_ids(prompts, GenerationConfig(max_new_tokens=12, seed=8))
    assert other != generator.generate_ids(prompts, sampled)
    top1 = GenerationConfig(max_new_tokens=12, top_k=1, seed=9)
    assert generator.generate_ids(prompts, top1) == generator.generate_ids(
        prompts, GenerationConfig(max_new_tokens=12, do_sample=False))


def test_each_sequence_stops_at_its_own_stop_token():
    generator = TextGenerator(random_model(seed=5), tokenizer=None)
    prompts = [[5, 6, 7], [30, 31]]
    free = generator.generate_ids(prompts, GenerationConfig(max_new_tokens=12, do_sample=False))
    stop_id = free[0][3]
    sequences = generator.generate_sequences(
        prompts, GenerationConfig(max_new_tokens=12, do_sample=False, stop_token_ids=(stop_id,)))
    for sequence, unstopped in zip(sequences, free, strict=True):
        if stop_id in unstopped:
            assert sequence.token_ids == unstopped[:unstopped.index(stop_id) + 1]
            assert sequence.finish_reason == "stop"
        else:
            assert sequence.token_ids == unstopped and sequence.finish_reason == "length"
    assert sequences[0].token_ids[-1] == stop_id and len(sequences[0].token_ids) <= 4


def test_output_is_clipped_to_max_seq_len_and_an_overlong_prompt_is_refused():
    generator = TextGenerator(random_model(), tokenizer=None)
    (sequence,) = generator.generate_sequences([[5] * 60], GenerationConfig(max_new_tokens=20, do_sample=False,
                                                                            stop_token_ids=()))
    assert len(sequence.token_ids) == 4 and sequence.finish_reason == "length"
    with pytest.raises(ValueError, match="prompt 1 has 64 tokens.*max_seq_len is 64"):
        generator.generate_ids([[5], [5] * 64], GREEDY)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        generator.generate_ids([[]], GREEDY)
    with pytest.raises(ValueError, match=r"token id\(s\) \[999\] outside the vocabulary"):
        generator.generate_ids([[999]], GREEDY)


# --- Logit filters ---------------------------------------------------------------------------------

def test_temperature_scales_logits_and_sharpens_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    assert torch.equal(apply_temperature(logits, 0.5), torch.tensor([[4.0, 2.0, 0.0]]))
    assert apply_temperature(logits, 0.5).softmax(-1)[0, 0] > logits.softmax(-1)[0, 0]
    assert apply_temperature(logits, 2.0).softmax(-1)[0, 0] < logits.softmax(-1)[0, 0]


def test_top_k_keeps_the_k_largest_logits_per_row():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0], [0.0, -1.0, 2.0, 1.0]])
    out = apply_top_k(logits, 2)
    inf = float("-inf")
    assert torch.equal(out, torch.tensor([[inf, 5.0, inf, 4.0], [inf, inf, 2.0, 1.0]]))
    assert torch.equal(apply_top_k(logits, 0), logits)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    kept = apply_top_p(logits, 0.75).isfinite()
    assert kept.tolist() == [[False, True, False, True]]  # 0.5 + 0.3 reaches 0.75
    assert apply_top_p(logits, 0.3).isfinite().tolist() == [[False, True, False, False]]
    assert apply_top_p(logits, 1.0).isfinite().all()
    renormalised = apply_top_p(logits, 0.75).softmax(-1)
    assert renormalised[0, 1].item() == pytest.approx(0.5 / 0.8)


def test_repetition_penalty_makes_seen_tokens_less_likely_whatever_their_sign():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert torch.equal(out, torch.tensor([[1.0, -4.0, 1.0, -1.0]]))
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.0), logits)


def test_filter_logits_applies_penalty_even_when_greedy_but_no_sampling_filters():
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    seen = torch.tensor([[True, False, False]])
    greedy = GenerationConfig(do_sample=False, repetition_penalty=1.5, top_k=1)
    assert filter_logits(logits, seen, greedy).argmax().item() == 1
    assert filter_logits(logits, None, greedy).isfinite().all()


@pytest.mark.parametrize("field, value, message", [
    ("max_new_tokens", 0, "max_new_tokens must be a positive integer"),
    ("temperature", -1.0, "temperature must be >= 0"),
    ("top_k", -2, "top_k must be an integer >= 0"),
    ("top_p", 0.0, r"top_p must be in \(0, 1\]"),
    ("repetition_penalty", 0.0, "repetition_penalty must be > 0"),
    ("stop_strings", ("",), "stop_strings must be non-empty strings"),
])
def test_generation_config_rejects_out_of_range_fields(field, value, message):
    with pytest.raises(ConfigError, match=f"GenerationConfig.{message}"):
        GenerationConfig(**{field: value})


# --- Text, stop strings, streaming, chat ---------------------------------------------------------

def test_greedy_text_continues_the_prompt_with_its_leading_space(trained):
    (text,) = trained.generate(["First Citizen:"], GenerationConfig(max_new_tokens=40, do_sample=False))
    assert text == " Before we proceed any further, hear me speak."


def test_stop_string_ends_generation_and_is_cut_from_the_text(trained):
    config = GenerationConfig(max_new_tokens=30, do_sample=False, stop_strings=("proceed",))
    (text,) = trained.generate(["First Citizen:"], config)
    assert text == " Before we "
    prompt_ids = [trained.encode_prompt("First Citizen:")]
    (sequence,) = trained.generate_sequences(prompt_ids, config)
    (unstopped,) = trained.generate_sequences(prompt_ids, dataclasses.replace(config, stop_strings=()))
    assert sequence.finish_reason == "stop"
    assert sequence.token_ids == unstopped.token_ids[:len(sequence.token_ids)]
    assert len(sequence.token_ids) < len(unstopped.token_ids) - 5


def test_stream_yields_the_same_text_as_generate_with_whole_chinese_characters(trained):
    config = GenerationConfig(max_new_tokens=20, do_sample=False)
    pieces = list(trained.stream("学而", config))
    (text,) = trained.generate(["学而"], config)
    assert "".join(pieces) == text and text.startswith("时习之")
    assert len(pieces) > 1 and all("\ufffd" not in piece for piece in pieces)


def test_stream_batch_gives_each_prompt_its_own_text_and_finish_reason(trained):
    config = GenerationConfig(max_new_tokens=20, do_sample=False)
    prompts = [trained.encode_prompt(p) for p in ("学而", "First Citizen:")]
    texts, reasons, counts = ["", ""], [None, None], [0, 0]
    for step in trained.stream_batch(prompts, config):
        for delta in step:
            assert reasons[delta.index] is None, "no delta after a prompt's last one"
            texts[delta.index] += delta.text
            reasons[delta.index], counts[delta.index] = delta.finish_reason, delta.completion_tokens
    assert texts == trained.generate(["学而", "First Citizen:"], config)
    sequences = trained.generate_sequences(prompts, config)
    assert reasons == [s.finish_reason for s in sequences] and counts == [len(s.token_ids) for s in sequences]


def test_stream_holds_back_a_stop_string(trained):
    config = GenerationConfig(max_new_tokens=30, do_sample=False, stop_strings=("hear me",))
    pieces = list(trained.stream("First Citizen:", config))
    assert "".join(pieces) == " Before we proceed any further, "


def test_chat_prompt_uses_the_template_and_stops_at_end_of_turn(trained, tokenizer):
    ids = trained.encode_prompt("Hi", chat=True)
    chat_ids = tokenizer.encode_chat([{"role": "user", "content": "Hi"}], add_generation_prompt=True).ids
    assert ids == chat_ids
    config = GenerationConfig(max_new_tokens=30, do_sample=False)
    assert trained.generate(["Hi"], config, chat=True) == ["Hello there, how are you?"]
    (sequence,) = trained.generate_sequences([ids], config)
    assert sequence.token_ids[-1] == tokenizer.im_end_id and sequence.finish_reason == "stop"


# --- Command line ----------------------------------------------------------------------------------

def test_cli_generates_from_a_consolidated_dir_without_importing_deepspeed(trained, tmp_path):
    model_dir = save_consolidated(tmp_path / "model", trained.model.state_dict(), trained.model.config,
                                  trained.tokenizer.directory)
    argv = ["launch/generate.py", "--model", str(model_dir), "--prompt", "First Citizen:", "--prompt", "Hi",
            "--greedy", "--max-new-tokens", "30"]
    script = ("import runpy, sys\n"
              f"sys.argv = {argv!r}\n"
              "try:\n    runpy.run_path('launch/generate.py', run_name='__main__')\n"
              "except SystemExit as exit:\n    assert not exit.code, exit.code\n"
              "print('deepspeed imported:', 'deepspeed' in sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "First Citizen: Before we proceed" in result.stdout
    assert "deepspeed imported: False" in result.stdout


def test_cli_names_the_missing_file(tmp_path, capsys):
    from minigpt.cli.generate import main

    (tmp_path / "model").mkdir()
    assert main(["--model", str(tmp_path / "model"), "--prompt", "x"]) == 2
    assert "config.json: missing" in capsys.readouterr().err


@pytest.mark.parametrize("device, message", [
    ("cuda:7", "--device cuda:7: "), ("mps", "--device mps: Apple MPS is not available"),
    ("gpu", "--device 'gpu' is not a device name"),
])
def test_cli_refuses_a_device_this_machine_lacks_in_one_line(trained, tmp_path, capsys, device, message):
    from minigpt.cli.generate import main

    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a CUDA device 7")
    model_dir = save_consolidated(tmp_path / "model", trained.model.state_dict(), trained.model.config,
                                  trained.tokenizer.directory)
    assert main(["--model", str(model_dir), "--prompt", "x", "--device", device]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err


def test_generation_runs_in_eval_mode_and_restores_the_training_mode():
    model = random_model(dropout=0.5).train()
    generator = TextGenerator(model, tokenizer=None)
    config = GenerationConfig(max_new_tokens=8, do_sample=False)
    first = generator.generate_ids([[5, 6, 7]], config)
    assert model.training
    assert generator.generate_ids([[5, 6, 7]], config) == first  # dropout was off while decoding
