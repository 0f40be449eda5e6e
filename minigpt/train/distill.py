"""Knowledge distillation: a student learns the token distributions of a frozen teacher.

`--mode distill` trains on pretraining text (every position), `--mode distill-sft` on chat conversations
(the assistant's tokens only, as SFT). Both mix, at every trained position,

    loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy(student, next token)

where `_T` is the softmax at temperature T (`--distill-temperature`) and alpha is `--distill-alpha`;
`--distill-kl reverse` uses KL(student_T || teacher_T) instead. The T^2 keeps the KL's gradients on the
scale of the cross-entropy's when T changes (Hinton et al., 2015).

The teacher (`--teacher`: a run directory, its `final/`, or a Hugging Face Llama directory) must use the
student's tokenizer (compared by checksum before any step); a student from random init takes the teacher's
tokenizer (`required_tokenizer`). The teacher runs without gradients, in eval mode, in the run's precision
(autocast, as DPO's reference), at the same labelled positions as the student (`logits_at` for
conversations). Under DeepSpeed every rank holds a whole copy of the teacher (replicated: fp32 weights,
4 bytes per parameter per rank, plus one forward pass's activations without gradients); see
docs/training.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from minigpt.config import ConfigError, check_choice, check_interval, check_positive, option
from minigpt.data.datasets import IGNORE_INDEX
from minigpt.i18n import _
from minigpt.metrics import MetricSums, token_byte_lengths
from minigpt.train.language_modeling import LanguageModeling
from minigpt.train.objective import SetupContext
from minigpt.train.sequences import FrozenReference

KL_DIRECTIONS = ("forward", "reverse")
TEACHER_IMPORT_DIR = "teacher_from_hf"
"""Where, inside the run directory, a Hugging Face teacher is converted (once, named by its content)."""


@dataclass
class DistillOptions:
    """`--mode distill`'s and `--mode distill-sft`'s own flags."""

    teacher: str = option("distill: the teacher model: a run directory, its final/, or a Hugging Face Llama "
                          "directory; it must use the student's tokenizer (a student from random init takes "
                          "the teacher's)", default="")
    distill_temperature: float = option("distill: softmax temperature T of both distributions in the KL term "
                                        "(multiplied by T^2); above 1 the teacher's smaller probabilities count "
                                        "more", default=1.0)
    distill_alpha: float = option("distill: weight of the KL term; 1 - alpha weighs the cross-entropy on the "
                                  "data's next tokens (0: cross-entropy only, 1: the teacher only)", default=0.5)
    distill_kl: str = option("distill: forward = KL(teacher || student), the student covers everything the teacher "
                             "deems likely; reverse = KL(student || teacher), the student concentrates on the "
                             "teacher's likeliest tokens", default="forward")

    def __post_init__(self) -> None:
        if not self.teacher:
            raise ConfigError(_("--mode distill and distill-sft need --teacher DIR (a run directory, its final/, or a Hugging Face "
                                "Llama directory)"))
        check_positive(self, "distill_temperature")
        check_interval(self, "distill_alpha", 0, 1)
        check_choice(self, "distill_kl", KL_DIRECTIONS)


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                    direction: str = "forward") -> torch.Tensor:
    """(N,) fp32 per-position KL between the temperature-T softmaxes, times T^2: forward is
    KL(teacher || student), reverse KL(student || teacher)."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if direction == "reverse":
        student, teacher = teacher, student  # KL(p || q) with p the student's distribution
    kl = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)  # sum p_t (log p_t - log p_s)
    return kl * temperature ** 2


