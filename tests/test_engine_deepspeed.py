"""DeepSpeed engine against the plain engine, under the real launcher: 2 ranks, CPU accelerator, gloo.

One `deepspeed --num_gpus 2 tests/engine_driver.py` launch per ZeRO stage trains 6 steps (checkpoint
after 3), resumes its own checkpoint, continues from a plain-engine checkpoint and consolidates the
weights; this test compares all of it with a plain-engine run over the same global batches.
Tolerance (fp32; the engines sum gradients in a different order): losses within 1e-5 absolute, weights
within 1e-5 (measured: ~2e-7 and ~5e-7). A bf16 run is checked for falling loss and exact resume only.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from ports import free_port, run_launch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_driver import SAVE_AT, STEPS, WORLD, fresh_model, run_steps, train_config  # noqa: E402

from minigpt.engine.plain import PlainEngine  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.deepspeed]
pytest.importorskip("deepspeed")
if shutil.which("deepspeed") is None:
    pytest.skip("the deepspeed launcher is not on PATH", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
LOSS_TOL = 1e-5


def plain_engine() -> PlainEngine:
    return PlainEngine(fresh_model(), train_config(world=1), torch.device("cpu"))


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory) -> dict:
    """The reference: the plain engine over the same global batches, checkpointed after SAVE_AT steps."""
    checkpoint = tmp_path_factory.mktemp("plain") / "step_3"
    checkpoint.mkdir()
    engine = plain_engine()
    records = run_steps(engine, 0, SAVE_AT)
    engine.save(checkpoint)
    records += run_steps(engine, SAVE_AT, STEPS)
    return {"records": records, "checkpoint": checkpoint, "weights": engine.consolidated_state_dict()}


def launch_driver(ds_config: str, out: Path, plain_checkpoint: Path, precision: str = "fp32") -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = ["deepspeed", "--num_gpus", str(WORLD), "--master_port", str(free_port()),
           str(REPO / "tests" / "engine_driver.py"), "--ds-config", str(REPO / ds_config), "--out", str(out),
           "--plain-checkpoint", str(plain_checkpoint), "--precision", precision]
    proc = run_launch(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads((out / "results.json").read_text())


def losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in records]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_matches_plain_engine_and_resumes_across_engines(stage, plain_run, tmp_path):
    results = launch_driver(f"ds_configs/zero{stage}.json", tmp_path, plain_run["checkpoint"])
    reference = plain_run["records"]
    ds_run = results["uninterrupted"]

    assert ds_run[-1]["loss"] < ds_run[0]["loss"] - 0.3, f"loss did not fall: {losses(ds_run)}"
    assert losses(ds_run) == pytest.approx(losses(reference), abs=LOSS_TOL)
    assert [r["lr"] for r in ds_run] == pytest.approx([r["lr"] for r in reference], rel=1e-12)
    assert [r["grad_norm"] for r in ds_run] == pytest.approx([r["grad_norm"] for r in reference], rel=1e-4)

    # NaN on one rank: every rank skips the update and the weights are untouched.
    assert results["nan_step"] == {"skipped": True, "weights_unchanged": True}

    # Same engine, same ranks: resuming its own checkpoint reproduces the run bitwise.
    assert losses(results["resumed"]) == losses(ds_run[SAVE_AT:])

    # --activation-checkpointing (DeepSpeed's recompute in backward) trains the same curve.
    recomputed = results["activation_checkpointing"]
    assert losses(recomputed) == pytest.approx(losses(ds_run), abs=1e-6)
    assert [r["grad_norm"] for r in recomputed] == pytest.approx([r["grad_norm"] for r in ds_run], rel=1e-5)

    # Consolidated weights are the real trained values (ZeRO-3 gathers them), equal to the plain run's.
    consolidated = torch.load(tmp_path / "consolidated.pt", weights_only=True)
    assert sorted(consolidated) == sorted(plain_run["weights"])
    for name, value in plain_run["weights"].items():
        assert consolidated[name].shape == value.shape, name
        torch.testing.assert_close(consolidated[name], value, atol=1e-5, rtol=0, msg=name)

    # Plain checkpoint → 2-rank DeepSpeed continues the plain run's curve.
    assert losses(results["from_plain"]) == pytest.approx(losses(reference[SAVE_AT:]), abs=LOSS_TOL)

    # 2-rank DeepSpeed checkpoint → plain engine continues the DeepSpeed run's curve (moments included).
    engine = PlainEngine(fresh_model(seed=5), train_config(world=1), torch.device("cpu"))
    engine.load(tmp_path / "ds_checkpoint")
    assert all(float(s["step"]) == SAVE_AT for s in engine.optimizer.state.values())
    assert engine.scheduler.last_epoch == SAVE_AT
    continued = run_steps(engine, SAVE_AT, STEPS)
    assert losses(continued) == pytest.approx(losses(ds_run[SAVE_AT:]), abs=LOSS_TOL)


def test_bf16_zero2_trains_resumes_and_consolidates_fp32_master_weights(plain_run, tmp_path):
    results = launch_driver("ds_configs/zero2.json", tmp_path, plain_run["checkpoint"], precision="bf16")
    ds_run = results["uninterrupted"]
    assert ds_run[-1]["loss"] < ds_run[0]["loss"] - 0.3, f"loss did not fall: {losses(ds_run)}"
    assert losses(ds_run) == pytest.approx(losses(plain_run["records"]), abs=0.05)
    assert losses(results["resumed"]) == losses(ds_run[SAVE_AT:])
    consolidated = torch.load(tmp_path / "consolidated.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in consolidated.values())
    # fp32 master weights, not bf16-rounded copies: some values are not representable in bf16.
    assert any(not torch.equal(v, v.bfloat16().float()) for v in consolidated.values())
