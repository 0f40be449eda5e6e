"""Model configuration: the `MiniGPTConfig` dataclass, named presets, and validation.

The dataclass is the single source of truth: it is what presets return, what `config.json` beside
consolidated weights holds, and what the training snapshot records.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from minigpt.data.mixture import MixtureError, parse_mixture
from minigpt.fsutil import atomic_write_text
from minigpt.i18n import _
from minigpt.modes import mode_names, objective_class


class ConfigError(ValueError):
    """A configuration that cannot build what it describes; the message names the field."""


SIZE_LIMITS = {"vocab_size": 1 << 24, "hidden_size": 1 << 16, "num_layers": 1024, "num_heads": 1 << 12,
               "num_kv_heads": 1 << 12, "ffn_hidden_size": 1 << 18, "max_seq_len": 1 << 16}
"""Largest value of each size field: far beyond a small GPT, small enough that a typo in a config.json
(num_layers 1000000000) fails by name instead of hanging while the model is built."""


@dataclass
class MiniGPTConfig:
    """Shape of a MiniGPT decoder. Sizes are validated by `validate()` (called on construction)."""

    vocab_size: int = 4096
    """Number of token ids; must match the tokenizer the model is trained with."""
    hidden_size: int = 128
    """Width of the residual stream."""
    num_layers: int = 4
    """Number of transformer blocks."""
    num_heads: int = 4
    """Query heads per attention layer; must divide `hidden_size`."""
    num_kv_heads: int = 4
    """Key/value heads (grouped-query attention); must divide `num_heads`. Equal to heads = plain MHA."""
    ffn_hidden_size: int = 352
    """Inner width of the SwiGLU feed-forward block."""
    max_seq_len: int = 256
    """Longest sequence (prompt + generated) the model accepts; RoPE tables are built to this length."""
    rope_theta: float = 10000.0
    """Base of the rotary embedding frequencies."""
    norm_eps: float = 1e-5
    """Epsilon of RMSNorm."""
    dropout: float = 0.0
    """Dropout on attention weights and residual branches during training."""
    tie_embeddings: bool = True
    """Share the input embedding matrix with the output projection."""
    # Mixture of experts (docs/training.md#mixture-of-experts). num_experts 0 is the dense model; the other
    # MoE fields are read only when it is positive, so a dense config.json without them loads unchanged.
    num_experts: int = 0
    """Routed SwiGLU experts per feed-forward layer (each `ffn_hidden_size` wide); 0: a dense feed-forward."""
    experts_per_token: int = 2
    """Routed experts each token goes to (top-k of the router's softmax)."""
    num_shared_experts: int = 0
    """Experts every token always goes through, beside the routed ones (DeepSeek-style shared experts)."""
    moe_aux_loss_weight: float = 0.01
    """Weight of the load-balancing loss (Switch/GShard, DeepSpeed's `l_aux`; 1.0 = perfectly balanced)."""
    moe_z_loss_weight: float = 0.0
    """Weight of the router z-loss (ST-MoE: mean squared log-sum-exp of the router logits); 0: off."""
    moe_capacity_factor: float = 0.0
    """0: no token is ever dropped. Above 0: each expert takes at most ceil(tokens x k x factor / experts)
    tokens of a forward pass and the rest skip it (DeepSpeed's capacity; needs experts_per_token >= 2)."""

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def validate(self) -> None:
        """Raise `ConfigError` naming the first field that cannot build a model."""
        for name, limit in SIZE_LIMITS.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(_("MiniGPTConfig.{name} must be a positive integer, got {value!r}").format(
                    name=name, value=value))
            if value > limit:
                raise ConfigError(_("MiniGPTConfig.{name} must be at most {limit:,}, got {value:,}").format(
                    name=name, limit=limit, value=value))
        if self.hidden_size % self.num_heads:
            raise ConfigError(_("MiniGPTConfig.num_heads={heads} does not divide hidden_size={hidden}").format(
                heads=self.num_heads, hidden=self.hidden_size))
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(_("MiniGPTConfig.num_kv_heads={kv_heads} does not divide num_heads={heads}").format(
                kv_heads=self.num_kv_heads, heads=self.num_heads))
        if self.head_dim % 2:
            raise ConfigError(_("head dimension hidden_size/num_heads={head_dim} must be even for rotary "
                                "embeddings").format(head_dim=self.head_dim))
        if not (_is_number(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise ConfigError(_("MiniGPTConfig.dropout must be in [0, 1), got {value!r}").format(value=self.dropout))
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if not (_is_number(value) and 0 < value < math.inf):
                raise ConfigError(_("MiniGPTConfig.{name} must be a positive number, got {value!r}").format(
                    name=name, value=value))
        if not isinstance(self.tie_embeddings, bool):
            raise ConfigError(_("MiniGPTConfig.tie_embeddings must be true or false, got {value!r}").format(
                value=self.tie_embeddings))
        self._validate_moe()

    def _validate_moe(self) -> None:
        for name in ("num_experts", "experts_per_token", "num_shared_experts"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 1024:
                raise ConfigError(_("MiniGPTConfig.{name} must be an integer from 0 to 1024, got {value!r}").format(
                    name=name, value=value))
        for name in ("moe_aux_loss_weight", "moe_z_loss_weight", "moe_capacity_factor"):
            value = getattr(self, name)
            if not (_is_number(value) and 0 <= value < math.inf):
                raise ConfigError(_("MiniGPTConfig.{name} must be a number >= 0, got {value!r}").format(
                    name=name, value=value))
        if not self.num_experts:
            return
        if not 1 <= self.experts_per_token <= self.num_experts:
            raise ConfigError(_("MiniGPTConfig.experts_per_token={top_k} must be from 1 to "
                                "num_experts={experts}").format(top_k=self.experts_per_token, experts=self.num_experts))
        if self.moe_capacity_factor and self.experts_per_token == 1:
            raise ConfigError(_("MiniGPTConfig.moe_capacity_factor > 0 needs experts_per_token >= 2 (with top-1, "
                                "DeepSpeed picks the dropped tokens in an order the plain model cannot reproduce); "
                                "use 0 (no dropping)"))

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> MiniGPTConfig:
        """Build from a dict, refusing unknown keys (a typo must not silently fall back to a default)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(_("{source}: unknown model config field(s) {unknown}; known: {known}").format(
                source=source, unknown=unknown, known=sorted(known)))
        return cls(**data)

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> MiniGPTConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise
        except json.JSONDecodeError as err:
            raise ConfigError(_("{path}: not valid JSON ({error})").format(path=path, error=err)) from err
        return cls.from_dict(data, source=str(path))

    def num_params(self) -> int:
        """Exact parameter count of the model this config builds (tied embeddings counted once)."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        attn = h * h + 2 * h * kv + h * h
        mlp = 3 * h * self.ffn_hidden_size * (self.num_experts + self.num_shared_experts if self.num_experts else 1)
        block = attn + mlp + 2 * h + (h * self.num_experts)  # + the router
        embed = self.vocab_size * h * (1 if self.tie_embeddings else 2)
        return embed + self.num_layers * block + h

    def active_params(self) -> int:
        """Parameters one token goes through: the dense count, or a MoE model with only its top-k routed
        experts (plus shared experts and the router) counted."""
        idle = self.num_experts - self.experts_per_token if self.num_experts else 0
        return self.num_params() - self.num_layers * idle * 3 * self.hidden_size * self.ffn_hidden_size

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6 x matmul params + attention (PaLM appendix B);
        a MoE model counts its active parameters (the experts a token is routed to)."""
        t = seq_len or self.max_seq_len
        norms = self.num_layers * 2 * self.hidden_size + self.hidden_size
        # The input lookup is no matmul; a tied matrix still does the output projection, so it counts once.
        lookup = 0 if self.tie_embeddings else self.vocab_size * self.hidden_size
        matmul_params = self.active_params() - norms - lookup
        return 6.0 * matmul_params + 12.0 * self.num_layers * self.hidden_size * t


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


PRESETS: dict[str, MiniGPTConfig] = {
    # ~1.3M parameters: trains on a laptop CPU in minutes.
    "tiny": MiniGPTConfig(vocab_size=4096, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                          ffn_hidden_size=352, max_seq_len=256),
    # ~26M parameters.
    "small": MiniGPTConfig(vocab_size=16384, hidden_size=512, num_layers=6, num_heads=8, num_kv_heads=4,
                           ffn_hidden_size=1408, max_seq_len=512),
    # ~100M parameters.
    "medium": MiniGPTConfig(vocab_size=32000, hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4,
                            ffn_hidden_size=2048, max_seq_len=1024),
    # ~1.4M parameters: the tinyshakespeare quality recipe (bench/recipes/shakespeare.json, 1024-token BPE).
    "shakespeare": MiniGPTConfig(vocab_size=1024, hidden_size=160, num_layers=4, num_heads=4, num_kv_heads=4,
                                 ffn_hidden_size=432, max_seq_len=256),
    # The quick-start guide's dense presets; a 6400-token vocabulary keeps small_30m at the ~30M parameters
    # of its name (the vocabulary follows the tokenizer anyway).
    "small_30m": MiniGPTConfig(vocab_size=6400, hidden_size=384, num_layers=13, num_heads=12, num_kv_heads=3,
                               ffn_hidden_size=1408, max_seq_len=2048),
    "foundation": MiniGPTConfig(vocab_size=6400, hidden_size=768, num_layers=24, num_heads=16, num_kv_heads=4,
                                ffn_hidden_size=2688, max_seq_len=4096),
    "large": MiniGPTConfig(vocab_size=6400, hidden_size=768, num_layers=32, num_heads=24, num_kv_heads=6,
                           ffn_hidden_size=3072, max_seq_len=4096),
    # Mixture of experts: 4 routed SwiGLU experts, top-2, plus 1 shared expert in every layer.
    "moe": MiniGPTConfig(vocab_size=16384, hidden_size=384, num_layers=12, num_heads=12, num_kv_heads=3,
                         ffn_hidden_size=1536, max_seq_len=1024, num_experts=4, experts_per_token=2,
                         num_shared_experts=1, moe_aux_loss_weight=0.1),
    # The same routing at `tiny`'s scale, for tests and laptops (active FFN width 3 x 128 ~ tiny's 352).
    "tiny-moe": MiniGPTConfig(vocab_size=4096, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                              ffn_hidden_size=128, max_seq_len=256, num_experts=4, experts_per_token=2,
                              num_shared_experts=1, moe_aux_loss_weight=0.1),
}


def get_config(name: str, **overrides: Any) -> MiniGPTConfig:
    """A fresh copy of preset `name`, with field overrides applied and validated."""
    if name not in PRESETS:
        raise ConfigError(_("unknown model preset {name!r}; choose one of {presets}").format(
            name=name, presets=sorted(PRESETS)))
    return dataclasses.replace(PRESETS[name], **overrides)


def preset_table() -> str:
    """Human-readable table of the presets with their exact parameter counts."""
    width = max(len(name) for name in ["preset", *PRESETS])
    rows = [f"{'preset':<{width}} {'params':>12} {'hidden':>6} {'layers':>6} {'heads':>5} {'kv':>3} "
            f"{'ffn':>5} {'vocab':>6} {'seq':>5}"]
    for name, c in PRESETS.items():
        rows.append(f"{name:<{width}} {c.num_params():>12,} {c.hidden_size:>6} {c.num_layers:>6} {c.num_heads:>5} "
                    f"{c.num_kv_heads:>3} {c.ffn_hidden_size:>5} {c.vocab_size:>6} {c.max_seq_len:>5}")
    return "\n".join(rows)


_DURATION_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}


def parse_duration(text: str, field: str = "--max-time") -> float:
    """Seconds in a duration such as `90s`, `2m`, `1h30m`, `1.5h`, `2d` or Slurm's `[D-]H:MM:SS` / `MM:SS`.

    A bare number is refused: Slurm reads it as minutes, most people as seconds, so it must say which."""
    value = text.strip().lower()
    seconds: float | None = None
    if re.fullmatch(r"(\d+-)?\d+(:\d{1,2}){1,2}", value):  # [D-]H:MM:SS or MM:SS, as sbatch --time writes
        days, _dash, clock = value.rpartition("-")
        parts = [int(p) for p in clock.split(":")]
        while len(parts) < 3:
            parts.insert(0, 0)
        hours, minutes, secs = parts
        seconds = int(days or 0) * 86400 + hours * 3600 + minutes * 60 + secs
    elif re.fullmatch(r"(\d+(\.\d+)?[dhms])+", value):
        seconds = sum(float(number) * _DURATION_UNITS[unit]
                      for number, unit in re.findall(r"(\d+(?:\.\d+)?)([dhms])", value))
    elif re.fullmatch(r"\d+(\.\d+)?", value):
        raise ConfigError(_("{field} {text!r}: give a unit (e.g. {text}s or {text}m) or H:MM:SS; a bare number is "
                            "ambiguous").format(field=field, text=text))
    if seconds is None or not math.isfinite(seconds):
        raise ConfigError(_("{field} {text!r}: not a duration; write e.g. 90s, 2m, 1h30m or 1:30:00").format(
            field=field, text=text))
    if seconds <= 0:
        raise ConfigError(_("{field} {text!r}: must be longer than zero").format(field=field, text=text))
    return float(seconds)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
COMPILE_CHOICES = ("auto", "on", "off")
DATA_SUFFIXES = (".gz", ".jsonl", ".json", ".txt", ".parquet")


def option(help_text: str, *, flag: str = "", **kwargs: Any) -> Any:
    """A config dataclass field whose help text also drives the command line (one source for both).

    `flag`: its command-line flag when not the field name dashed (`sources` is `--data`); `const`: the value
    of the flag given without one (`--compile` = `--compile on`)."""
    const = kwargs.pop("const", None)
    metadata = {"help": help_text, **({"const": const} if const else {}), **({"flag": flag} if flag else {})}
    return dataclasses.field(metadata=metadata, **kwargs)


def flag_of(field: dataclasses.Field) -> str:
    """The command-line flag of a config field: `max_steps` -> `--max-steps` (or the field's own `flag`)."""
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def key_of(field: dataclasses.Field) -> str:
    """The flat name of a config field (its flag without dashes, `_` for `-`): the argparse destination and the
    keyword `TrainConfig.of` takes."""
    return flag_of(field)[2:].replace("-", "_")


def check_positive(section: Any, *names: str) -> None:
    for name in names:
        if not getattr(section, name) > 0:
            raise ConfigError(_("{flag} must be positive, got {value}").format(
                flag=_flag_named(section, name), value=getattr(section, name)))


def check_not_negative(section: Any, *names: str) -> None:
    for name in names:
        if getattr(section, name) < 0:
            raise ConfigError(_("{flag} must not be negative, got {value}").format(
                flag=_flag_named(section, name), value=getattr(section, name)))


def check_at_least(section: Any, **least: int) -> None:
    for name, bound in least.items():
        if getattr(section, name) < bound:
            raise ConfigError(_("{flag} must be at least {least}, got {value}").format(
                flag=_flag_named(section, name), least=bound, value=getattr(section, name)))


def check_choice(section: Any, name: str, choices: Sequence[str]) -> None:
    value = getattr(section, name)
    if value not in choices:
        raise ConfigError(_("{flag} must be one of {choices}, got {value!r}").format(
            flag=_flag_named(section, name), choices=", ".join(choices), value=value))


def check_interval(section: Any, name: str, low: float, high: float, *, open_high: bool = False) -> None:
    value = getattr(section, name)
    if not (low <= value < high if open_high else low <= value <= high):
        raise ConfigError(_("{flag} must be in {interval}, got {value}").format(
            flag=_flag_named(section, name), interval=f"[{low:g}, {high:g}{')' if open_high else ']'}", value=value))


def _flag_named(section: Any, name: str) -> str:
    return flag_of(next(f for f in fields(section) if f.name == name))


def data_name(data: list[str]) -> str:
    """A run-directory name for `--data`: the first entry's file or directory name without its data suffixes,
    `+N` for N more (`zh_classics.jsonl a.txt` -> `zh_classics+1`); a mixture's source names joined by `+`
    (`web=...:0.7 books=...:0.3` -> `web+books`)."""
    try:
        mixture = parse_mixture(data)
    except MixtureError:
        mixture = []
    if mixture:
        return "+".join(source.name for source in mixture)
    name = Path(data[0].rstrip("/\\")).name
    for suffix in DATA_SUFFIXES:
        name = name.removesuffix(suffix)
    name = re.sub(r"[^\w.+-]+", "-", name).strip("-.") or "data"
    return name + (f"+{len(data) - 1}" if len(data) > 1 else "")


def default_run_dir(mode: str, config: str, data: list[str]) -> Path:
    """`checkpoints/<mode>_<config>` (the built-in demo data) or `checkpoints/<mode>_<config>_<data name>`."""
    return Path("checkpoints") / (f"{mode}_{config}" + (f"_{data_name(data)}" if data else ""))


@dataclass
class ModelSection:
    """The model trained: its shape and the weights it starts from."""

    preset: str = option(f"model preset ({', '.join(PRESETS)})", flag="--config", default="tiny")
    init_from: str = option("consolidated weights, run directory or Hugging Face Llama directory to start from",
                            default="")
    dropout: float = option("dropout during training", default=0.0)

    def __post_init__(self) -> None:
        check_choice(self, "preset", sorted(PRESETS))


LORA_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
"""The projections LoRA can adapt, by our module names (the default: all of them)."""
LORA_HF_ALIASES = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
                   "up_proj": "gate_up_proj"}
"""Hugging Face Llama names of parts of a fused projection: each selects the whole fused one."""


def lora_targets(names: list[str]) -> list[str]:
    """Our module names for `--lora-targets` (empty: every projection); an unknown name is a ConfigError."""
    if not names:
        return list(LORA_TARGETS)
    chosen = []
    for name in names:
        target = LORA_HF_ALIASES.get(name, name)
        if target not in LORA_TARGETS:
            raise ConfigError(_("--lora-targets {name!r} is no projection of the model; choose from {targets} (or "
                                "their Llama names {aliases})").format(
                name=name, targets=", ".join(LORA_TARGETS), aliases=", ".join(LORA_HF_ALIASES)))
        if target not in chosen:
            chosen.append(target)
    return chosen


@dataclass
class AdapterSection:
    """LoRA: train low-rank adapters on a frozen model instead of every weight (any mode but from-scratch
    pretraining; `minigpt/lora.py`)."""

    lora_rank: int = option("LoRA: rank of the adapters trained on the frozen model's projections (0: off, every "
                            "weight trains); final/ holds the merged weights and final/adapter/ the adapter in "
                            "PEFT's format (needs pip install -e \".[lora]\")", default=0)
    lora_alpha: float = option("LoRA: scale numerator; the adapter's update is multiplied by alpha/rank (0: twice the "
                               "rank)", default=0.0)
    lora_dropout: float = option("LoRA: dropout on the adapters' input", default=0.0)
    lora_targets: list[str] = option("LoRA: projections to adapt, of qkv_proj, o_proj, gate_up_proj, down_proj "
                                     "(Llama's q_proj/k_proj/v_proj and gate_proj/up_proj select the fused "
                                     "projection they are part of); default: all four", default_factory=list)
    lora_init: str = option("LoRA: start the adapters from this PEFT adapter directory (a LoRA run's final/adapter) "
                            "instead of zero, with its rank, alpha and targets; --init-from must be the base it was "
                            "trained on (checked)", default="")

    def __post_init__(self) -> None:
        check_not_negative(self, "lora_rank", "lora_alpha")
        check_interval(self, "lora_dropout", 0, 1, open_high=True)
        if self.lora_rank == 0 and not self.lora_init and (self.lora_alpha or self.lora_dropout or self.lora_targets):
            raise ConfigError(_("--lora-alpha, --lora-dropout and --lora-targets shape LoRA adapters: give "
                                "--lora-rank too"))
        lora_targets(self.lora_targets)

    @property
    def enabled(self) -> bool:
        return self.lora_rank > 0 or bool(self.lora_init)

    @property
    def alpha(self) -> float:
        """The scale numerator in force: --lora-alpha, or twice the rank."""
        return self.lora_alpha or 2.0 * self.lora_rank


@dataclass
class DataSection:
    """What the run trains on: sources, tokenizer, sequence length, and the raw-file build (validation share,
    cleaning)."""

    sources: list[str] = option("shard directories, raw .txt/.jsonl/.parquet files, or a built-in corpus: demo:en "
                                "(the default), demo:zh; a weighted mixture gives each source as NAME=PATH:WEIGHT "
                                "(--data web=shards/web:0.7 --data books=books.jsonl:0.3: shares of the tokens)",
                                flag="--data", default_factory=list)
    data_dir: str = option("where relative --data names are looked up when the working directory has no such "
                           "name (then $MINIGPT_DATA_DIR); also holds the cache of tokenized raw files",
                           default="data")
    tokenizer: str = option("tokenizer directory; default: <out>/tokenizer, trained on the data if missing",
                            default="")
    retrain_tokenizer: bool = option("train a new tokenizer even if one exists", default=False)
    allow_low_coverage: bool = option("train even when the tokenizer has pieces for under 90 percent of the "
                                      "training data's characters (the rest reach the model as UTF-8 bytes)",
                                      default=False)
    vocab_size: int = option("vocabulary size when a tokenizer is trained (0: the preset's)", default=0)
    seq_len: int = option("training sequence length (0: the preset's max_seq_len)", default=0)
    val_fraction: float = option("share of documents held out for validation when raw files are tokenized",
                                 default=0.05)
    dedup: bool = option("raw files: drop records whose normalised text an earlier record had", default=False)
    min_chars: int = option("raw files, pretrain: drop documents shorter than this many characters (0: off)",
                            default=0)
    max_repeated_lines: float = option("raw files, pretrain: drop documents whose share of lines repeating an "
                                       "earlier line is above this (1: off)", default=1.0)

    def __post_init__(self) -> None:
        check_not_negative(self, "seq_len", "vocab_size", "min_chars")
        check_interval(self, "val_fraction", 0, 1, open_high=True)
        check_interval(self, "max_repeated_lines", 0, 1)
        try:
            parse_mixture(self.sources)
        except MixtureError as err:
            raise ConfigError(str(err)) from None

    @property
    def filters_documents(self) -> bool:
        """Whether a pretraining-only document filter (--min-chars, --max-repeated-lines) is on."""
        return bool(self.min_chars or self.max_repeated_lines < 1.0)


@dataclass
class OptimSection:
    """The optimizer step: batch, AdamW and clipping."""

    batch_size: int = option("micro-batch size per data-parallel rank", default=16)
    grad_accum: int = option("micro-batches accumulated per optimizer step", default=1)
    learning_rate: float = option("peak learning rate", default=1e-3)
    weight_decay: float = option("AdamW weight decay on matrices", default=0.1)
    beta1: float = option("AdamW beta1", default=0.9)
    beta2: float = option("AdamW beta2", default=0.95)
    grad_clip: float = option("clip the global gradient norm to this (0: off)", default=1.0)

    def __post_init__(self) -> None:
        check_positive(self, "batch_size", "grad_accum", "learning_rate")
        check_not_negative(self, "grad_clip", "weight_decay")


@dataclass
class ScheduleSection:
    """How long the run trains and how the learning rate moves."""

    max_steps: int = option("optimizer steps to train", default=1000)
    warmup_steps: int = option("linear warmup steps", default=100)
    min_lr_ratio: float = option("final learning rate as a fraction of the peak (cosine decay)", default=0.1)
    max_time: str = option("wall-clock budget, counted across resumes: e.g. 90s, 2m, 1h30m or Slurm's 1:30:00. "
                           "Training stops at --max-steps or when the budget (less the time its final "
                           "evaluation, checkpoint and consolidation take) is used, whichever comes first; the "
                           "LR decay follows the share used of whichever is further along", default="")

    def __post_init__(self) -> None:
        check_positive(self, "max_steps")
        check_not_negative(self, "warmup_steps")
        check_interval(self, "min_lr_ratio", 0, 1)
        if self.max_time:
            parse_duration(self.max_time)

    @property
    def max_time_seconds(self) -> float | None:
        """The --max-time budget in seconds, or None without one."""
        return parse_duration(self.max_time) if self.max_time else None

    def warnings(self) -> list[str]:
        found = []
        if self.warmup_steps > self.max_steps // 2:
            consequence = (_("never reaches its peak") if self.warmup_steps >= self.max_steps
                           else _("barely decays"))
            found.append(_("--warmup-steps {warmup} is more than half of --max-steps {steps}: the learning rate "
                           "{consequence}; lower --warmup-steps (a few percent of the steps is usual)").format(
                warmup=self.warmup_steps, steps=self.max_steps, consequence=consequence))
        return found


@dataclass
class EngineSection:
    """Where and how the steps run: device, precision, DeepSpeed, compilation, input pipeline."""

    device: str = option("cpu, cuda, cuda:N or mps; default: auto-detect", default="")
    precision: str = option("auto, fp32, bf16 or fp16 (auto: bf16 on a GPU or CPU with native bf16 — "
                            "avx512_bf16/AMX, Arm bf16 — else fp32; a resumed run keeps the precision it started "
                            "with)", default="auto")
    ds_config: str = option("DeepSpeed JSON config (ZeRO stage, offload); used when run under deepspeed",
                            default="")
    ep_size: int = option("DeepSpeed, mixture-of-experts models: expert-parallel ranks each MoE layer's experts are "
                          "spread over (it must divide the world size and the expert count; 0: the largest number "
                          "that divides both)", default=0)
    dist_timeout: int = option("seconds a rank waits in a collective for the other ranks before it fails (a lost "
                               "node or a hung rank); longer than any rank's pause between collectives (a save, "
                               "an evaluation)", default=600)
    compile: str = option("torch.compile the model (plain engine): auto (compiled when the run asks for 2000+ "
                          "steps and any --max-time is 10 minutes or more, except bf16 on a CPU; decided from these "
                          "facts alone, never from timings; skipped where it cannot work), on (--compile alone) "
                          "or off", default="auto", const="on")
    prefetch: int = option("training steps whose batches a background thread assembles ahead while the current "
                           "step computes (pinned memory on CUDA); 0: each step reads its batches itself",
                           default=2)
    activation_checkpointing: bool = option("recompute each block's activations during the backward pass instead "
                                            "of keeping them: far less activation memory (long contexts, big "
                                            "batches) for about one more forward pass of compute; DeepSpeed's "
                                            "activation checkpointing on the DeepSpeed engine, "
                                            "torch.utils.checkpoint on the plain one", default=False)

    def __post_init__(self) -> None:
        check_choice(self, "precision", PRECISIONS)
        check_choice(self, "compile", COMPILE_CHOICES)
        check_not_negative(self, "prefetch", "ep_size")
        check_at_least(self, dist_timeout=1)


@dataclass
class EvaluationSection:
    """What the run measures and says while it trains: evaluations, extra tasks, samples, log lines."""

    eval_interval: int = option("evaluate every N steps (0: only at the end)", default=200)
    eval_batches: int = option("validation micro-batches per evaluation", default=20)
    eval_task: list[str] = option("evaluation task(s) also run at each evaluation, in launch/eval.py's --task "
                                  "syntax (bpb:PATH, mc:PATH, tasks:PATH, options after commas); logged under eval/",
                                  default_factory=list)
    sample_prompt: str = option("prompt sampled at each evaluation; default: the first words of the first "
                                "validation document (pretrain) or its user turn (sft, dpo, rlhf: answered as a "
                                "chat)", default="")
    log_interval: int = option("print a log line every N steps", default=10)

    def __post_init__(self) -> None:
        check_not_negative(self, "eval_interval", "eval_batches")
        check_at_least(self, log_interval=1)
        self.task_specs = self._parse_tasks()

    def _parse_tasks(self) -> list:
        """The --eval-task entries parsed once (`minigpt.evaluation.spec.TaskSpec`s); ConfigError names a bad one."""
        from minigpt.evaluation.spec import TaskSpecError, parse_task_spec

        specs = []
        for entry in self.eval_task:
            try:
                specs.append(parse_task_spec(entry))
            except TaskSpecError as err:
                raise ConfigError(str(err).replace("--task", "--eval-task", 1)) from None
        return specs


@dataclass
class CheckpointSection:
    """Where the run writes and what it continues from."""

    out: str = option("run directory; default checkpoints/<mode>_<config>, with --data "
                      "checkpoints/<mode>_<config>_<name of the first --data>", default="")
    overwrite: bool = option("a fresh run into a run directory that holds another run's checkpoints, final/ "
                             "weights or TensorBoard events deletes them first (without it, such a run is refused); "
                             "the directory's tokenizer/ is kept", default=False)
    resume: str = option("checkpoint directory to resume from exactly, or a run directory (its newest good "
                         "checkpoint)", default="")
    auto_resume: bool = option("resume from the newest checkpoint in <out>/ckpt that verifies (damaged ones are "
                               "skipped, with the reason); start fresh only when there is none", default=False)
    save_interval: int = option("checkpoint every N steps (0: only at the end)", default=500)
    keep_last: int = option("checkpoints to keep", default=3)

    def __post_init__(self) -> None:
        check_not_negative(self, "save_interval")
        check_at_least(self, keep_last=1)
        if self.resume and self.auto_resume:
            raise ConfigError(_("--resume and --auto-resume contradict each other: give one"))

    @property
    def resuming(self) -> bool:
        return bool(self.resume or self.auto_resume)


@dataclass
class NoOptions:
    """The options of a mode that has no flags of its own."""


SECTIONS: dict[str, type] = {"model": ModelSection, "adapter": AdapterSection, "data": DataSection, "optim": OptimSection,
                             "schedule": ScheduleSection, "engine": EngineSection, "evaluation": EvaluationSection,
                             "checkpointing": CheckpointSection}
"""TrainConfig's sections: attribute name -> dataclass. A mode's own flags are the dataclass its objective class
names as `options` (`minigpt.train.objective.Objective.options`), held as `TrainConfig.options`."""


def mode_options_class(mode: str) -> type:
    """The options dataclass of `mode` (its objective class's `options`; imports the objective)."""
    from minigpt.modes import objective_class

    return getattr(objective_class(mode), "options", NoOptions)


def _keys(section: type) -> dict[str, str]:
    """flat name -> field name of a section dataclass."""
    return {key_of(f): f.name for f in fields(section)}


@dataclass
class TrainConfig:
    """Everything a training run needs besides the model shape, in sections (`SECTIONS`) plus the mode's own
    options. Each component takes its section; `launch/train.py`'s flags are the sections' fields (`of` builds
    one from them) and `training_config_snapshot.json` records `to_dict()`, grouped the same way."""

    mode: str = option("training stage: pretrain, sft, dpo, reward (a reward model), rlhf, or distill / distill-sft "
                       "(knowledge distillation from --teacher on text / on conversations)", default="pretrain")
    seed: int = option("random seed", default=1337)
    dry_run: bool = option("validate config, data and DeepSpeed config, print the plan, and exit", default=False)
    model: ModelSection = field(default_factory=ModelSection)
    adapter: AdapterSection = field(default_factory=AdapterSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    engine: EngineSection = field(default_factory=EngineSection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)
    checkpointing: CheckpointSection = field(default_factory=CheckpointSection)
    options: Any = None
    """The mode's own options (its objective's `options` dataclass; defaults when None)."""
    ignored_flags: dict[str, tuple[str, ...]] = field(default_factory=dict, compare=False)
    """Flags of other modes' options that were given (flag -> the modes that take it): ignored, with a warning,
    so one argument list can serve every stage of a chain."""

    TOP_LEVEL = ("mode", "seed", "dry_run")

    def __post_init__(self) -> None:
        if self.mode not in mode_names():
            raise ConfigError(_("{flag} must be one of {choices}, got {value!r}").format(
                flag="--mode", choices=", ".join(mode_names()), value=self.mode))
        if self.options is None:
            self.options = mode_options_class(self.mode)()
        if self.data.filters_documents and objective_class(self.mode).dataset_kind != "pretrain":
            raise ConfigError(_("--min-chars and --max-repeated-lines filter pretraining documents; {kind} data "
                                "takes --dedup only").format(kind=self.mode))

    @classmethod
    def of(cls, **flat: Any) -> TrainConfig:
        """A config from flag names (`TrainConfig.of(mode="sft", max_steps=200, pack=True)`), as the command line
        gives them. A flag of another mode's options is ignored with a warning (`warnings`); one no mode has is
        refused by name."""
        top = {name: flat.pop(name) for name in cls.TOP_LEVEL if name in flat}
        mode = top.get("mode", "pretrain")
        if mode not in mode_names():
            raise ConfigError(_("{flag} must be one of {choices}, got {value!r}").format(
                flag="--mode", choices=", ".join(mode_names()), value=mode))
        sections = {}
        for name, section in SECTIONS.items():
            keys = _keys(section)
            sections[name] = section(**{keys[key]: flat.pop(key) for key in list(flat) if key in keys})
        options_class = mode_options_class(mode)
        keys = _keys(options_class)
        options = options_class(**{keys[key]: flat.pop(key) for key in list(flat) if key in keys})
        owners = {"--" + key.replace("_", "-"): flag_owners(key) for key in sorted(flat)}
        unknown = [flag for flag, modes in owners.items() if not modes]
        if unknown:
            raise ConfigError(_("{flags}: not a training flag").format(flags=", ".join(unknown)))
        return cls(**top, **sections, options=options, ignored_flags=owners)

    def flat(self) -> dict[str, Any]:
        """The flag names and values this config was built from (`TrainConfig.of(**cfg.flat())` == cfg)."""
        values = {name: getattr(self, name) for name in self.TOP_LEVEL}
        for section in [*(getattr(self, name) for name in SECTIONS), self.options]:
            values.update({key_of(f): copy.deepcopy(getattr(section, f.name)) for f in fields(section)})
        return values

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some flags changed (`cfg.replace(max_steps=10, auto_resume=True)`), validated anew."""
        changed = TrainConfig.of(**{**self.flat(), **changes})
        changed.ignored_flags = dict(self.ignored_flags)
        return changed

    def warnings(self) -> list[str]:
        """Settings that are valid but probably not meant: said at start-up, the run goes on."""
        return self.schedule.warnings() + [
            _("{flag} applies to --mode {modes}, not to --mode {mode}: ignored").format(
                flag=flag, modes=", ".join(modes), mode=self.mode) for flag, modes in self.ignored_flags.items()]

    @property
    def run_dir(self) -> Path:
        """--out, else `checkpoints/<mode>_<config>`, named after the data too when --data is given (a run on
        one's own data never lands in the quick start's run directory)."""
        return Path(self.checkpointing.out or default_run_dir(self.mode, self.model.preset, self.data.sources))

    def to_dict(self) -> dict[str, Any]:
        """Grouped as the sections are: `{"mode", "seed", "dry_run", "model": {...}, ..., "<mode>": {options}}`."""
        grouped: dict[str, Any] = {name: getattr(self, name) for name in self.TOP_LEVEL}
        grouped.update({name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS})
        grouped[self.mode] = dataclasses.asdict(self.options)
        return grouped


def flag_owners(key: str) -> tuple[str, ...]:
    """The modes whose options take the flag named `key` (its flat name)."""
    from minigpt.modes import mode_names as modes

    return tuple(mode for mode in modes() if key in _keys(mode_options_class(mode)))


def config_flags() -> list[tuple[str, type, list[dataclasses.Field]]]:
    """The command line's groups: (title, dataclass, fields) for the run itself, each section, and each mode's
    options (every registered mode's, so `--help` lists them all)."""
    from minigpt.modes import mode_names as modes

    groups = [("run", TrainConfig, [f for f in fields(TrainConfig) if f.name in TrainConfig.TOP_LEVEL])]
    groups += [(name, section, list(fields(section))) for name, section in SECTIONS.items()]
    seen: set[type] = set()
    for mode in modes():
        options = mode_options_class(mode)
        if fields(options) and options not in seen:
            seen.add(options)
            groups.append((f"--mode {mode}", options, list(fields(options))))
    return groups