def teacher_directory(teacher: str, run_dir: Path) -> Path:
    """The consolidated directory of `--teacher`: itself, a run directory's final/, or a Hugging Face Llama
    directory converted once into `<run>/teacher_from_hf/`."""
    from minigpt.interop.common import is_hf_llama_dir
    from minigpt.weights import FINAL_DIR, WEIGHTS_FILE, model_directory

    path = Path(teacher)
    if is_hf_llama_dir(path):
        from minigpt.interop.hf_llama import imported_init_dir

        # Converting builds a model (random init): the student's own initialisation must not depend on it.
        with torch.random.fork_rng(devices=[]):
            return imported_init_dir(path, run_dir / TEACHER_IMPORT_DIR)
    directory = model_directory(path)
    if not (directory / WEIGHTS_FILE).is_file():
        raise ConfigError(_("--teacher {path}: no consolidated weights ({weights}) there or in {final}, and not a "
                            "Hugging Face Llama directory").format(path=teacher, weights=WEIGHTS_FILE,
                                                                    final=path / FINAL_DIR))
    return directory


def check_teacher_tokenizer(teacher: str, teacher_tokenizer, student_tokenizer) -> None:
    """Refuse a teacher whose tokenizer (None: it saved none) is not the student's, compared by checksum."""
    if teacher_tokenizer is None or teacher_tokenizer.checksum != student_tokenizer.checksum:
        raise ConfigError(_("--teacher {path}: its tokenizer (checksum {teacher}) is not the student's ({student}, "
                            "checksum {checksum}); distillation compares distributions over the same tokens, so "
                            "the student must use the teacher's tokenizer (start it from random init without "
                            "--tokenizer, or from weights trained with that tokenizer)").format(
            path=teacher, teacher=teacher_tokenizer.checksum[:12] if teacher_tokenizer else _("none saved"),
            student=student_tokenizer.directory, checksum=student_tokenizer.checksum[:12]))


