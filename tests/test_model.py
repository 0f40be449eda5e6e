"""MiniGPT model and config: validation, exact sizes, masking, training signal, log-probs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from model_factory import seeded_model, small_test_config

from minigpt.config import PRESETS, ConfigError, MiniGPTConfig, get_config
from minigpt.model import MiniGPT


def tiny(**overrides) -> MiniGPTConfig:
    return small_test_config(**{"vocab_size": 256, **overrides})


def model_for(seed: int = 0, **overrides) -> MiniGPT:
    return seeded_model(tiny(**overrides), seed).eval()


@pytest.mark.parametrize("overrides, message", [
    (dict(num_heads=3), "num_heads=3 does not divide hidden_size=64"),
    (dict(num_kv_heads=3), "num_kv_heads=3 does not divide num_heads=4"),
    (dict(vocab_size=0), "vocab_size must be a positive integer, got 0"),
    (dict(num_layers=-1), "num_layers must be a positive integer, got -1"),
    (dict(hidden_size=60, num_heads=4, num_kv_heads=4), "head dimension .*=15 must be even"),
    (dict(dropout=1.0), "dropout must be in \\[0, 1\\)"),
    (dict(max_seq_len=1.5), "max_seq_len must be a positive integer"),
    (dict(num_layers=10**9), "num_layers must be at most 1,024, got 1,000,000,000"),
    (dict(max_seq_len=2**30), "max_seq_len must be at most"),
    (dict(rope_theta="big"), "rope_theta must be a positive number, got 'big'"),
    (dict(norm_eps=float("nan")), "norm_eps must be a positive number, got nan"),
    (dict(dropout="0.1"), "dropout must be in \\[0, 1\\), got '0.1'"),
    (dict(tie_embeddings="yes"), "tie_embeddings must be true or false, got 'yes'"),
])
def test_config_validation_names_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny(**overrides)


def test_config_refuses_unknown_fields_and_presets():
    with pytest.raises(ConfigError, match=r"unknown model config field\(s\) \['hidden'\]"):
        MiniGPTConfig.from_dict({"hidden": 64})
    with pytest.raises(ConfigError, match="unknown model preset 'huge'"):
        get_config("huge")


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("tie", [True, False])
def test_num_params_is_exact_for_every_preset(name, tie):
    config = get_config(name, tie_embeddings=tie)
    with torch.device("meta"):
        model = MiniGPT(config)
    assert model.num_params() == config.num_params()
    assert sum(p.numel() for p in model.parameters()) == config.num_params()


def test_preset_sizes_are_the_advertised_scale():
    sizes = {name: config.num_params() for name, config in PRESETS.items()}
    assert 0.5e6 < sizes["tiny"] < 2e6
    assert 15e6 < sizes["small"] < 40e6
    assert 70e6 < sizes["medium"] < 150e6


def test_future_tokens_do_not_change_past_logits():
    model = model_for()
    ids = torch.randint(0, 256, (2, 24))
    changed = ids.clone()
    changed[:, 12:] = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_segment_ids_isolate_packed_documents():
    model = model_for()
    doc_a, doc_b = torch.randint(0, 256, (1, 9)), torch.randint(0, 256, (1, 7))
    packed = torch.cat([doc_a, doc_b], dim=1)
    segments = torch.tensor([[0] * 9 + [1] * 7])
    positions = torch.tensor([list(range(9)) + list(range(7))])
    with torch.no_grad():
        out = model(packed, segment_ids=segments, position_ids=positions)
        torch.testing.assert_close(out[:, :9], model(doc_a), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out[:, 9:], model(doc_b), atol=1e-5, rtol=1e-4)
        leaky = model(packed)
    assert not torch.allclose(leaky[:, 9:], model(doc_b), atol=1e-3)


def test_left_padding_with_attention_mask_matches_the_unpadded_sequence():
    model = model_for()
    ids = torch.randint(4, 256, (1, 10))
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], dim=1)
    mask = torch.tensor([[0] * 5 + [1] * 10])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(padded, attention_mask=mask, position_ids=positions)[:, 5:]
        torch.testing.assert_close(out, model(ids), atol=1e-5, rtol=1e-4)


def test_loss_falls_when_overfitting_a_tiny_batch():
    torch.manual_seed(0)
    model = MiniGPT(tiny())
    ids = torch.randint(0, 256, (4, 32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = F.cross_entropy(model(ids)[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(torch.log(torch.tensor(256.0)).item(), abs=0.3)  # init is near uniform
    assert losses[-1] < 0.5 * losses[0]


def test_token_logprobs_match_log_softmax_gather():
    model = model_for(tie_embeddings=False)
    ids = torch.randint(0, 256, (3, 16))
    with torch.no_grad():
        got = model.token_logprobs(ids)
        logits = model(ids)
    expected = torch.stack([torch.stack([logits[b, t].log_softmax(-1)[ids[b, t + 1]] for t in range(15)])
                            for b in range(3)])
    assert got.shape == (3, 15) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("tie", [True, False])
def test_sft_loss_from_labelled_positions_only_equals_the_full_logits_loss(tie):
    """SFT computes the LM head only where a label is trained (a minority of positions); the loss and every
    gradient are those of the full (B, T, vocab) logits with -100 ignored, and an all-prompt batch gives 0."""
    from minigpt.train.language_modeling import SupervisedFineTuning

    ids = torch.randint(0, 256, (3, 17), generator=torch.Generator().manual_seed(4))
    labels = ids[:, 1:].clone()
    labels[:, :9] = -100  # the prompt
    labels[1, 12:] = -100  # padding after a shorter answer
    batch = {"input_ids": ids[:, :-1], "labels": labels}
    results = []
    for selected in (False, True):
        model = model_for(tie_embeddings=tie).train()
        if selected:
            loss, _stats = SupervisedFineTuning().loss(model, batch)
        else:
            loss = F.cross_entropy(model(batch["input_ids"]).flatten(0, 1), labels.flatten(), ignore_index=-100)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (full, full_grads), (selected, selected_grads) = results
    torch.testing.assert_close(selected, full)
    for name, grad in full_grads.items():
        torch.testing.assert_close(selected_grads[name], grad, msg=name)
    empty = {"input_ids": batch["input_ids"], "labels": torch.full_like(labels, -100)}
    assert SupervisedFineTuning().loss(model_for(), empty)[0].item() == 0.0


def test_sequences_longer_than_max_seq_len_are_refused():
    model = model_for()
    with pytest.raises(ValueError, match="65 tokens exceeds max_seq_len=64"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_tied_embeddings_share_one_matrix_and_untied_do_not():
    tied, untied = model_for(), model_for(tie_embeddings=False)
    assert tied.lm_head.weight is tied.embed.weight
    assert untied.lm_head.weight is not untied.embed.weight
    assert dataclasses.replace(tied.config, tie_embeddings=False).num_params() == untied.num_params()


@pytest.mark.parametrize("name,shape", [
    ("small_30m", dict(hidden_size=384, num_layers=13, num_heads=12, num_kv_heads=3, ffn_hidden_size=1408,
                       max_seq_len=2048)),
    ("foundation", dict(hidden_size=768, num_layers=24, num_heads=16, num_kv_heads=4, ffn_hidden_size=2688,
                        max_seq_len=4096)),
    ("large", dict(hidden_size=768, num_layers=32, num_heads=24, num_kv_heads=6, ffn_hidden_size=3072,
                   max_seq_len=4096)),
])
def test_the_guides_presets_have_its_shapes_and_are_listed(name, shape):
    from minigpt.config import preset_table

    config = get_config(name)
    assert {field: getattr(config, field) for field in shape} == shape
    assert any(row.split()[0] == name for row in preset_table().splitlines())
    assert 25e6 < PRESETS["small_30m"].num_params() < 35e6


def test_hand_written_backwards_of_rmsnorm_and_swiglu_match_numerical_gradients():
    """The custom autograd functions of the norm and SwiGLU (fewer kernels than autograd's): SwiGLU against
    finite differences in float64; the norm (which computes in fp32 by design) against autograd through the
    composed fp32 ops; both bitwise in bf16 forward."""
    from minigpt.model import _RMSNormFunction, _SwiGLUFunction

    torch.manual_seed(0)
    x = torch.randn(4, 5, 64, requires_grad=True)
    weight = (torch.rand(64) + 0.5).requires_grad_()
    upstream = torch.randn(4, 5, 64)
    ours = torch.autograd.grad(_RMSNormFunction.apply(x, weight, 1e-5), (x, weight), upstream)
    composed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * weight
    reference = torch.autograd.grad(composed, (x, weight), upstream)
    for mine, theirs in zip(ours, reference, strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
    gate_up = torch.randn(2, 3, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_SwiGLUFunction.apply, (gate_up,))

    half = torch.randn(4, 16, 32).bfloat16()
    composed = (half.float() * torch.rsqrt(half.float().pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16()
    assert torch.equal(_RMSNormFunction.apply(half, torch.ones(32, dtype=torch.bfloat16), 1e-5), composed)
    gate, up = half.chunk(2, dim=-1)
    assert torch.equal(_SwiGLUFunction.apply(half), torch.nn.functional.silu(gate) * up)
