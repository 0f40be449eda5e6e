"""Reward model (`--mode reward`): a scalar head on MiniGPT trained on preference pairs (Bradley–Terry).

    score(x, y) = head(h_last)          h_last: final hidden state at the response's last token
    loss        = -log sigmoid(score(chosen) - score(rejected))

It trains on the same pair shards as DPO and starts from the SFT weights (else pretrain). Held-out
pairwise accuracy is the evaluation metric. The consolidated directory is an ordinary MiniGPT model
directory (the backbone) plus `reward_head.pt`; `--mode rlhf --reward-model DIR` scores rollouts
with it, refusing one built on another tokenizer or vocabulary.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from minigpt.config import ConfigError, MiniGPTConfig
from minigpt.data.datasets import IGNORE_INDEX, DPOPairs
from minigpt.fsutil import fsync_dir, fsync_file, make_staging_dir, replace_dir
from minigpt.i18n import _
from minigpt.metrics import MetricSums
from minigpt.model import MiniGPT
from minigpt.train.objective import Objective
from minigpt.train.sequences import has_response, preference_accuracy
from minigpt.weights import load_consolidated, model_directory, save_consolidated

HEAD_FILE = "reward_head.pt"


class RewardModel(nn.Module):
    """MiniGPT backbone + linear scalar head.

    `forward(ids, score_positions=P)` gives one score per row, read at position P of the row; without
    `score_positions` it returns the backbone's logits (so the generator and the loop's sample still work).
    """

    def __init__(self, backbone: MiniGPT):
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config
        self.head = nn.Linear(backbone.config.hidden_size, 1)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, *, score_positions: torch.Tensor | None = None,
                **kwargs: Any) -> torch.Tensor:
        if score_positions is None:
            return self.backbone(input_ids, **kwargs)
        hidden = self.backbone(input_ids, return_hidden=True, **kwargs)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), score_positions]
        return self.head(last).squeeze(-1).float()


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Per-pair -log P(chosen > rejected) with P = sigmoid(score difference)."""
    return -F.logsigmoid(chosen_scores - rejected_scores)