class Distillation(LanguageModeling):
    """`--mode distill`: a student from random init (or --init-from) learns the teacher's next-token
    distributions on pretraining text, mixed with the data's own next tokens."""

    dataset_kind = "pretrain"
    options = DistillOptions
    previous_stages = ()
    eval_sums = ("loss_sum", "tokens", "bytes", "kl_sum")
    mixes_sources = True

    def __init__(self, teacher: str, temperature: float = 1.0, alpha: float = 0.5, direction: str = "forward",
                 byte_lengths: torch.Tensor | None = None):
        super().__init__(byte_lengths)
        self.teacher_path, self.temperature, self.alpha, self.direction = teacher, temperature, alpha, direction
        self.teacher: torch.nn.Module | None = None

    @classmethod
    def from_options(cls, options: DistillOptions, tokenizer) -> Distillation:
        return cls(options.teacher, options.distill_temperature, options.distill_alpha, options.distill_kl,
                   token_byte_lengths(tokenizer))

    @classmethod
    def required_tokenizer(cls, options: DistillOptions, run_dir: Path) -> Path | None:
        """The teacher's directory: its tokenizer is the one a fresh student must learn in."""
        return teacher_directory(options.teacher, run_dir)

    @classmethod
    def plan(cls, options: DistillOptions, run_dir: Path, tokenizer_dir: Path | str | None,
             positions: int) -> list[str]:
        """The teacher: where it is read from, its size and what it adds to every rank's memory (replicated:
        fp32 weights, and its logits of a micro-batch); refused as `setup` refuses it."""
        from minigpt.tokenizer import Tokenizer
        from minigpt.weights import read_consolidated_tokenizer

        directory = teacher_directory(options.teacher, run_dir)
        config, teacher_tokenizer = read_consolidated_tokenizer(directory)
        if tokenizer_dir is not None:
            check_teacher_tokenizer(options.teacher, teacher_tokenizer, Tokenizer(tokenizer_dir))
        params = config.num_params()
        return [_("teacher         {path}: {params:,} parameters, {layers} layers; on every rank (replicated under "
                  "DeepSpeed) {weights:.1f} MB of fp32 weights, plus its forward pass without gradients (logits of "
                  "a micro-batch: up to {logits:.1f} MB in fp32)").format(
            path=directory, params=params, layers=config.num_layers, weights=4 * params / 2**20,
            logits=4 * positions * config.vocab_size / 2**20)]

    def setup(self, context: SetupContext) -> None:
        """Load the teacher, frozen, on this rank's device; refuse it when its tokenizer is not the run's."""
        super().setup(context)
        from minigpt.weights import load_consolidated

        directory = teacher_directory(self.teacher_path, context.run_dir)
        engine = context.engine
        model, tokenizer = load_consolidated(directory, device=engine.device)
        check_teacher_tokenizer(self.teacher_path, tokenizer, context.tokenizer)
        model.requires_grad_(False)
        self.teacher = FrozenReference(model, engine.device, engine.precision).eval()
        if engine.is_main:
            print(_("[minigpt] distill: teacher {path} ({params:,} parameters, {layers} layers), {direction} KL at "
                    "temperature {temperature:g}, alpha {alpha:g}").format(
                path=directory, params=sum(p.numel() for p in model.parameters()), layers=model.config.num_layers,
                direction=self.direction, temperature=self.temperature, alpha=self.alpha), flush=True)

    def _student_and_kl(self, model, batch: dict[str, torch.Tensor]
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The student's (N, vocab) logits, the (N,) labels, the per-position KL (0 where untrained) and the
        mask of trained positions; the teacher runs at the same positions, without gradients."""
        if self.teacher is None:
            raise RuntimeError(_("distill has no teacher: setup() was not called before training"))
        logits, labels = self._logits_and_labels(model, batch)
        with torch.no_grad():
            teacher_logits, _labels = self._logits_and_labels(self.teacher, batch)
        kept = labels != IGNORE_INDEX
        kl = torch.where(kept, distillation_kl(logits, teacher_logits, self.temperature, self.direction), 0.0)
        return logits, labels, kl, kept

    def _terms(self, model, batch: dict[str, torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-position (N,) cross-entropy and KL, the (N,) labels and the mask of trained positions."""
        logits, labels, kl, kept = self._student_and_kl(model, batch)
        cross_entropy = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="none")
        return cross_entropy, kl, labels, kept

    def loss(self, engine, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        logits, labels, kl, kept = self._student_and_kl(engine, batch)
        count = kept.sum().clamp(min=1)  # a micro-batch with no trained token gives 0, not NaN
        # Summed as pretraining sums it: with --distill-alpha 0 a run trains bitwise as --mode pretrain/sft.
        lm_loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum") / count
        kl_loss = kl.sum() / count
        loss = self.alpha * kl_loss + (1.0 - self.alpha) * lm_loss
        stats = {"lm_loss": lm_loss.item(), "kl_loss": kl_loss.item()}
        return self.add_model_losses(engine, loss, stats, "distill_loss")  # a mixture of experts' load balancing

    @torch.no_grad()
    def eval_batch(self, model, batch: dict[str, torch.Tensor], sums: MetricSums) -> None:
        cross_entropy, kl, labels, kept = self._terms(model, batch)
        sums.add("loss_sum", cross_entropy[kept].double().sum().item())
        sums.add("kl_sum", kl.double().sum().item())
        sums.add("tokens", kept.sum().item())
        if self.byte_lengths is not None:
            sums.add("bytes", self.byte_lengths[labels[kept].cpu()].sum().item())

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """val_loss and val_bpb: the student's cross-entropy on the data (comparable with pretrain's and sft's);
        val_kl: the KL term as trained (temperature, direction, times T^2), per trained token."""
        return {**super().metrics(sums), "val_kl": sums["kl_sum"] / max(sums["tokens"], 1.0)}


class SFTDistillation(Distillation):
    """`--mode distill-sft`: the same loss on the assistant's tokens of chat conversations only; the teacher
    is typically an SFT model, the student a smaller pretrained (or distilled) one."""

    dataset_kind = "sft"
    previous_stages = ("distill", "pretrain")
    chat_samples = True
    logits_where_labelled = True
