"""Direct Preference Optimization (Rafailov et al., 2023): the sigmoid loss against a frozen reference.

    reward(y)  = beta * (log pi(y | x) - log ref(y | x))        log-probs SUMMED over response tokens
    loss       = -log sigmoid(reward(chosen) - reward(rejected))

The reference is the starting weights. By default its log-probs are computed once, in a pass over the
train and validation pairs before the first step, and kept with the run in `reference_logprobs.pt`
(loaded again on resume), so no reference model sits in memory while training; with
`--dpo-reference-in-memory` a frozen copy of the starting weights scores every batch instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from minigpt.config import ConfigError, check_not_negative, check_positive, option
from minigpt.data.datasets import IGNORE_INDEX, DPOPairs
from minigpt.fsutil import atomic_torch_save
from minigpt.i18n import _
from minigpt.metrics import MetricSums
from minigpt.train.objective import Objective, SetupContext
from minigpt.train.sequences import (
    has_response,
    load_frozen_model,
    preference_accuracy,
    sequence_logprobs,
)

REFERENCE_FILE = "reference_logprobs.pt"


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair sigmoid DPO losses and the implicit rewards beta * (log pi - log ref) of both sides."""
    chosen_rewards = beta * (policy_chosen - reference_chosen)
    rejected_rewards = beta * (policy_rejected - reference_rejected)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


class ReferencedPairs:
    """DPO pairs of one shard, each sample tagged with its index and, once known, the reference log-probs."""

    def __init__(self, pairs: DPOPairs, source: int):
        self.pairs, self.source = pairs, source
        self.reference: np.ndarray | None = None
        """(len, 2) float64: reference log-probs of (chosen, rejected), set by `DPO.prepare`."""

    @property
    def num_truncated(self) -> int:
        return self.pairs.num_truncated

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        sample = self.pairs[index]
        sample["index"] = np.array(int(index), dtype=np.int64)
        if self.reference is not None:
            sample["reference_logps"] = self.reference[int(index)]
        return sample


