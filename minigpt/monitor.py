"""Training monitor: per-step metrics to TensorBoard and `metrics.jsonl`, a progress bar, anomaly warnings.

The loop calls `TrainingMonitor.log_step` once per optimizer step. Only the main rank writes (build the
others with `enabled=False`); every rank still gets the computed `StepMetrics` back. Steps are 0-based
optimizer-step indices in `metrics.jsonl` and TensorBoard; a run resumed at `start_step` redoes steps from
there, so lines and TensorBoard events at or after `start_step` left by an earlier attempt are dropped
when the monitor starts. Printed lines count steps done instead (`step 220 val` follows the 220th
update, the one saved as `ckpt/step_0000220`, as in `done: 220 steps`), so the console reads one way.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
from tqdm import tqdm

from minigpt.flops import PEAK_FLOPS_ENV, model_flops_utilization, peak_flops
from minigpt.fsutil import atomic_write_text
from minigpt.i18n import _

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def is_finite(value: float | torch.Tensor) -> bool:
    """True when `value` (a float or a one-element tensor) is neither NaN nor infinite."""
    return math.isfinite(float(value))


@dataclass(frozen=True)
class Anomaly:
    """One thing that looked wrong in a training step."""

    kind: str
    """One of: nonfinite_loss, nonfinite_grad, grad_explosion, grad_vanishing, loss_spike."""
    message: str


@dataclass
class AnomalyDetector:
    """Flags non-finite losses, exploding or vanishing gradient norms and loss spikes.

    Spikes and relative explosions are judged against the last `window` finite values and only once
    `min_history` of them are known, so the fast early fall of the loss is never mistaken for one.
    """

    window: int = 100
    """How many recent losses / grad norms form the reference."""
    min_history: int = 20
    """Values needed before spikes and relative explosions are judged."""
    spike_z: float = 5.0
    """A loss more than this many standard deviations above the window mean is a spike."""
    spike_min_rel_std: float = 0.01
    """Floor on the standard deviation, relative to the mean, so a flat plateau does not flag noise."""
    explosion_factor: float = 10.0
    """A grad norm above this multiple of the window median is an explosion."""
    explosion_abs: float = 1e4
    """A grad norm above this is an explosion whatever the history."""
    vanishing_abs: float = 1e-8
    """A grad norm below this has vanished."""
    _losses: deque[float] = field(init=False, repr=False)
    _grad_norms: deque[float] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.window < 2 or not 1 <= self.min_history <= self.window:
            raise ValueError(_("AnomalyDetector needs window >= 2 and 1 <= min_history <= window, got "
                               "window={window}, min_history={min_history}").format(
                window=self.window, min_history=self.min_history))
        self._losses = deque(maxlen=self.window)
        self._grad_norms = deque(maxlen=self.window)

    def check(self, loss: float, grad_norm: float) -> list[Anomaly]:
        """Anomalies of one step; finite values then join the reference window."""
        return self._check_loss(float(loss)) + self._check_grad_norm(float(grad_norm))

    def _check_loss(self, loss: float) -> list[Anomaly]:
        if not is_finite(loss):
            return [Anomaly("nonfinite_loss", _("loss is {loss}").format(loss=loss))]
        found = []
        if len(self._losses) >= self.min_history:
            mean = statistics.fmean(self._losses)
            std = max(statistics.pstdev(self._losses, mean), self.spike_min_rel_std * abs(mean))
            if loss > mean + self.spike_z * std:
                found.append(Anomaly("loss_spike", _("loss {loss:.4g} is {sigmas:.1f} std above the mean {mean:.4g} "
                                                     "of the last {steps} steps").format(
                    loss=loss, sigmas=(loss - mean) / std, mean=mean, steps=len(self._losses))))
        self._losses.append(loss)
        return found

    def _check_grad_norm(self, grad_norm: float) -> list[Anomaly]:
        if not is_finite(grad_norm):
            return [Anomaly("nonfinite_grad", _("grad norm is {grad_norm}").format(grad_norm=grad_norm))]
        found = []
        if grad_norm > self.explosion_abs:
            found.append(Anomaly("grad_explosion", _("grad norm {grad_norm:.4g} > {limit:g}").format(
                grad_norm=grad_norm, limit=self.explosion_abs)))
        elif len(self._grad_norms) >= self.min_history:
            median = statistics.median(self._grad_norms)
            if grad_norm > self.explosion_factor * median:
                found.append(Anomaly("grad_explosion", _("grad norm {grad_norm:.4g} > {factor:g} x median "
                                                         "{median:.4g} of the last steps").format(
                    grad_norm=grad_norm, factor=self.explosion_factor, median=median)))
        if grad_norm < self.vanishing_abs:
            found.append(Anomaly("grad_vanishing", _("grad norm {grad_norm:.3g} < {limit:g}").format(
                grad_norm=grad_norm, limit=self.vanishing_abs)))
        self._grad_norms.append(grad_norm)
        return found


@dataclass
class StepMetrics:
    """The figures of one optimizer step, as written to `metrics.jsonl`."""

    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens: int
    """Tokens processed by this step across all ranks."""
    seconds: float
    """Wall time of the step."""
    tokens_per_sec: float
    mfu: float
    """Model FLOPs utilisation: achieved training FLOP/s over the peak of all devices."""
    memory: dict[str, float]
    """Process RSS and, on CUDA, peak allocated/reserved memory since the previous step, in MiB."""
    anomalies: tuple[str, ...] = ()
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def loss_is_finite(self) -> bool:
        """False for a NaN/inf loss: the loop skips such a step and must not checkpoint it."""
        return is_finite(self.loss)

    def to_record(self) -> dict[str, Any]:
        """Flat JSON-ready dict; non-finite numbers become null."""
        record: dict[str, Any] = {
            "step": self.step, "split": "train", "loss": self.loss, "lr": self.lr,
            "grad_norm": self.grad_norm, "tokens": self.tokens, "seconds": self.seconds,
            "tokens_per_sec": self.tokens_per_sec, "mfu": self.mfu, **self.memory,
            "anomaly": list(self.anomalies), **self.extra,
        }
        return _json_safe(record)


class TrainingMonitor:
    """Logs training progress of one run into `run_dir` (main rank) and computes throughput and MFU."""

    def __init__(self, run_dir: Path, *, enabled: bool, total_steps: int, start_step: int,
                 flops_per_token: float, device: torch.device | str, world_size: int = 1,
                 precision: str = "fp32", peak_flops_per_device: float | None = None,
                 tensorboard: bool = True, progress: bool = True, print_interval: int = 0,
                 detector: AnomalyDetector | None = None) -> None:
        """Start monitoring; with `enabled`, drop records of steps >= `start_step` left by an earlier attempt.

        `precision` ("fp32", "bf16", "fp16") picks the peak FLOP/s unless `peak_flops_per_device` is
        given. `print_interval` prints a one-line summary every N steps when the progress bar is off
        (useful in batch logs).
        """
        if not 0 <= start_step <= total_steps:
            raise ValueError(_("TrainingMonitor needs 0 <= start_step <= total_steps, got start_step={start}, "
                               "total_steps={total}").format(start=start_step, total=total_steps))
        if world_size < 1 or flops_per_token < 0 or print_interval < 0:
            raise ValueError(_("TrainingMonitor: bad world_size={world_size}, flops_per_token={flops_per_token} or "
                               "print_interval={print_interval}").format(
                world_size=world_size, flops_per_token=flops_per_token, print_interval=print_interval))
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.flops_per_token = flops_per_token
        self.device = torch.device(device)
        self.world_size = world_size
        self.print_interval = print_interval
        self.detector = detector or AnomalyDetector()
        self.anomaly_counts: dict[str, int] = {}
        self._peak_warned = False
        self.checkpoint_safe = True
        """False while the last logged step had a non-finite loss: do not save that state."""
        if peak_flops_per_device is None:
            self.peak_flops_per_device, self.peak_source = peak_flops(self.device, precision)
        else:
            self.peak_flops_per_device, self.peak_source = float(peak_flops_per_device), "given"
        self._process = psutil.Process()
        self._metrics_file = None
        self._writer = None
        self._bar = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        for message in truncate_metrics(self.metrics_path, start_step):
            self.write(message)
        self._metrics_file = self.metrics_path.open("a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides events at or after start_step that an interrupted attempt left behind.
            self._writer = SummaryWriter(str(self.run_dir / TENSORBOARD_DIR),
                                         purge_step=start_step if start_step > 0 else None)
        if progress:
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self.write(_("MFU against a peak of {gflops:,.1f} GFLOP/s per device x {world_size} ({source})").format(
            gflops=self.peak_flops_per_device / 1e9, world_size=world_size, source=self.peak_source))

    def log_step(self, step: int, *, loss: float, lr: float, grad_norm: float, tokens: int,
                 seconds: float, extra: dict[str, float] | None = None,
                 named: dict[str, float] | None = None) -> StepMetrics:
        """Record optimizer step `step` (0-based) and return its metrics; warns about anomalies. `extra` figures go
        to TensorBoard under train/, `named` ones under their own names (`tokens/web`); both into metrics.jsonl."""
        if seconds <= 0 or tokens < 0:
            raise ValueError(_("log_step(step={step}) needs seconds > 0 and tokens >= 0, got seconds={seconds}, "
                               "tokens={tokens}").format(step=step, seconds=seconds, tokens=tokens))
        loss, grad_norm = float(loss), float(grad_norm)
        tokens_per_sec = tokens / seconds
        found = self.detector.check(loss, grad_norm)
        metrics = StepMetrics(
            step=step, loss=loss, lr=float(lr), grad_norm=grad_norm, tokens=tokens, seconds=seconds,
            tokens_per_sec=tokens_per_sec, mfu=self._mfu(tokens_per_sec),
            memory=self._memory(), anomalies=tuple(a.kind for a in found), extra={**(extra or {}), **(named or {})},
        )
        self.checkpoint_safe = metrics.loss_is_finite
        for anomaly in found:
            self.anomaly_counts[anomaly.kind] = self.anomaly_counts.get(anomaly.kind, 0) + 1
            self.write(_("warning: step {step}: {kind}: {message}").format(
                step=step + 1, kind=anomaly.kind, message=anomaly.message))
        if not self.enabled:
            return metrics
        self._append(metrics.to_record())
        if self._writer is not None:
            scalars = {"train/loss": loss, "train/lr": metrics.lr, "train/grad_norm": grad_norm,
                       "train/tokens_per_sec": tokens_per_sec, "train/mfu": metrics.mfu,
                       **{f"memory/{k.removeprefix('mem_')}": v for k, v in metrics.memory.items()},
                       **{f"train/{k}": v for k, v in (extra or {}).items()}, **(named or {})}
            self._add_scalars(scalars, step)
        self._show_progress(metrics)
        return metrics

    def _mfu(self, tokens_per_sec: float) -> float:
        """Achieved FLOP/s over the peak, never above 1 (`model_flops_utilization`). A device that beats its
        peak proves the peak too low: a measured one (taken at start-up, perhaps on a busy machine) is raised
        to what the step achieved; a table or given one is kept, and MFU capped, with one warning either way."""
        achieved = self.flops_per_token * tokens_per_sec / self.world_size
        if achieved > self.peak_flops_per_device:
            self._peak_exceeded(achieved)
        return model_flops_utilization(achieved, self.peak_flops_per_device)

    def _peak_exceeded(self, achieved: float) -> None:
        """Warn once that a step beat the peak; a measured peak follows the best step from now on."""
        measured = self.peak_source.startswith("measured")
        if not self._peak_warned:
            self._peak_warned = True
            if measured:
                self.write(_("note: a step reached {achieved:,.1f} GFLOP/s per device, above the peak measured at "
                             "start-up ({peak:,.1f}); the peak follows the best step from now on (set ${name} for a "
                             "fixed one)").format(achieved=achieved / 1e9, peak=self.peak_flops_per_device / 1e9,
                                                  name=PEAK_FLOPS_ENV))
            else:
                self.write(_("warning: a step reached {achieved:,.1f} GFLOP/s per device, above the peak of "
                             "{peak:,.1f} ({source}); MFU is capped at 100%").format(
                    achieved=achieved / 1e9, peak=self.peak_flops_per_device / 1e9, source=self.peak_source))
        if measured:
            self.peak_flops_per_device = achieved

    def log_eval(self, step: int, metrics: dict[str, float], split: str = "val",
                 named: dict[str, float] | None = None) -> None:
        """Record evaluation figures (loss, bpb, ...) at `step` under `split`, and `named` ones under their own
        names (`val_loss/web`: TensorBoard tag and metrics.jsonl key alike)."""
        if not self.enabled:
            return
        named = named or {}
        self._append(_json_safe({"step": step, "split": split, **metrics, **named}))
        if self._writer is not None:
            self._add_scalars({**{f"{split}/{k}": v for k, v in metrics.items()}, **named}, step)
        self.write(_("step {step} {split}: {metrics}").format(
            step=step + 1, split=split, metrics=", ".join(f"{k} {v:.4g}" for k, v in {**metrics, **named}.items())))

    def log_text(self, step: int, tag: str, text: str) -> None:
        """Record a text (e.g. a generated sample) in TensorBoard and print it."""
        if not self.enabled:
            return
        if self._writer is not None:
            self._writer.add_text(tag, text, step)
        self.write(_("step {step} {tag}: {text}").format(step=step + 1, tag=tag, text=text))

    def write(self, message: str) -> None:
        """Print a line on the main rank without breaking the progress bar."""
        if self.enabled:
            tqdm.write(message, file=sys.stdout)
            sys.stdout.flush()

    def close(self) -> None:
        """Flush and close the files and the progress bar; safe to call twice."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None

    def __enter__(self) -> TrainingMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _memory(self) -> dict[str, float]:
        memory = {"mem_rss_mib": self._process.memory_info().rss / 2**20}
        if self.device.type == "cuda":
            memory["mem_cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(self.device) / 2**20
            memory["mem_cuda_max_reserved_mib"] = torch.cuda.max_memory_reserved(self.device) / 2**20
            torch.cuda.reset_peak_memory_stats(self.device)  # next step reports its own peak
        return memory

    def _append(self, record: dict[str, Any]) -> None:
        record["time"] = round(time.time(), 3)
        assert self._metrics_file is not None
        self._metrics_file.write(json.dumps(record, allow_nan=False) + "\n")
        self._metrics_file.flush()

    def _add_scalars(self, scalars: dict[str, float], step: int) -> None:
        assert self._writer is not None
        for tag, value in scalars.items():
            if is_finite(value):  # a NaN would flatten TensorBoard's smoothed curve
                self._writer.add_scalar(tag, value, step)

    def _show_progress(self, metrics: StepMetrics) -> None:
        if self._bar is not None:
            postfix = {"loss": f"{metrics.loss:.4f}", "lr": f"{metrics.lr:.2e}",
                       "tok/s": f"{metrics.tokens_per_sec:,.0f}", "mfu": f"{metrics.mfu:.1%}"}
            self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(max(0, metrics.step + 1 - self._bar.n))
        elif self.print_interval and (metrics.step + 1) % self.print_interval == 0:
            self.write(_("step {step}: loss {loss:.4f} lr {lr:.2e} grad_norm {grad_norm:.3g} tok/s "
                         "{tokens_per_sec:,.0f} mfu {mfu:.1%}").format(
                step=metrics.step + 1, loss=metrics.loss, lr=metrics.lr, grad_norm=metrics.grad_norm,
                tokens_per_sec=metrics.tokens_per_sec, mfu=metrics.mfu))


def truncate_metrics(path: Path, start_step: int) -> list[str]:
    """Drop lines of `path` whose step is >= `start_step` (a resumed run redoes them); atomic rewrite.

    Unreadable lines (e.g. half-written by a killed process) are dropped too; returns warnings naming them.
    """
    if not path.exists():
        return []
    kept, warnings, dropped = [], [], 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            warnings.append(_("warning: {path}:{number}: unreadable metrics line dropped: {line!r}").format(
                path=path, number=number, line=line[:80]))
            continue
        if step < start_step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        warnings.append(_("{path}: dropped {dropped} records at step >= {start} (redone by this run)").format(
            path=path, dropped=dropped, start=start_step))
    if dropped or warnings:
        atomic_write_text(path, "".join(line + "\n" for line in kept))
    return warnings


def _json_safe(record: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
