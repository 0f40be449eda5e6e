"""GRPO maths: group-relative advantages, the k3 KL estimator, the clipped surrogate, response log-probs."""

from __future__ import annotations

import math

import torch

from minigpt.config import MiniGPTConfig
from minigpt.model import MiniGPT
from minigpt.train.rlhf import (
    Rollout,
    clipped_policy_loss,
    group_advantages,
    kl_k3,
    masked_sequence_mean,
    response_logprobs,
)


def test_group_advantages_are_normalised_within_each_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    advantages = group_advantages(rewards, 4)
    torch.testing.assert_close(advantages[:4], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-3, rtol=0)
    assert advantages[4:].abs().max() == 0  # a group that all scored the same teaches nothing


def test_batch_scaled_advantages_keep_partial_credit_small_next_to_right_or_wrong():
    # Group 1: one right answer among wrong ones; group 2: two near-identical partial-credit answers.
    rewards = torch.tensor([1.0, 0.0, 0.10, 0.12])
    by_group = group_advantages(rewards, 2, "group")
    by_batch = group_advantages(rewards, 2, "batch")
    raw = group_advantages(rewards, 2, "none")
    assert by_group.abs().min() > 0.98  # 0.02 apart counts (almost) as much as right vs wrong
    assert by_batch[0] > 10 * by_batch[3] > 0
    torch.testing.assert_close(raw, torch.tensor([0.5, -0.5, -0.01, 0.01]))
    torch.testing.assert_close(by_batch, raw / raw.std(correction=0), atol=1e-3, rtol=0)
    for scale in ("group", "batch", "none"):
        assert group_advantages(rewards, 2, scale).view(2, 2).sum(-1).abs().max() < 1e-6  # zero mean per group


def test_kl_k3_is_zero_at_the_reference_positive_elsewhere_and_unbiased():
    assert kl_k3(torch.tensor([-1.0]), torch.tensor([-1.0])).item() == 0
    assert kl_k3(torch.tensor([-1.0]), torch.tensor([-2.0])).item() > 0
    # E_pi[k3] = KL(pi || ref): check on a two-outcome distribution by exact expectation.
    pi, ref = torch.tensor([0.7, 0.3]), torch.tensor([0.4, 0.6])
    expectation = (pi * kl_k3(pi.log(), ref.log())).sum()
    exact = (pi * (pi / ref).log()).sum()
    assert math.isclose(expectation.item(), exact.item(), rel_tol=1e-5)


def test_clipped_surrogate_stops_the_gradient_beyond_the_clip_range():
    old = torch.zeros(1, 3)
    logprobs = torch.tensor([[0.0, 0.5, -0.5]], requires_grad=True)  # ratios 1, e^0.5, e^-0.5
    loss, clipped = clipped_policy_loss(logprobs, old, torch.tensor([1.0]), clip=0.2)
    assert clipped.tolist() == [[0.0, 1.0, 1.0]]
    loss.sum().backward()
    # Positive advantage: raising an already too-likely token is clipped (no gradient); the others push up.
    assert logprobs.grad[0, 1] == 0
    assert logprobs.grad[0, 0] < 0 and logprobs.grad[0, 2] < 0
    torch.testing.assert_close(loss[0, 0], torch.tensor(-1.0))


def test_masked_sequence_mean_weights_each_response_equally():
    values = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    assert masked_sequence_mean(values, mask).item() == 2.5


def test_response_logprobs_of_left_padded_prompts_match_unpadded_scoring():
    torch.manual_seed(0)
    model = MiniGPT(MiniGPTConfig(vocab_size=32, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                                  ffn_hidden_size=32, max_seq_len=16)).eval()
    prompt, response = [5, 6, 7], [8, 9]
    ids = torch.tensor([[0, 0] + prompt + response])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
    rollout = Rollout(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                      response_mask=torch.ones(1, 2), old_logprobs=torch.zeros(1, 2), rewards=torch.zeros(1),
                      prompt_len=5)
    expected = model.token_logprobs(torch.tensor([prompt + response]))[:, -2:]
    torch.testing.assert_close(response_logprobs(model, rollout), expected, atol=1e-5, rtol=1e-5)