def pair_logprobs(forward: Callable[[torch.Tensor], torch.Tensor], batch: dict[str, torch.Tensor]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs of (chosen, rejected), both sides in one forward pass of 2B sequences."""
    inputs = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    return sequence_logprobs(forward(inputs), labels).chunk(2)


@torch.no_grad()
def compute_reference_logprobs(forward: Callable[[torch.Tensor], torch.Tensor], pairs: ReferencedPairs,
                               batch_size: int, rank: int, world_size: int, device: torch.device,
                               all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
    """(len, 2) log-probs of every pair under `forward`, the work split over ranks.

    Every rank runs the same number of forward passes (ZeRO-3 gathers weights collectively), padding its
    last batch with pair 0 whose result it drops; an all-reduce assembles the rows."""
    count = len(pairs)
    mine = list(range(rank, count, world_size))
    per_rank = math.ceil(count / world_size)
    batches = math.ceil(per_rank / batch_size)
    result = torch.zeros(count, 2, dtype=torch.float64, device=device)
    for b in range(batches):
        indices = mine[b * batch_size:(b + 1) * batch_size]
        padded = indices + [0] * (batch_size - len(indices))
        samples = [pairs.pairs[i] for i in padded]
        batch = {key: torch.from_numpy(np.stack([s[key] for s in samples])).to(device) for key in samples[0]}
        chosen, rejected = pair_logprobs(forward, batch)
        if indices:
            rows = torch.tensor(indices, device=device)
            result[rows, 0] = chosen[:len(indices)].double()
            result[rows, 1] = rejected[:len(indices)].double()
    return all_reduce_sum(result).cpu().numpy()


@dataclass
class DPOOptions:
    """`--mode dpo`'s own flags."""

    dpo_beta: float = option("DPO: strength of the implicit KL constraint (beta of the sigmoid loss)", default=0.1)
    dpo_sft_coef: float = option("DPO: weight of the chosen response's per-token NLL added to the loss (RPO); "
                                 "keeps chosen answers likely while the margin grows", default=0.0)
    dpo_reference_in_memory: bool = option("DPO: keep a frozen reference model in memory instead of precomputing "
                                           "the reference log-probs once before training (reference_logprobs.pt)",
                                           default=False)

    def __post_init__(self) -> None:
        check_positive(self, "dpo_beta")
        check_not_negative(self, "dpo_sft_coef")


class DPO(Objective):
    """The `--mode dpo` objective: sigmoid DPO loss; logs implicit rewards, margin and preference accuracy.

    With `sft_coef` > 0 the per-token NLL of the chosen response is added (RPO, Pang et al., 2024):
    plain DPO only widens the margin, and can do so by lowering the chosen answer's likelihood too."""

    dataset_kind = "dpo"
    options = DPOOptions
    previous_stages = ("sft",)
    chat_samples = True
    varying_shapes = True
    eval_sums = ("loss_sum", "pairs", "chosen_reward", "rejected_reward", "margin", "accuracy")

    def __init__(self, beta: float, reference_in_memory: bool = False, sft_coef: float = 0.0):
        self.beta = beta
        self.sft_coef = sft_coef
        self.reference_in_memory = reference_in_memory
        self.datasets: list[ReferencedPairs] = []
        self.reference_model: torch.nn.Module | None = None

    @classmethod
    def from_options(cls, options: DPOOptions, tokenizer) -> DPO:
        return cls(options.dpo_beta, reference_in_memory=options.dpo_reference_in_memory,
                   sft_coef=options.dpo_sft_coef)

    def dataset(self, reader, seq_len: int, tokenizer) -> ReferencedPairs:
        pairs = ReferencedPairs(DPOPairs(reader, seq_len, pad_id=tokenizer.pad_id), len(self.datasets))
        self.datasets.append(pairs)
        return pairs

    # -- the reference -----------------------------------------------------------------------------
    def setup(self, context: SetupContext) -> None:
        """Before the first step: load a frozen reference, or precompute/load the reference log-probs."""
        engine = context.engine
        truncated = sum(d.num_truncated for d in self.datasets)
        if engine.is_main and truncated:
            print(_("[minigpt] dpo: {count} pair(s) cut at --seq-len {seq_len}; pairs left without response tokens "
                    "are counted as empty_pairs and take no loss").format(count=truncated, seq_len=context.seq_len),
                  flush=True)
        if self.reference_in_memory:
            self.reference_model = load_frozen_model(context.start_dir, engine.device, context.mode,
                                                     engine.precision, policy=engine.module)
            return
        path = context.run_dir / REFERENCE_FILE
        fingerprint = {"weights_from": context.start_source, "seq_len": context.seq_len,
                       "datasets": [str(d) for d in context.dataset_dirs],
                       "pairs": [len(d) for d in self.datasets]}
        stored = torch.load(path, weights_only=True) if path.is_file() else None
        if stored is not None and stored.get("fingerprint") == fingerprint:
            references = [t.numpy() for t in stored["reference"]]
            source = _("loaded from {path}").format(path=path)
        else:
            if stored is not None and context.step > 0:
                raise ConfigError(_("{path}: reference log-probs of another run ({stored}); this run is {current}. "
                                    "Remove the file to recompute them").format(
                    path=path, stored=stored.get("fingerprint"), current=fingerprint))
            references = self._compute_references(context)
            if engine.is_main:
                atomic_torch_save({"fingerprint": fingerprint,
                                  "reference": [torch.from_numpy(r) for r in references]}, path)
            engine.barrier()
            source = _("precomputed into {path}").format(path=path)
        for pairs, reference in zip(self.datasets, references, strict=True):
            pairs.reference = reference
        if engine.is_main:
            print(_("[minigpt] dpo: reference log-probs of {pairs} pairs {source}").format(
                pairs=sum(len(d) for d in self.datasets), source=source), flush=True)

    def _compute_references(self, context: SetupContext) -> list[np.ndarray]:
        engine = context.engine
        if context.step == 0:  # the engine still holds the starting weights: use it (sharded under ZeRO-3)
            engine.eval()
            try:
                return [compute_reference_logprobs(engine, d, context.batch_size, engine.rank, engine.world_size,
                                                   engine.device, engine.all_reduce_sum) for d in self.datasets]
            finally:
                engine.train()
        # Resumed without the file: score with the starting weights, briefly held on every rank.
        model = load_frozen_model(context.start_dir, engine.device, context.mode, engine.precision)
        references = [compute_reference_logprobs(model, d, context.batch_size, 0, 1, engine.device,
                                                 lambda t: t) for d in self.datasets]
        del model
        return references

    def _reference_logprobs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if "reference_logps" in batch:
            reference = batch["reference_logps"].float()
            return reference[:, 0], reference[:, 1]
        if self.reference_model is None:
            raise RuntimeError(_("DPO has no reference: setup() was not called before training"))
        with torch.no_grad():
            return pair_logprobs(self.reference_model, batch)

    # -- loss and evaluation -------------------------------------------------------------------------
    def _pair_terms(self, forward, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        policy_chosen, policy_rejected = pair_logprobs(forward, batch)
        reference_chosen, reference_rejected = self._reference_logprobs(batch)
        losses, chosen, rejected = dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected,
                                            self.beta)
        valid = (has_response(batch["chosen_labels"]) & has_response(batch["rejected_labels"])).float()
        chosen_tokens = (batch["chosen_labels"] != IGNORE_INDEX).sum(-1).clamp(min=1)
        return {"losses": losses, "chosen": chosen, "rejected": rejected, "valid": valid,
                "chosen_nll": -policy_chosen / chosen_tokens}

    def loss(self, engine, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        terms = self._pair_terms(engine, batch)
        valid = terms["valid"]
        count = valid.sum().clamp(min=1.0)
        # Pairs without response tokens (cut by --seq-len) contribute nothing, yet keep the graph whole.
        loss = (terms["losses"] * valid).sum() / count
        chosen_nll = (terms["chosen_nll"] * valid).sum() / count
        if self.sft_coef:  # RPO: keep the chosen answers likely while the margin grows
            loss = loss + self.sft_coef * chosen_nll
        margin = terms["chosen"] - terms["rejected"]
        stats = {"chosen_nll": chosen_nll.detach(),
                 "chosen_reward": (terms["chosen"] * valid).sum() / count,
                 "rejected_reward": (terms["rejected"] * valid).sum() / count,
                 "margin": (margin * valid).sum() / count,
                 "accuracy": (preference_accuracy(margin) * valid).sum() / count,
                 "empty_pairs": (1.0 - valid).sum()}
        return self.add_model_losses(engine, loss, {name: float(value) for name, value in stats.items()},
                                     "dpo_loss")  # a mixture of experts' load balancing

    @torch.no_grad()
    def eval_batch(self, model, batch: dict[str, torch.Tensor], sums: MetricSums) -> None:
        terms = self._pair_terms(model, batch)
        valid = terms["valid"]
        margin = terms["chosen"] - terms["rejected"]
        sums.add("loss_sum", (terms["losses"] * valid).sum())
        sums.add("pairs", valid.sum())
        for name, values in (("chosen_reward", terms["chosen"]), ("rejected_reward", terms["rejected"]),
                             ("margin", margin), ("accuracy", preference_accuracy(margin))):
            sums.add(name, (values * valid).sum())

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """val_loss, val_accuracy (preference accuracy), val_margin, val_chosen_reward, val_rejected_reward."""
        pairs = max(sums["pairs"], 1.0)
        return {"val_loss": sums["loss_sum"] / pairs,
                **{f"val_{name}": sums[name] / pairs
                   for name in ("accuracy", "chosen_reward", "margin", "rejected_reward")}}
