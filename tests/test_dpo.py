"""DPO maths: summed response log-probs, the sigmoid loss against a hand computation, reference precompute."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from minigpt.config import MiniGPTConfig
from minigpt.model import MiniGPT
from minigpt.train.dpo import (
    DPO,
    compute_reference_logprobs,
    dpo_loss,
    has_response,
    pair_logprobs,
    preference_accuracy,
    sequence_logprobs,
)


def test_sequence_logprobs_sums_only_unmasked_positions():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7)
    labels = torch.tensor([[-100, 3, 5, -100], [1, -100, -100, -100]])
    logp = logits.log_softmax(-1)
    expected = torch.stack([logp[0, 1, 3] + logp[0, 2, 5], logp[1, 0, 1]])
    torch.testing.assert_close(sequence_logprobs(logits, labels), expected)


def test_sequence_logprobs_is_a_sum_not_a_mean():
    logits = torch.zeros(1, 4, 2)  # uniform over 2 tokens: each kept token costs log 2
    labels = torch.tensor([[0, 1, 1, -100]])
    assert math.isclose(sequence_logprobs(logits, labels).item(), -3 * math.log(2), rel_tol=1e-6)


def test_dpo_loss_matches_hand_computation():
    beta = 0.5
    losses, chosen, rejected = dpo_loss(torch.tensor([-3.0]), torch.tensor([-5.0]),
                                        torch.tensor([-4.0]), torch.tensor([-4.0]), beta)
    # rewards: chosen 0.5 * (-3 + 4) = 0.5, rejected 0.5 * (-5 + 4) = -0.5; loss = -log sigmoid(1)
    assert chosen.item() == 0.5 and rejected.item() == -0.5
    assert math.isclose(losses.item(), math.log(1 + math.exp(-1.0)), rel_tol=1e-6)


def test_dpo_loss_at_the_reference_is_log_two_and_its_gradient_prefers_chosen():
    policy_chosen = torch.tensor([-2.0], requires_grad=True)
    policy_rejected = torch.tensor([-2.0], requires_grad=True)
    losses, _, _ = dpo_loss(policy_chosen, policy_rejected, torch.tensor([-2.0]), torch.tensor([-2.0]), 0.1)
    assert math.isclose(losses.item(), math.log(2), rel_tol=1e-6)
    losses.sum().backward()
    assert policy_chosen.grad.item() < 0 < policy_rejected.grad.item()  # descent raises chosen, lowers rejected


def test_preference_accuracy_counts_ties_as_half():
    assert preference_accuracy(torch.tensor([1.0, -1.0, 0.0])).tolist() == [1.0, 0.0, 0.5]


def test_has_response_flags_pairs_cut_before_their_response():
    assert has_response(torch.tensor([[-100, -100], [-100, 4]])).tolist() == [False, True]


class _Pairs:
    """Stand-in shard of pairs for the precompute pass (a real shard is exercised end to end)."""

    def __init__(self, samples):
        self.pairs = self
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        return self.samples[index]


def _random_pairs(count: int, seq_len: int, vocab: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    samples = []
    for _ in range(count):
        sample = {}
        for side in ("chosen", "rejected"):
            ids = rng.integers(4, vocab, seq_len)
            labels = np.roll(ids, -1).copy()
            labels[: seq_len // 2] = -100
            sample[f"{side}_input_ids"], sample[f"{side}_labels"] = ids, labels
        samples.append(sample)
    return samples


def test_reference_precompute_split_over_ranks_equals_one_pass():
    torch.manual_seed(0)
    model = MiniGPT(MiniGPTConfig(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                                  ffn_hidden_size=32, max_seq_len=16)).eval()
    pairs = _Pairs(_random_pairs(7, 8, 32))
    whole = compute_reference_logprobs(model, pairs, 3, 0, 1, torch.device("cpu"), lambda t: t)
    # Two "ranks" each fill their rows; summing the partial results is what the all-reduce does.
    parts = [compute_reference_logprobs(model, pairs, 2, r, 2, torch.device("cpu"), lambda t: t) for r in (0, 1)]
    np.testing.assert_allclose(parts[0] + parts[1], whole, rtol=1e-5, atol=1e-5)
    batch = {k: torch.from_numpy(np.stack([s[k] for s in pairs.samples])) for k in pairs.samples[0]}
    chosen, rejected = pair_logprobs(model, batch)
    np.testing.assert_allclose(whole[:, 0], chosen.double().detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(whole[:, 1], rejected.double().detach().numpy(), rtol=1e-5, atol=1e-5)


def test_sft_coef_adds_the_chosen_answers_per_token_nll_to_the_dpo_loss():
    torch.manual_seed(0)
    model = MiniGPT(MiniGPTConfig(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                                  ffn_hidden_size=32, max_seq_len=16))
    samples = _random_pairs(4, 8, 32)
    batch = {k: torch.from_numpy(np.stack([s[k] for s in samples])) for k in samples[0]}
    with torch.no_grad():
        chosen, rejected = pair_logprobs(model, batch)
    batch["reference_logps"] = torch.stack([chosen, rejected], -1).double() - 0.5  # policy != reference
    plain, plain_stats = DPO(beta=0.1).loss(model, batch)
    rpo, rpo_stats = DPO(beta=0.1, sft_coef=2.0).loss(model, batch)
    nll = (-chosen / (batch["chosen_labels"] != -100).sum(-1)).mean()  # per-token NLL of each chosen answer
    torch.testing.assert_close(rpo, plain + 2.0 * nll, rtol=1e-5, atol=1e-5)
    assert plain_stats["chosen_nll"] == rpo_stats["chosen_nll"] == pytest.approx(float(nll), rel=1e-5)
