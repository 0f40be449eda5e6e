"""The language-modelling objectives: pretraining and SFT share the next-token loss defined here.

Each mode's maths is one `Objective` subclass (contract in `minigpt.train.objective`); DPO, the reward
model and GRPO live in their own files. The loop looks the mode up in `minigpt.modes.OBJECTIVES` and
never branches on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minigpt.config import option
from minigpt.data.datasets import IGNORE_INDEX, PackedSFTExamples, PretrainWindows, SFTExamples
from minigpt.i18n import _
from minigpt.metrics import MetricSums, token_byte_lengths
from minigpt.train.objective import Objective, SetupContext


@dataclass
class PretrainOptions:
    """`--mode pretrain`'s own flags."""

    document_mask: bool = option("pretrain: attention stays inside each document of a packed window (no attending "
                                 "across an EOS into the previous text); off: windows attend across documents, "
                                 "as GPT-2 trained. Costs speed: attention gets an explicit mask", default=False)


@dataclass
class SFTOptions:
    """`--mode sft`'s own flags."""

    pack: bool = option("sft: pack several whole conversations into each sequence (best-fit, fixed once per "
                        "dataset) instead of one conversation padded to --seq-len; attention and rotary positions "
                        "restart at each conversation, the loss stays on assistant tokens. Far fewer padding "
                        "tokens on mixed-length data; a batch then holds more conversations", default=False)


class LanguageModeling(Objective):
    """Next-token cross-entropy on positions whose label is not -100 (pretrain windows, SFT answers)."""

    eval_sums = ("loss_sum", "tokens", "bytes")
    mixes_sources = True

    def __init__(self, byte_lengths: torch.Tensor | None = None, document_mask: bool = False, pack: bool = False):
        self.byte_lengths = byte_lengths
        self.document_mask, self.pack = document_mask, pack
        self.packed: list[PackedSFTExamples] = []
        self.unpacked: list[SFTExamples] = []

    @classmethod
    def from_options(cls, options, tokenizer) -> LanguageModeling:
        return cls(token_byte_lengths(tokenizer), document_mask=getattr(options, "document_mask", False),
                   pack=getattr(options, "pack", False))

    def dataset(self, reader, seq_len: int, tokenizer):
        """The map-style dataset this objective trains on, over one shard; with `--document-mask` the
        pretraining windows carry each token's document index and attention stays inside documents; with
        `--pack` several SFT conversations share a sequence, each with its own attention and positions."""
        if self.dataset_kind == "pretrain":
            return PretrainWindows(reader, seq_len, segment_ids=self.document_mask)
        if self.pack:
            packed = PackedSFTExamples(reader, seq_len, pad_id=tokenizer.pad_id)
            self.packed.append(packed)
            return packed
        examples = SFTExamples(reader, seq_len, pad_id=tokenizer.pad_id)
        self.unpacked.append(examples)
        return examples

    def setup(self, context: SetupContext) -> None:
        """Say once how many conversations are cut at --seq-len, and how they were packed (train and validation
        together)."""
        if not context.engine.is_main:
            return
        cut = sum(d.num_truncated for d in self.unpacked)
        if cut:
            total = sum(len(d) for d in self.unpacked)
            longest = max(int(d.reader.document_lengths().max()) for d in self.unpacked if len(d))
            print(_("[minigpt] sft: {cut:,} of {total:,} conversations are longer than --seq-len {seq_len} + 1 tokens "
                    "(the longest: {longest}) and are cut: their ends are not trained; a longer --seq-len keeps "
                    "them").format(cut=cut, total=total, seq_len=context.seq_len, longest=longest), flush=True)
        if not self.packed:
            return
        sequences = sum(len(d) for d in self.packed)
        padding = sum(d.padding_share * len(d) for d in self.packed) / max(sequences, 1)
        print(_("[minigpt] sft --pack: {conversations:,} conversations in {sequences:,} sequences of {seq_len} "
                "positions ({padding:.1%} padding); {truncated:,} cut at --seq-len").format(
            conversations=sum(d.num_conversations for d in self.packed), sequences=sequences,
            seq_len=context.seq_len, padding=padding, truncated=sum(d.num_truncated for d in self.packed)),
            flush=True)

    logits_where_labelled = False
    """Compute logits only at labelled positions (`MiniGPT.forward(logits_at=...)`): for SFT, where most
    positions are the prompt or padding. Pretraining labels every position, and selecting would only add a
    copy and a data-dependent shape."""

    def _logits_and_labels(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, vocab) logits and (N,) labels; N counts every position, or only the labelled ones."""
        labels = batch["labels"]
        # packed samples (--document-mask, --pack) carry segment ids; packed conversations also their positions
        packing = {"segment_ids": batch.get("segment_ids"), "position_ids": batch.get("position_ids")}
        if not self.logits_where_labelled:
            logits = model(batch["input_ids"], **packing)
            return logits.flatten(0, 1), labels.flatten()
        kept = labels != IGNORE_INDEX
        return model(batch["input_ids"], logits_at=kept, **packing), labels[kept]

    def loss(self, engine, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        logits, labels = self._logits_and_labels(engine, batch)
        # Sum / count rather than mean: a micro-batch with no trained token (all -100) gives 0, not NaN.
        total = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
        lm_loss = total / (labels != IGNORE_INDEX).sum().clamp(min=1)
        return self.add_model_losses(engine, lm_loss, {}, "lm_loss")  # a mixture of experts' load balancing

    @torch.no_grad()
    def eval_batch(self, model, batch: dict[str, torch.Tensor], sums: MetricSums) -> None:
        logits, labels = self._logits_and_labels(model, batch)
        losses = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="none")
        kept = labels != IGNORE_INDEX
        sums.add("loss_sum", losses[kept].double().sum().item())
        sums.add("tokens", kept.sum().item())
        if self.byte_lengths is not None:
            sums.add("bytes", self.byte_lengths[labels[kept].cpu()].sum().item())

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        metrics = {"val_loss": sums["loss_sum"] / max(sums["tokens"], 1.0)}
        if sums["bytes"] > 0:
            metrics["val_bpb"] = sums["loss_sum"] / math.log(2) / sums["bytes"]
        return metrics


class Pretraining(LanguageModeling):
    """`--mode pretrain`: next-token loss on packed windows of the shards."""

    dataset_kind = "pretrain"
    options = PretrainOptions


class SupervisedFineTuning(LanguageModeling):
    """`--mode sft`: next-token loss on the assistant tokens of chat conversations only."""

    dataset_kind = "sft"
    options = SFTOptions
    previous_stages = ("pretrain",)
    chat_samples = True
    logits_where_labelled = True
