"""Mixture of experts on DeepSpeed with expert parallelism (2 CPU ranks, gloo, EP=2, ZeRO-2) against the plain
model, under the real launcher. No mocks: DeepSpeed's own `MoE` layer, all-to-all and checkpoint files.

One `tests/moe_driver.py` launch under ZeRO-2 (module-scoped, shared by the first tests) trains 6 steps with
the experts split over the ranks; the plain model runs the same micro-batches. One `launch/train.py` run of
`tiny-moe` under ZeRO-1 is stopped by SIGTERM, resumed with --auto-resume and compared with an uninterrupted
run. Tolerances (fp32;
gradients are summed in another order): losses 1e-5, weights 1e-4 (measured: ~1e-6 and ~6e-6).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ports import free_port, run_launch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_driver import MODEL, PROBE, SAVE_AT, STEPS, WORLD, fresh_model, run_steps, train_config  # noqa: E402
from test_train_integration import assert_same_run, interrupt_after, run, train_cmd, train_losses  # noqa: E402

from minigpt.engine.plain import PlainEngine  # noqa: E402
from minigpt.generate import GenerationConfig, TextGenerator  # noqa: E402
from minigpt.model import MiniGPT  # noqa: E402
from minigpt.weights import load_consolidated, save_consolidated  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.deepspeed]
pytest.importorskip("deepspeed", reason="expert parallelism runs on DeepSpeed's MoE layer")
if shutil.which("deepspeed") is None:
    pytest.skip("the deepspeed launcher is not on PATH", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
LOSS_TOL, WEIGHT_TOL = 1e-5, 1e-4


def plain_engine(seed: int = 0) -> PlainEngine:
    return PlainEngine(fresh_model(seed), train_config(world=1), torch.device("cpu"))


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory) -> dict:
    """The plain model over the same micro-batches (grad_accum = 2 x world), checkpointed after SAVE_AT."""
    checkpoint = tmp_path_factory.mktemp("plain_moe") / "step_3"
    checkpoint.mkdir()
    engine = plain_engine()
    engine.eval()
    with torch.no_grad():
        init_logits = engine.module(PROBE)
    engine.train()
    records = run_steps(engine, 0, SAVE_AT)
    engine.save(checkpoint)
    records += run_steps(engine, SAVE_AT, STEPS)
    return {"records": records, "checkpoint": checkpoint, "weights": engine.consolidated_state_dict(),
            "init_logits": init_logits}


@pytest.fixture(scope="module")
def ds_run(plain_run, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ds_moe")
    cmd = ["deepspeed", "--num_gpus", str(WORLD), "--master_port", str(free_port()),
           str(REPO / "tests" / "moe_driver.py"), "--ds-config", str(REPO / "ds_configs" / "zero2.json"),
           "--out", str(out), "--plain-checkpoint", str(plain_run["checkpoint"])]
    proc = run_launch(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                      text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return {**json.loads((out / "results.json").read_text()),
            **torch.load(out / "tensors.pt", weights_only=True), "checkpoint": out / "ds_checkpoint"}


def losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in records]


def assert_close_losses(a: list[dict], b: list[dict]) -> None:
    assert losses(a) == pytest.approx(losses(b), abs=LOSS_TOL)


def test_expert_parallel_deepspeed_is_the_plain_model_step_for_step(ds_run, plain_run):
    assert ds_run["local_experts"] == MODEL.num_layers * 2 * 2, "each rank holds 2 of the 4 experts (2 tensors each)"
    torch.testing.assert_close(ds_run["init_logits"], plain_run["init_logits"], rtol=0, atol=1e-5)
    assert_close_losses(ds_run["uninterrupted"], plain_run["records"])
    assert [r["aux"] for r in ds_run["uninterrupted"]] == pytest.approx([r["aux"] for r in plain_run["records"]],
                                                                        abs=LOSS_TOL)
    assert losses(ds_run["uninterrupted"])[-1] < losses(ds_run["uninterrupted"])[0] - 0.5, "EP=2 training learns"
    weights = ds_run["consolidated"]
    assert sorted(weights) == sorted(plain_run["weights"]), "final/ names are the plain model's"
    for name, value in plain_run["weights"].items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=WEIGHT_TOL, msg=name)


def test_consolidated_expert_parallel_weights_give_deepspeeds_logits_in_the_plain_model_and_generator(ds_run,
                                                                                                      tmp_path):
    save_consolidated(tmp_path / "final", ds_run["consolidated"], MODEL, None)
    model, _ = load_consolidated(tmp_path / "final")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(PROBE), ds_run["final_logits"], rtol=0, atol=1e-5)
    generator = TextGenerator.from_dir(tmp_path / "final")
    greedy = GenerationConfig(max_new_tokens=6, do_sample=False)
    prompts = [row.tolist() for row in PROBE]
    cached = generator.generate_ids(prompts, greedy)
    assert [ids[0] for ids in cached] == ds_run["final_logits"][:, -1].argmax(-1).tolist()
    assert cached == generator.generate_ids(prompts, greedy, use_cache=False), "KV-cached decoding routes alike"


def test_expert_parallel_checkpoint_resumes_bitwise_on_deepspeed(ds_run):
    assert ds_run["resumed"] == ds_run["uninterrupted"][SAVE_AT:]


def test_expert_parallel_checkpoint_continues_on_the_plain_engine_and_back(ds_run, plain_run):
    names = sorted(p.name for p in ds_run["checkpoint"].glob("layer_*_expert_*_model_states.pt"))
    assert len(names) == MODEL.num_layers * MODEL.num_experts, names  # DeepSpeed's per-expert files
    engine = plain_engine(seed=5)
    engine.load(ds_run["checkpoint"])
    assert_close_losses(run_steps(engine, SAVE_AT, STEPS), ds_run["uninterrupted"][SAVE_AT:])
    # plain checkpoint -> DeepSpeed EP=2 (the driver's from_plain)
    assert_close_losses(ds_run["from_plain"], plain_run["records"][SAVE_AT:])
    for name, value in plain_run["weights"].items():
        torch.testing.assert_close(ds_run["from_plain_consolidated"][name], value, rtol=0, atol=WEIGHT_TOL, msg=name)


MOE_RUN = ["--config", "tiny-moe", "--max-steps", "16", "--save-interval", "100", "--batch-size", "4",
           "--seq-len", "32", "--ep-size", "2", "--ds-config", str(REPO / "ds_configs" / "zero1.json")]


def test_tiny_moe_zero1_on_two_ranks_stops_on_sigterm_resumes_bitwise_and_its_final_weights_generate(
        shards, data_tokenizer, tmp_path):
    reference = tmp_path / "reference"
    done = run(train_cmd(shards, data_tokenizer.directory, reference, *MOE_RUN, deepspeed=True))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    records = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("split") == "train"]
    assert train[-1]["lm_loss"] < train[0]["lm_loss"] - 0.5, [r["lm_loss"] for r in train]
    assert {f"moe_load/l3_e{e}" for e in range(4)} <= set(train[-1]) and "moe_aux_loss" in train[-1]
    assert sum(train[-1][f"moe_load/l0_e{e}"] for e in range(4)) == pytest.approx(1.0)

    resumed = tmp_path / "resumed"
    cmd = train_cmd(shards, data_tokenizer.directory, resumed, *MOE_RUN, "--auto-resume", deepspeed=True)
    stopped = interrupt_after(cmd, resumed, steps=4)
    assert stopped.returncode != 0
    assert (resumed / "latest").is_file(), stopped.output[-4000:]
    latest = resumed / "ckpt" / (resumed / "latest").read_text().strip()
    assert 4 <= json.loads((latest / "trainer_state.json").read_text())["step"] < 16
    finished = run(cmd)
    assert finished.returncode == 0, finished.stdout[-4000:] + finished.stderr[-4000:]
    assert_same_run(reference, resumed)
    assert set(train_losses(resumed)) == set(range(16))

    model, tokenizer = load_consolidated(reference / "final")
    assert isinstance(model, MiniGPT) and model.config.num_experts == 4
    generated = subprocess.run([sys.executable, str(REPO / "launch" / "generate.py"), "--model",
                                str(reference / "final"), "--prompt", "The", "--max-new-tokens", "8", "--seed", "0"],
                               cwd=REPO, capture_output=True, text=True, timeout=300,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert "deepspeed" not in generated.stderr.lower()
