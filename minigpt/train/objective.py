"""The contract between the training loop and a mode's objective: every hook the loop calls.

The loop (`minigpt.train.loop`) calls, in this order:

    wrap_model(model)                     once, before the engine is built
    dataset(reader, seq_len, tokenizer)   once per shard directory and split
    setup(context)                        once, after resuming, before the first step
    per optimizer step:
        begin_batch(step, micro_batches)  when the sampler hands over a new batch (every
                                          `updates_per_batch` steps); returns what `loss` trains on
        loss(engine, micro_batch)         per micro-batch -> (scalar loss, {stat name: value});
                                          a mixture-of-experts model's own losses join it through
                                          `model_losses(engine)` (load balancing, router z-loss)
        tokens_in(micro_batch)            per micro-batch, for throughput
    evaluation: eval_batch(model, batch, sums) per validation batch, then metrics(sums reduced by name)
    end of run: save_consolidated(...)    the final weights directory

Objectives get what they need through these arguments and `SetupContext`, never the Trainer, and
tell the loop what it needs to know about their mode through class attributes (`previous_stages`,
`dataset_kind`, `chat_samples`, `varying_shapes`, `options`: the dataclass of its own flags), never a table
elsewhere. Adding a mode is one new
file with an `Objective` subclass plus one line in `minigpt.modes.OBJECTIVES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minigpt.config import NoOptions
from minigpt.metrics import MetricSums


@dataclass(frozen=True)
class SetupContext:
    """What an objective may know about its run, handed over once by `Objective.setup`."""

    engine: Any
    """The training engine (`minigpt.engine.base.Engine`): its forward, device, rank and collectives."""
    run_dir: Path
    """The run's directory: where an objective keeps files of its own (e.g. DPO's reference log-probs)."""
    tokenizer: Any
    dataset_dirs: tuple[Path, ...]
    """Shard directories the run trains on."""
    seq_len: int
    batch_size: int
    """Micro-batch size per rank."""
    grad_accum: int
    """Micro-batches per optimizer step and rank."""
    start_source: str
    """Where the starting weights came from ("random init" or a directory), as recorded in the snapshot."""
    start_dir: Path | None
    """Directory of the starting weights (a frozen reference is loaded from it), None from scratch."""
    step: int
    """Optimizer steps already taken (> 0 when resumed)."""
    mode: str


class Objective:
    """Base of every mode's objective; each hook has a default so a mode overrides only what it changes."""

    dataset_kind: str = "pretrain"
    """The shard kind (`meta.json` "kind", one of `minigpt.data.shards.KINDS`) the mode trains on."""
    previous_stages: tuple[str, ...] = ()
    """Modes whose `final/` weights of the same preset a run starts from, the first found in this order;
    empty: the mode starts from random init (pretraining). A post-training mode that finds none starts
    from random init with a loud warning."""
    chat_samples: bool = False
    """Whether the model answers chat turns: the sample at each evaluation goes through the chat template."""
    varying_shapes: bool = False
    """Whether batch shapes change from step to step (pairs, rollouts): `--compile auto` then stays eager."""
    eval_sums: tuple[str, ...] = ()
    """Names of the sums `eval_batch` adds to; declared so every rank reduces the same keys."""
    updates_per_batch: int = 1
    """Optimizer steps taken on each batch the sampler hands over (GRPO's `--rl-updates`)."""
    mixes_sources: bool = False
    """Whether the mode trains on a weighted mixture (`--data NAME=PATH:WEIGHT`): its samples are `seq_len`
    tokens each and one dataset per source makes sense (pairs and prompts keep their own caches per dataset)."""

    options: type = NoOptions
    """The dataclass of the mode's own flags (`TrainConfig.options` holds one; fields made with
    `minigpt.config.option`, flag names from the field names). `launch/train.py --help` lists them under the mode."""

    @classmethod
    def from_options(cls, options, tokenizer) -> Objective:
        """Build the objective from its mode's options (an instance of `options`; the registry calls this)."""
        return cls()

    @classmethod
    def required_tokenizer(cls, options, run_dir: Path) -> Path | None:
        """A directory whose tokenizer the run must use when neither starting weights nor `--tokenizer` bring
        one (distillation: the teacher's, which a fresh student must share); None: the run's usual choice."""
        return None

    @classmethod
    def plan(cls, options, run_dir: Path, tokenizer_dir: Path | str | None, positions: int) -> list[str]:
        """What `--dry-run` says of what the mode adds to the run besides the model (distillation: its teacher),
        after refusing what `setup` would refuse before the first step. `tokenizer_dir`: where the student's
        tokenizer is (None when it takes `required_tokenizer`'s), read only by a mode that needs it;
        `positions`: tokens of one micro-batch."""
        return []

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """The module to train around the loaded or fresh model (the reward model adds a scalar head)."""
        return model

    def dataset(self, reader, seq_len: int, tokenizer):
        """The map-style dataset this objective trains and evaluates on, over one shard."""
        raise NotImplementedError

    def setup(self, context: SetupContext) -> None:
        """Once before the first step (after resuming): load references, precompute what the run needs."""

    def begin_batch(self, step: int, micro_batches: list) -> list:
        """The micro-batches `loss` trains on for the next `updates_per_batch` steps, from the sampler's.

        GRPO samples and scores its rollouts here; the loop keeps what this returns and hands it
        back for each update of the cycle, so nothing is recognised by identity."""
        return micro_batches

    def loss(self, engine, batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar loss of one micro-batch (mean over it) and statistics to log, the same keys every call."""
        raise NotImplementedError

    def model_losses(self, engine) -> tuple[torch.Tensor | float, dict[str, float]]:
        """The weighted losses the model adds to the mode's loss after its last forward pass, and their stats.

        For a mixture-of-experts model: moe_aux_loss_weight x the load-balancing loss + moe_z_loss_weight x
        the router z-loss, each averaged over the MoE layers; stats `moe_aux_loss`, `moe_z_loss` and
        `moe_load/l{layer}_e{expert}` (the share of the layer's routed assignments each expert got:
        1/E each when balanced; near 1/k for the k experts that take every token when routing collapsed).
        A dense model adds 0. Every mode adds it after its policy's forward pass (DPO and the reward model
        over both sides of the pairs, GRPO over the rollout); a reward model's backbone is found inside it."""
        root = getattr(engine, "module", engine)  # an engine, or the bare model a caller forwards through
        model = next((m for m in root.modules() if hasattr(m, "moe_stats")), None)
        layers = model.moe_stats() if model is not None else []
        if not layers:
            return 0.0, {}
        config = model.config
        aux = torch.stack([layer.aux_loss for layer in layers]).mean()
        z_loss = torch.stack([layer.z_loss for layer in layers]).mean()
        stats = {"moe_aux_loss": aux.item(), "moe_z_loss": z_loss.item()}
        for index, layer in enumerate(layers):
            shares = (layer.counts / layer.counts.sum().clamp(min=1)).tolist()
            stats.update({f"moe_load/l{index}_e{e}": share for e, share in enumerate(shares)})
        return config.moe_aux_loss_weight * aux + config.moe_z_loss_weight * z_loss, stats

    def add_model_losses(self, engine, loss: torch.Tensor, stats: dict[str, float],
                         name: str) -> tuple[torch.Tensor, dict[str, float]]:
        """`loss` plus `model_losses`, with their stats; for a mixture of experts the mode's own loss is
        logged as `name` too (`loss` is what is optimised: the sum)."""
        model_loss, model_stats = self.model_losses(engine)
        if not model_stats:
            return loss, stats
        return loss + model_loss, {**stats, name: loss.item(), **model_stats}

    def tokens_in(self, batch) -> int:
        """Tokens the training forward pass over `batch` processes (for throughput)."""
        return sum(v.numel() for k, v in batch.items() if k.endswith("input_ids"))

    def new_eval_sums(self) -> MetricSums:
        return MetricSums(self.eval_sums)

    def eval_batch(self, model: nn.Module, batch: dict[str, torch.Tensor], sums: MetricSums) -> None:
        """Add one validation batch's sums into `sums` (names from `eval_sums`)."""
        raise NotImplementedError

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """Validation metrics from the sums added over every rank."""
        raise NotImplementedError

    def save_consolidated(self, out_dir: str | Path, state_dict: dict[str, torch.Tensor], config,
                          tokenizer_dir: str | Path | None, extra: dict | None = None) -> Path:
        """Write the final weights directory (`final/`); the reward model adds its head."""
        from minigpt.weights import save_consolidated

        return save_consolidated(out_dir, state_dict, config, tokenizer_dir, extra=extra)