def response_end_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B,) input position holding each row's last response token (the `<|im_end|>` of a full answer).

    Labels are the next tokens, so the last labelled position t means input t+1 is that token; a row
    cut at the context end scores at its last position, a row without response tokens at position 0."""
    positions = torch.arange(labels.shape[1], device=labels.device).expand_as(labels)
    last_label = torch.where(labels != IGNORE_INDEX, positions, torch.full_like(positions, -1)).max(-1).values
    return (last_label + 1).clamp(min=0, max=labels.shape[1] - 1)


def _pair_scores(forward, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    inputs = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    scores = forward(inputs, score_positions=response_end_positions(labels))
    chosen, rejected = scores.chunk(2)
    valid = (has_response(batch["chosen_labels"]) & has_response(batch["rejected_labels"])).float()
    return chosen, rejected, valid


class RewardModeling(Objective):
    """The `--mode reward` objective: Bradley–Terry loss; logs pairwise accuracy and score margin."""

    dataset_kind = "dpo"  # preference pairs, the same shards as DPO
    previous_stages = ("sft", "pretrain")
    varying_shapes = True
    STATS = ("accuracy", "chosen_score", "margin", "rejected_score")
    eval_sums = ("loss_sum", "pairs", *STATS)

    def dataset(self, reader, seq_len: int, tokenizer) -> DPOPairs:
        return DPOPairs(reader, seq_len, pad_id=tokenizer.pad_id)

    def wrap_model(self, model: MiniGPT) -> RewardModel:
        """The module to train: the starting weights under a fresh scalar head."""
        return RewardModel(model)

    def loss(self, engine, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        chosen, rejected, valid = _pair_scores(engine, batch)
        count = valid.sum().clamp(min=1.0)
        loss = (bradley_terry_loss(chosen, rejected) * valid).sum() / count
        margin = (chosen - rejected).detach()
        stats = {"accuracy": (preference_accuracy(margin) * valid).sum() / count,
                 "chosen_score": (chosen.detach() * valid).sum() / count,
                 "rejected_score": (rejected.detach() * valid).sum() / count,
                 "margin": (margin * valid).sum() / count}
        return self.add_model_losses(engine, loss, {name: float(value) for name, value in stats.items()},
                                     "reward_loss")  # a mixture of experts' load balancing

    @torch.no_grad()
    def eval_batch(self, model, batch: dict[str, torch.Tensor], sums: MetricSums) -> None:
        chosen, rejected, valid = _pair_scores(model, batch)
        margin = chosen - rejected
        sums.add("loss_sum", (bradley_terry_loss(chosen, rejected) * valid).sum())
        sums.add("pairs", valid.sum())
        for name, values in (("accuracy", preference_accuracy(margin)), ("chosen_score", chosen),
                             ("margin", margin), ("rejected_score", rejected)):
            sums.add(name, (values * valid).sum())

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """val_loss, val_accuracy (held-out pairwise accuracy), val_margin, val_chosen_score, val_rejected_score."""
        pairs = max(sums["pairs"], 1.0)
        return {"val_loss": sums["loss_sum"] / pairs, **{f"val_{name}": sums[name] / pairs for name in self.STATS}}

    def save_consolidated(self, out_dir: str | Path, state_dict: dict[str, torch.Tensor], config: MiniGPTConfig,
                          tokenizer_dir: str | Path | None, extra: dict | None = None) -> Path:
        """Like `minigpt.weights.save_consolidated` for a reward model: backbone directory + reward_head.pt."""
        return save_reward_model(out_dir, state_dict, config, tokenizer_dir, extra)


def save_reward_model(out_dir: str | Path, state_dict: dict[str, torch.Tensor], config: MiniGPTConfig,
                      tokenizer_dir: str | Path | None, extra: dict | None = None) -> Path:
    """Write a reward model directory atomically (built beside `out_dir`, then renamed into place)."""
    out_dir = Path(out_dir)
    backbone = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
    head = {k[len("head."):]: v.detach().cpu().float() for k, v in state_dict.items() if k.startswith("head.")}
    if set(head) != {"weight", "bias"}:
        raise ConfigError(_("{path}: state dict has no reward head (keys head.weight, head.bias)").format(path=out_dir))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = make_staging_dir(out_dir.parent, f".{out_dir.name}.reward-")
    try:
        built = save_consolidated(staging / "model", backbone, config, tokenizer_dir,
                                  extra={**(extra or {}), "reward_model": True})
        torch.save(head, built / HEAD_FILE)
        fsync_file(built / HEAD_FILE)
        fsync_dir(built)
        replace_dir(built, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def load_reward_model(model_dir: str | Path, tokenizer=None, device: str | torch.device = "cpu") -> RewardModel:
    """A frozen reward model from `model_dir` (or a run directory's final/); with `tokenizer`, refuse one built
    on another tokenizer/vocab."""
    model_dir = model_directory(model_dir)
    if not (model_dir / HEAD_FILE).is_file():
        raise ConfigError(_("--reward-model {path}: not a reward model (no {head}); train one with --mode "
                            "reward").format(path=model_dir, head=HEAD_FILE))
    backbone, reward_tokenizer = load_consolidated(model_dir, device=device)
    if tokenizer is not None:
        if backbone.config.vocab_size != tokenizer.vocab_size and \
                (reward_tokenizer is None or reward_tokenizer.vocab_size != tokenizer.vocab_size):
            raise ConfigError(_("--reward-model {path}: vocabulary of {vocab} tokens, the policy's tokenizer "
                                "{tokenizer} has {policy_vocab}; a reward model must be trained with the policy's "
                                "tokenizer").format(path=model_dir, vocab=backbone.config.vocab_size,
                                                    tokenizer=tokenizer.directory, policy_vocab=tokenizer.vocab_size))
        if reward_tokenizer is None or reward_tokenizer.checksum != tokenizer.checksum:
            found = reward_tokenizer.checksum[:12] if reward_tokenizer is not None else _("none recorded")
            raise ConfigError(_("--reward-model {path}: tokenizer {found} differs from the policy's {policy} "
                                "({tokenizer}); a reward model must be trained with the policy's tokenizer").format(
                path=model_dir, found=found, policy=tokenizer.checksum[:12], tokenizer=tokenizer.directory))
    model = RewardModel(backbone)
    head = torch.load(model_dir / HEAD_FILE, map_location="cpu", weights_only=True)
    model.head.load_state_dict(head)
    model.to(device).eval().requires_grad_(False)
    return model


@torch.no_grad()
def score_sequences(model: RewardModel, sequences: Sequence[Sequence[int]], pad_id: int,
                    device: torch.device) -> torch.Tensor:
    """(N,) reward-model scores of token sequences (prompt + response), read at each one's last token."""
    width = max(len(s) for s in sequences)
    ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    for row, sequence in enumerate(sequences):
        ids[row, :len(sequence)] = sequence
    positions = torch.tensor([len(s) - 1 for s in sequences], device=device)
    return model(torch.from_numpy(ids).to(device), score_positions=positions)
