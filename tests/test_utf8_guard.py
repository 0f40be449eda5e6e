"""Generation never shows a broken character: byte-fallback pieces only ever form valid UTF-8."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_factory import seeded_model, small_test_config
from spm_fixture import build_tokenizer

from minigpt.generate import GenerationConfig, TextGenerator
from minigpt.tokenizer import Tokenizer
from minigpt.utf8_guard import NOT_A_BYTE, Utf8Guard, sequence_length

REPLACEMENT = "\ufffd"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return Tokenizer(build_tokenizer(tmp_path_factory.mktemp("tokenizer")))


def untrained_generator(tokenizer: Tokenizer, seed: int) -> TextGenerator:
    """Random weights, wide enough that byte pieces are picked as often as anything else."""
    model = seeded_model(small_test_config(tokenizer.vocab_size + 16, tie_embeddings=False), seed)
    for name, param in model.named_parameters():
        if "norm" not in name:
            torch.nn.init.normal_(param, std=0.3)
    return TextGenerator(model.eval(), tokenizer)


def allowed_bytes(guard: Utf8Guard, row: int, steps_left: int) -> set[int]:
    mask = guard.mask([row], steps_left)[0]
    return {byte for token, byte in enumerate(guard.byte_of) if byte >= 0 and mask[token] == 0}


def test_byte_values_name_the_byte_of_each_fallback_piece(tokenizer):
    values = tokenizer.byte_values
    assert len(values) == tokenizer.vocab_size
    assert sorted(v for v in values if v != NOT_A_BYTE) == list(range(256))
    assert values[tokenizer.sp.piece_to_id("<0xE5>")] == 0xE5
    assert values[tokenizer.eos_id] == NOT_A_BYTE


def test_guard_allows_exactly_the_bytes_that_continue_a_valid_character(tokenizer):
    guard = Utf8Guard(tokenizer.byte_values, tokenizer.vocab_size + 4, "cpu")
    starters = {b for b in range(256) if sequence_length(b)}
    assert allowed_bytes(guard, 0, steps_left=9) == starters
    assert allowed_bytes(guard, 0, steps_left=2) == {b for b in starters if sequence_length(b) <= 2}
    byte_id = {byte: token for token, byte in enumerate(tokenizer.byte_values) if byte >= 0}
    guard.advance(0, byte_id[0xE5])
    assert allowed_bytes(guard, 0, 9) == set(range(0x80, 0xC0))
    mask = guard.mask([0], 9)[0]
    assert mask[tokenizer.eos_id] == float("-inf") and mask[tokenizer.vocab_size:].eq(float("-inf")).all()
    guard.advance(0, byte_id[0xBA])
    guard.advance(0, byte_id[0x8A])
    assert allowed_bytes(guard, 0, 9) == starters and guard.mask([0], 9)[0][tokenizer.eos_id] == 0
    guard.advance(1, byte_id[0xED])  # U+D800-DFFF (surrogates) are not characters
    assert allowed_bytes(guard, 1, 9) == set(range(0x80, 0xA0))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**16), prompt=st.text(st.sampled_from("床前明月光疑是地上霜，你好 MiniGPT！é🙂"),
                                                  min_size=1, max_size=8),
       temperature=st.sampled_from([0.0, 0.7, 1.0, 2.5]), top_k=st.sampled_from([0, 5, 50]),
       top_p=st.sampled_from([0.5, 0.9, 1.0]), max_new_tokens=st.integers(1, 24), chat=st.booleans(),
       repetition_penalty=st.sampled_from([1.0, 1.3]))
def test_no_replacement_character_from_any_model_prompt_or_sampling(tokenizer, seed, prompt, temperature, top_k,
                                                                     top_p, max_new_tokens, chat,
                                                                     repetition_penalty):
    generator = untrained_generator(tokenizer, seed % 4)
    config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              repetition_penalty=repetition_penalty, seed=seed)
    batched = generator.generate([prompt, prompt[::-1] + "光"], config, chat=chat)
    (alone,) = generator.generate([prompt], config, chat=chat)
    streamed = list(generator.stream(prompt, config, chat=chat))
    (ids,) = generator.generate_ids([generator.encode_prompt(prompt, chat)], config)
    assert REPLACEMENT not in "".join(batched) + alone + tokenizer.decode(ids)
    assert all(REPLACEMENT not in piece for piece in streamed) and "".join(streamed) == alone


def test_untrained_model_emits_chinese_byte_sequences_whole(tokenizer):
    """The property above is not vacuous: random models do pick byte pieces, and those form characters."""
    config = GenerationConfig(max_new_tokens=40, seed=3)
    (ids,) = TextGenerator.generate_ids(untrained_generator(tokenizer, 1), [tokenizer.encode("床前明月光")], config)
    assert sum(tokenizer.byte_values[i] >= 0x80 for i in ids if i < tokenizer.vocab_size) >= 2
    assert REPLACEMENT not in tokenizer.decode(ids)


def test_whole_characters_off_takes_the_models_own_greedy_choice(tokenizer):
    """Off (as a parity test against transformers or llama.cpp needs): each greedy token is the argmax of the
    model's logits over the tokenizer's ids, byte pieces that break a character included."""
    generator = untrained_generator(tokenizer, seed=11)
    prompt = tokenizer.encode("床前")
    config = GenerationConfig(max_new_tokens=24, do_sample=False, stop_token_ids=(), whole_characters=False)
    raw = generator.generate_ids([prompt], config)[0]
    ids = list(prompt)
    for token in raw:
        with torch.no_grad():
            logits = generator.model(torch.tensor([ids]))[0, -1, :tokenizer.vocab_size]
        assert token == int(logits.argmax())
        ids.append(token)
    whole = generator.generate_ids([prompt], GenerationConfig(max_new_tokens=24, do_sample=False,
                                                              stop_token_ids=()))[0]
    assert REPLACEMENT not in tokenizer.decode(whole)
    assert whole != raw and REPLACEMENT in tokenizer.decode(raw)  # this model does break characters
