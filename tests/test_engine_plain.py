"""PlainEngine: accumulation, clipping, schedule, skipping non-finite steps, exact resume, precision rules,
plus device detection and engine selection."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_driver import MODEL, fresh_model, global_batch, run_steps, train_config  # noqa: E402

from minigpt.config import ConfigError, MiniGPTConfig  # noqa: E402
from minigpt.engine import create_engine, detect_device, launched_distributed, resolve_precision  # noqa: E402
from minigpt.engine.base import warmup_cosine  # noqa: E402
from minigpt.engine.plain import PlainEngine
from minigpt.engine.portable import ENGINE_FILE, META_FILE, read_engine_meta  # noqa: E402
from minigpt.model import MiniGPT  # noqa: E402

CPU = torch.device("cpu")


def engine(**overrides) -> PlainEngine:
    return PlainEngine(fresh_model(), train_config(world=1, **overrides), CPU)


def loss_of(eng: PlainEngine, rows: torch.Tensor) -> torch.Tensor:
    logits = eng(rows[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), rows[:, 1:].reshape(-1))


def train_on(eng: PlainEngine, micro_batches: list[torch.Tensor]):
    """One optimizer step over `micro_batches`, accumulated as the loop does it."""
    for index, rows in enumerate(micro_batches):
        eng.backward(loss_of(eng, rows), len(micro_batches), last=index == len(micro_batches) - 1)
    return eng.step()


def test_k_micro_batches_equal_one_batch_of_k_times_the_size():
    rows = global_batch(0)  # 8 rows
    accumulated = engine(batch_size=2, grad_accum=4)
    one_batch = engine(batch_size=8, grad_accum=1)
    results = train_on(accumulated, list(rows.split(2))), train_on(one_batch, [rows])
    assert results[0].grad_norm == pytest.approx(results[1].grad_norm, rel=1e-5)
    for (name, a), b in zip(accumulated.module.state_dict().items(), one_batch.module.state_dict().values(),
                            strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_backward_only_accumulates_and_the_callers_step_updates_and_reports():
    eng = engine(batch_size=2, grad_accum=3)
    before = {k: v.clone() for k, v in eng.module.state_dict().items()}
    for index, rows in enumerate(global_batch(0)[:6].split(2)):
        eng.backward(loss_of(eng, rows), 3, last=index == 2)
    assert all(torch.equal(before[k], v) for k, v in eng.module.state_dict().items())  # no update mid-window
    report = eng.step()
    assert report is not None and report.grad_norm > 0
    assert not all(torch.equal(before[k], v) for k, v in eng.module.state_dict().items())


def test_clipping_caps_the_norm_the_optimizer_sees():
    eng = engine(grad_clip=0.05, batch_size=8, grad_accum=1)
    seen = []

    def record_norm(optimizer, args, kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    eng.optimizer.register_step_pre_hook(record_norm)
    result = train_on(eng, [global_batch(0)])
    assert result.grad_norm > 0.05, "the test needs a gradient larger than the clip"
    assert seen[0] == pytest.approx(0.05, rel=1e-4)


def test_learning_rate_follows_warmup_then_cosine():
    eng = engine(learning_rate=1e-2, warmup_steps=2, max_steps=6, min_lr_ratio=0.1)
    lrs = [r["lr"] for r in run_steps(eng, 0, 6)]
    expected = [1e-2 * m for m in (0.5, 1.0, 1.0, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)),
                                   0.1 + 0.9 * 0.5, 0.1 + 0.9 * 0.5 * (1 + math.cos(3 * math.pi / 4)))]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert eng.lr == pytest.approx(1e-3, rel=1e-12)  # the next step is at max_steps: the floor
    assert warmup_cosine(100, 2, 6, 0.1) == pytest.approx(0.1)


def test_non_finite_loss_skips_the_update_and_leaves_weights_intact():
    eng = engine(batch_size=8, grad_accum=1)
    before = {k: v.clone() for k, v in eng.module.state_dict().items()}
    lr_before = eng.lr
    eng.backward(loss_of(eng, global_batch(0)) * float("nan"))
    result = eng.step()
    assert result.skipped and not math.isfinite(result.grad_norm)
    for name, value in eng.module.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert eng.lr == lr_before and not eng.optimizer.state
    good = train_on(eng, [global_batch(1)])
    assert not good.skipped and math.isfinite(good.grad_norm)
    assert all(torch.isfinite(v).all() for v in eng.module.state_dict().values())


def test_save_load_continue_equals_uninterrupted_bitwise(tmp_path):
    uninterrupted = engine()
    run_steps(uninterrupted, 0, 3)
    uninterrupted.save(tmp_path)
    expected = run_steps(uninterrupted, 3, 6)

    resumed = PlainEngine(fresh_model(seed=7), train_config(world=1), CPU)
    resumed.load(tmp_path)
    assert run_steps(resumed, 3, 6) == expected
    for (name, a), b in zip(uninterrupted.module.state_dict().items(), resumed.module.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name


def test_checkpoint_keys_optimizer_state_by_parameter_name(tmp_path):
    eng = engine()
    run_steps(eng, 0, 1)
    eng.save(tmp_path)
    state = torch.load(tmp_path / ENGINE_FILE, weights_only=True)
    assert state["engine"] == "plain" and state["world_size"] == 1
    assert set(state["optimizer"]) == {name for name, _ in eng.module.named_parameters()}
    assert set(state["optimizer"]["embed.weight"]) == {"step", "exp_avg", "exp_avg_sq"}


def test_load_refuses_a_checkpoint_of_another_model_shape(tmp_path):
    engine().save(tmp_path)
    wider = MiniGPTConfig(**{**MODEL.to_dict(), "hidden_size": 64})
    other = PlainEngine(MiniGPT(wider), train_config(world=1), CPU)
    with pytest.raises(ConfigError, match=r"tensor 'embed.weight' has shape \(96, 32\) in the checkpoint "
                                          r"but \(96, 64\) in the model"):
        other.load(tmp_path)


@pytest.mark.parametrize("version", [2, None])
def test_engine_files_of_another_format_version_are_refused_by_name(tmp_path, version):
    eng = engine()
    eng.save(tmp_path)
    state = torch.load(tmp_path / ENGINE_FILE, weights_only=True)
    state["format_version"] = version
    torch.save(state, tmp_path / ENGINE_FILE)
    says = f"{tmp_path / ENGINE_FILE}: engine checkpoint format version {version!r}; this MiniGPT reads version 1"
    with pytest.raises(ConfigError, match=re.escape(says)):
        eng.load(tmp_path)
    meta = tmp_path / META_FILE  # what the DeepSpeed engine writes beside DeepSpeed's files
    meta.write_text(json.dumps({"format_version": version, "zero_stage": 2, "world_size": 2, "ep_size": 1}))
    with pytest.raises(ConfigError, match=re.escape(f"{meta}: engine checkpoint format version {version!r}; this "
                                                    "MiniGPT reads version 1")):
        read_engine_meta(meta)


def test_load_of_an_empty_directory_names_it(tmp_path):
    with pytest.raises(ConfigError, match=f"{tmp_path}: no engine state found"):
        engine().load(tmp_path)


def test_bf16_autocast_runs_on_cpu():
    eng = engine(precision="bf16", batch_size=8, grad_accum=1)
    assert eng.precision == "bf16"
    rows = global_batch(0)
    assert eng(rows[:, :-1]).dtype == torch.bfloat16
    result = train_on(eng, [rows])
    assert not result.skipped and math.isfinite(result.grad_norm)
    assert all(p.dtype == torch.float32 for p in eng.module.parameters())


def test_fp16_runs_on_cpu_with_loss_scaling():
    eng = engine(precision="fp16", batch_size=8, grad_accum=1)
    assert eng.precision == "fp16" and eng.scaler.is_enabled()
    rows = global_batch(0)
    assert eng(rows[:, :-1]).dtype == torch.float16
    before = {k: v.clone() for k, v in eng.module.state_dict().items()}
    result = train_on(eng, [rows])
    assert not result.skipped and math.isfinite(result.grad_norm)
    assert all(p.dtype == torch.float32 for p in eng.module.parameters())  # fp32 master weights
    assert any(not torch.equal(before[k], v) for k, v in eng.module.state_dict().items())


def test_fp16_overflow_skips_the_step_backs_off_the_scale_then_grows_it_again():
    eng = engine(precision="fp16", batch_size=8, grad_accum=1)
    eng.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=2)
    rows = global_batch(0)
    weights = {k: v.clone() for k, v in eng.module.state_dict().items()}
    lr_before = eng.lr
    eng.backward(loss_of(eng, rows) * 1e30)  # fp16 gradients overflow to inf
    overflow = eng.step()
    assert overflow.skipped
    assert all(torch.equal(weights[k], v) for k, v in eng.module.state_dict().items())  # weights unchanged
    assert eng.lr == lr_before  # the schedule does not advance on a skipped step
    assert eng.scaler.get_scale() == 2.0**15  # backed off by the default factor 0.5
    for step in range(2):
        assert not train_on(eng, [global_batch(step + 1)]).skipped
    assert eng.scaler.get_scale() == 2.0**16  # grew back after growth_interval clean steps


def test_fp16_resume_restores_the_loss_scale_and_continues_bitwise(tmp_path):
    straight = engine(precision="fp16")
    straight.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    reference = run_steps(straight, 0, 6)

    first = engine(precision="fp16")
    first.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    head = run_steps(first, 0, 4)
    scale_at_save = first.scaler.get_scale()
    assert scale_at_save == 2.0**11  # grew once after 3 clean steps: the state is not the initial one
    first.save(tmp_path)

    resumed = engine(precision="fp16")
    resumed.load(tmp_path)
    assert resumed.scaler.get_scale() == scale_at_save
    assert resumed.scaler.state_dict()["_growth_tracker"] == first.scaler.state_dict()["_growth_tracker"]
    tail = run_steps(resumed, 4, 6)
    assert [r["loss"] for r in head + tail] == [r["loss"] for r in reference]


def test_fp32_bf16_and_fp16_loss_curves_agree_over_a_short_run():
    curves = {precision: [r["loss"] for r in run_steps(engine(precision=precision), 0, 12)]
              for precision in ("fp32", "bf16", "fp16")}
    assert curves["fp32"][-1] < curves["fp32"][0] - 0.3  # the run learns, so agreement means something
    for precision in ("bf16", "fp16"):
        for step, (ours, exact) in enumerate(zip(curves[precision], curves["fp32"], strict=True)):
            # stated tolerance: 2% of the fp32 loss at every step (fp16 ~0.1%, bf16 ~0.5% here)
            assert ours == pytest.approx(exact, rel=0.02), (precision, step, curves)


def test_explicit_precisions_are_kept_on_cpu():
    assert resolve_precision("fp32", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16"
    assert resolve_precision("fp16", CPU) == "fp16"


def test_device_detection_prints_its_choice(capsys):
    assert detect_device("cpu") == CPU
    assert "device cpu (requested with --device)" in capsys.readouterr().out
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert detect_device("") == CPU
        assert "no CUDA or MPS device found" in capsys.readouterr().out
        with pytest.raises(ConfigError, match="CUDA is not available"):
            detect_device("cuda")
    with pytest.raises(ConfigError, match="not a device name"):
        detect_device("gpu0")


def test_plain_engine_is_chosen_without_a_launcher(monkeypatch):
    for name in ("WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_ID"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    assert isinstance(create_engine(fresh_model(), train_config(world=1, device="cpu")), PlainEngine)


def test_srun_without_master_address_is_refused(monkeypatch):
    for name in ("WORLD_SIZE", "LOCAL_RANK", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        launched_distributed()


def test_srun_environment_maps_to_rank_variables(monkeypatch):
    for name in ("WORLD_SIZE", "LOCAL_RANK", "RANK"):
        # setenv first so monkeypatch restores the variables (set by launched_distributed) afterwards;
        # a leaked RANK=1 would make every later run in this process think it is a non-main rank.
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    for name, value in {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "SLURM_LOCALID": "1",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555"}.items():
        monkeypatch.setenv(name, value)
    assert launched_distributed()
    import os
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("1", "2", "1")


@pytest.mark.integration
def test_compiled_engine_keeps_clean_state_dict_keys(tmp_path):
    eng = engine(compile="on", batch_size=8, grad_accum=1)
    result = train_on(eng, [global_batch(0)])
    assert not result.skipped
    eng.save(tmp_path)
    keys = torch.load(tmp_path / ENGINE_FILE, weights_only=True)["model"].keys()
    assert not [k for k in keys if k.startswith(("_orig_mod.", "module."))]
    assert set(keys) == set(fresh_model().state_dict())


def test_activation_checkpointing_gives_the_same_losses_and_gradients():
    """Recomputing blocks in backward (torch.utils.checkpoint) changes memory, not numerics; dropout too
    (the recompute replays the RNG state)."""
    runs = {}
    for enabled in (False, True):
        model = fresh_model()
        model.set_dropout(0.1)
        eng = PlainEngine(model, train_config(world=1, activation_checkpointing=enabled), CPU)
        torch.manual_seed(7)
        rows = global_batch(0)
        eng.train()
        loss = loss_of(eng, rows)
        eng.backward(loss)
        grads = {name: p.grad.clone() for name, p in eng.module.named_parameters()}
        eng.step()
        runs[enabled] = (loss.item(), grads, [r["loss"] for r in run_steps(eng, 1, 4)])
    (loss_a, grads_a, curve_a), (loss_b, grads_b, curve_b) = runs[False], runs[True]
    assert loss_a == loss_b
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, atol=1e-7, rtol=1e-6, msg=name)
    assert curve_b == pytest.approx(curve_a, abs=1e-6)


def test_activation_checkpointing_is_off_for_evaluation_and_cached_decoding():
    eng = PlainEngine(fresh_model(), train_config(world=1, activation_checkpointing=True), CPU)
    calls = []
    wrapped = eng.module.checkpoint_fn
    eng.module.checkpoint_fn = lambda *args: calls.append(1) or wrapped(*args)
    rows = global_batch(0)
    eng.train()
    eng(rows[:, :-1])
    assert len(calls) == MODEL.num_layers  # one recomputable segment per block
    eng.module.eval()
    with torch.no_grad():
        eng.module(rows[:, :-1])
    assert len(calls) == MODEL.num_layers


def test_activation_checkpointing_of_a_mixture_of_experts_keeps_the_loss_and_the_routers_gradients():
    """torch.utils.checkpoint (non-reentrant) records the first forward's graph, so the balance loss read from
    the blocks after forward still trains the router; the recompute in backward changes nothing."""
    from minigpt.config import get_config
    from minigpt.train.language_modeling import Pretraining

    runs = {}
    for enabled in (False, True):
        torch.manual_seed(3)
        eng = PlainEngine(MiniGPT(get_config("tiny-moe")), train_config(world=1, activation_checkpointing=enabled), CPU)
        ids = torch.randint(0, eng.module.config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(5))
        eng.train()
        loss, stats = Pretraining().loss(eng, {"input_ids": ids[:, :-1], "labels": ids[:, 1:]})
        eng.backward(loss)
        runs[enabled] = (loss.item(), stats, {n: p.grad.clone() for n, p in eng.module.named_parameters()})
    (loss_a, stats_a, grads_a), (loss_b, stats_b, grads_b) = runs[False], runs[True]
    assert loss_b == pytest.approx(loss_a, rel=1e-6) and stats_b == pytest.approx(stats_a, rel=1e-6)
    assert any("router" in name and grad.abs().sum() > 0 for name, grad in grads_b.items())
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, atol=1e-7, rtol=1e-5, msg=name)


def test_reentrant_activation_checkpointing_is_refused_for_mixture_of_experts_models():
    """DeepSpeed's checkpointing is reentrant: its forward runs without a graph, so the balance loss would not
    reach the router. That engine refuses the combination by name."""
    from minigpt.config import get_config
    from minigpt.engine.base import enable_activation_checkpointing

    with pytest.raises(ConfigError, match="activation-checkpointing.*mixture-of-experts.*DeepSpeed"):
        enable_activation_checkpointing(MiniGPT(get_config("tiny-moe")), lambda *a: None, reentrant=True)
