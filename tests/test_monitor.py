"""TrainingMonitor, AnomalyDetector and peak FLOP/s: real files, real TensorBoard event logs."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from minigpt.flops import lookup_gpu_peak, measure_matmul_flops, peak_flops
from minigpt.monitor import METRICS_FILE, AnomalyDetector, TrainingMonitor, is_finite, truncate_metrics

PEAK = 1e12  # a given peak keeps tests free of the matmul benchmark


def make_monitor(run_dir: Path, *, start_step: int = 0, total_steps: int = 10, enabled: bool = True,
                 **kwargs) -> TrainingMonitor:
    return TrainingMonitor(run_dir, enabled=enabled, total_steps=total_steps, start_step=start_step,
                           flops_per_token=1e6, device="cpu", peak_flops_per_device=PEAK, progress=False,
                           **kwargs)


def log_steps(monitor: TrainingMonitor, steps: range, loss_offset: float = 0.0) -> None:
    for step in steps:
        monitor.log_step(step, loss=3.0 - 0.1 * step + loss_offset, lr=1e-3 * (step + 1),
                         grad_norm=1.0 + 0.01 * step, tokens=1000, seconds=0.5)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def read_scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    accumulator = EventAccumulator(str(run_dir / "tensorboard"))
    accumulator.Reload()
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def test_tensorboard_scalars_read_back_with_steps_and_values(tmp_path: Path) -> None:
    with make_monitor(tmp_path) as monitor:
        log_steps(monitor, range(4))
        monitor.log_eval(3, {"loss": 2.5, "bpb": 1.25})
    losses = read_scalars(tmp_path, "train/loss")
    assert [step for step, _ in losses] == [0, 1, 2, 3]
    assert [value for _, value in losses] == pytest.approx([3.0, 2.9, 2.8, 2.7])
    assert read_scalars(tmp_path, "train/lr")[2] == (2, pytest.approx(3e-3))
    assert read_scalars(tmp_path, "train/tokens_per_sec")[0] == (0, pytest.approx(2000.0))
    assert read_scalars(tmp_path, "train/mfu")[0][1] == pytest.approx(1e6 * 2000 / PEAK)
    assert len(read_scalars(tmp_path, "train/grad_norm")) == 4
    assert read_scalars(tmp_path, "memory/rss_mib")[0][1] > 10
    assert read_scalars(tmp_path, "val/bpb") == [(3, pytest.approx(1.25))]


def test_metrics_jsonl_has_one_record_per_step_with_all_fields(tmp_path: Path) -> None:
    with make_monitor(tmp_path) as monitor:
        log_steps(monitor, range(3))
        monitor.log_eval(2, {"loss": 2.5, "bpb": 1.25})
    records = read_jsonl(tmp_path / METRICS_FILE)
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [0, 1, 2]
    for key in ("loss", "lr", "grad_norm", "tokens_per_sec", "mfu", "mem_rss_mib", "anomaly", "time"):
        assert all(key in r for r in train), key
    assert train[1]["loss"] == pytest.approx(2.9)
    assert records[-1] == {"step": 2, "split": "val", "loss": 2.5, "bpb": 1.25, "time": records[-1]["time"]}


def test_resume_from_earlier_step_appends_without_duplicates(tmp_path: Path) -> None:
    with make_monitor(tmp_path) as first:
        log_steps(first, range(6))  # interrupted after step 5; the last checkpoint was at step 4
        first.log_eval(5, {"loss": 9.0})
    with make_monitor(tmp_path, start_step=4) as second:
        log_steps(second, range(4, 8), loss_offset=-1.0)
    train = [r for r in read_jsonl(tmp_path / METRICS_FILE) if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(8))
    assert train[3]["loss"] == pytest.approx(2.7)  # kept from the first attempt
    assert train[4]["loss"] == pytest.approx(1.6)  # redone by the resumed run
    assert all(r["split"] != "val" for r in read_jsonl(tmp_path / METRICS_FILE))
    losses = dict(read_scalars(tmp_path, "train/loss"))  # TensorBoard purges the redone steps too
    assert sorted(losses) == list(range(8))
    assert losses[4] == pytest.approx(1.6)


def test_half_written_metrics_line_is_dropped_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / METRICS_FILE
    path.write_text('{"step": 0, "loss": 3.0}\n{"step": 1, "loss": 2.9}\n{"step": 2, "lo')
    warnings = truncate_metrics(path, start_step=2)
    assert any(f"{path}:3" in warning for warning in warnings)
    assert [r["step"] for r in read_jsonl(path)] == [0, 1]


def test_disabled_monitor_writes_nothing_but_returns_metrics(tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    monitor = make_monitor(run_dir, enabled=False)
    metrics = monitor.log_step(0, loss=float("nan"), lr=1e-3, grad_norm=2.0, tokens=4000, seconds=2.0)
    monitor.log_eval(0, {"loss": 1.0})
    monitor.log_text(0, "sample", "hello")
    monitor.write("hello")
    monitor.close()
    assert not run_dir.exists()
    assert capsys.readouterr().out == ""
    assert metrics.tokens_per_sec == 2000.0
    assert metrics.anomalies == ("nonfinite_loss",)
    assert not monitor.checkpoint_safe


def test_mfu_uses_peak_per_device_times_world_size(tmp_path: Path) -> None:
    monitor = TrainingMonitor(tmp_path, enabled=False, total_steps=1, start_step=0, flops_per_token=6e6,
                              device="cpu", world_size=2, peak_flops_per_device=1e11)
    metrics = monitor.log_step(0, loss=2.0, lr=1e-3, grad_norm=1.0, tokens=8192, seconds=0.25)
    assert metrics.tokens_per_sec == pytest.approx(32768.0)
    assert metrics.mfu == pytest.approx(6e6 * 32768 / 2e11)


def test_nan_loss_is_recorded_as_null_and_blocks_checkpointing(tmp_path: Path, capsys) -> None:
    with make_monitor(tmp_path) as monitor:
        log_steps(monitor, range(2))
        metrics = monitor.log_step(2, loss=float("inf"), lr=1e-3, grad_norm=float("nan"), tokens=10, seconds=1)
        assert not metrics.loss_is_finite and not monitor.checkpoint_safe
        log_steps(monitor, range(3, 4))
        assert monitor.checkpoint_safe
    record = read_jsonl(tmp_path / METRICS_FILE)[2]
    assert record["loss"] is None and record["anomaly"] == ["nonfinite_loss", "nonfinite_grad"]
    assert "warning: step 3: nonfinite_loss" in capsys.readouterr().out  # printed: the third step done
    assert [step for step, _ in read_scalars(tmp_path, "train/loss")] == [0, 1, 3]


def test_text_samples_go_to_tensorboard_and_stdout(tmp_path: Path, capsys) -> None:
    with make_monitor(tmp_path) as monitor:
        monitor.log_text(5, "sample", "To be, or not to be")
    assert "step 6 sample: To be, or not to be" in capsys.readouterr().out  # after the sixth step (index 5)
    accumulator = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    accumulator.Reload()
    assert any("sample" in tag for tag in accumulator.Tags()["tensors"])


def noisy_run(detector: AnomalyDetector, steps: int, seed: int = 0) -> list[list[str]]:
    rng = random.Random(seed)
    return [[a.kind for a in detector.check(3.0 + rng.gauss(0, 0.05), 1.0 + rng.gauss(0, 0.2))]
            for _ in range(steps)]


def test_anomaly_detector_ignores_normal_noise_and_a_falling_loss() -> None:
    detector = AnomalyDetector()
    falling = [detector.check(10.0 * math.exp(-step / 20) + 2.0, 5.0 / (1 + step)) for step in range(100)]
    assert not any(falling)
    assert not any(noisy_run(AnomalyDetector(), 500))


def test_anomaly_detector_flags_nan_explosion_vanishing_and_spike() -> None:
    detector = AnomalyDetector()
    noisy_run(detector, 50)
    assert [a.kind for a in detector.check(float("nan"), 1.0)] == ["nonfinite_loss"]
    assert [a.kind for a in detector.check(3.0, 15.0)] == ["grad_explosion"]  # > 10 x median ~1
    assert [a.kind for a in detector.check(3.0, 1e-12)] == ["grad_vanishing"]
    assert [a.kind for a in detector.check(4.5, 1.0)] == ["loss_spike"]
    assert [a.kind for a in AnomalyDetector().check(3.0, 1e5)] == ["grad_explosion"]  # absolute bound


def test_is_finite_accepts_floats_and_tensors() -> None:
    assert is_finite(1.0) and is_finite(torch.tensor(2.0))
    assert not is_finite(float("nan")) and not is_finite(torch.tensor(float("-inf")))


def test_gpu_peak_table_matches_device_names() -> None:
    assert lookup_gpu_peak("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4e12)
    assert lookup_gpu_peak("NVIDIA H200", "bf16") == pytest.approx(989.4e12)
    assert lookup_gpu_peak("NVIDIA H100 PCIe", "bf16") == pytest.approx(756e12)
    assert lookup_gpu_peak("NVIDIA A100-SXM4-80GB", "fp32") == pytest.approx(19.5e12)
    assert lookup_gpu_peak("NVIDIA A100-SXM4-80GB", "fp32", tf32=True) == pytest.approx(156e12)
    assert lookup_gpu_peak("NVIDIA L4", "fp16") == pytest.approx(121e12)
    assert lookup_gpu_peak("NVIDIA L40S", "bf16") == pytest.approx(362e12)
    assert lookup_gpu_peak("Tesla V100-SXM2-16GB", "fp16") == pytest.approx(125e12)
    assert lookup_gpu_peak("NVIDIA GeForce RTX 4090", "bf16") == pytest.approx(165.2e12)
    assert lookup_gpu_peak("Some Future GPU", "bf16") is None
    with pytest.raises(ValueError, match="auto"):
        lookup_gpu_peak("NVIDIA H100", "auto")


def test_cpu_peak_is_measured_and_cached() -> None:
    value, source = peak_flops("cpu", "fp32")
    assert source.startswith("measured")
    assert 1e9 < value < 1e14
    hits = measure_matmul_flops.cache_info().hits
    again, _ = peak_flops("cpu", "fp32")
    assert again == value
    assert measure_matmul_flops.cache_info().hits == hits + 1  # cached: no second benchmark


def test_peak_flops_env_override(monkeypatch) -> None:
    monkeypatch.setenv("MINIGPT_PEAK_FLOPS", "2.5e14")
    assert peak_flops("cpu", "bf16") == (2.5e14, "env MINIGPT_PEAK_FLOPS")
    monkeypatch.setenv("MINIGPT_PEAK_FLOPS", "fast")
    with pytest.raises(ValueError, match="MINIGPT_PEAK_FLOPS"):
        peak_flops("cpu", "bf16")


def test_mfu_never_exceeds_100_percent_with_a_given_peak(tmp_path: Path, capsys) -> None:
    monitor = TrainingMonitor(tmp_path, enabled=True, total_steps=3, start_step=0, flops_per_token=6e6,
                              device="cpu", peak_flops_per_device=1e9, progress=False, tensorboard=False)
    fast = monitor.log_step(0, loss=1.0, lr=1e-3, grad_norm=1.0, tokens=10_000, seconds=0.01)  # 6e12 FLOP/s
    monitor.close()
    assert fast.mfu == 1.0
    assert "MFU is capped at 100%" in capsys.readouterr().out


def test_a_measured_peak_beaten_by_a_step_follows_the_best_step(tmp_path: Path, capsys) -> None:
    """The start-up benchmark ran on a busy machine: the peak is raised, MFU stays a true fraction."""
    monitor = TrainingMonitor(tmp_path, enabled=True, total_steps=3, start_step=0, flops_per_token=6e6,
                              device="cpu", progress=False, tensorboard=False)
    assert monitor.peak_source.startswith("measured")
    beyond = 4 * monitor.peak_flops_per_device  # FLOP/s of a step four times the measured peak
    first = monitor.log_step(0, loss=1.0, lr=1e-3, grad_norm=1.0, tokens=int(beyond / 6e6), seconds=1.0)
    second = monitor.log_step(1, loss=1.0, lr=1e-3, grad_norm=1.0, tokens=int(beyond / 6e6), seconds=2.0)
    monitor.close()
    assert first.mfu == 1.0 and second.mfu == pytest.approx(0.5, rel=1e-3)
    assert "above the peak measured at start-up" in capsys.readouterr().out


def test_measuring_the_peak_leaves_the_seeded_random_stream_alone():
    """The peak is measured once per process, in the first run's monitor: a second run in the same process
    with the same seed must draw the same numbers as the first."""
    from minigpt.flops import measure_matmul_flops

    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    measure_matmul_flops(torch.device("cpu"), torch.float32, size=64, seconds=0.01, repeats=1)
    assert torch.equal(torch.rand(4), expected)
