"""LoRA adapters (`--lora-rank`): only the adapters train, `final/` holds the merged weights that every reader
takes unchanged, and `final/adapter/` loads with the real `peft` package onto our Hugging Face export with the
merged model's logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from interop_models import random_model, save_model
from stop_request import StopAtStep

from minigpt.config import ConfigError, TrainConfig
from minigpt.signals import EXIT_FINISHED, EXIT_PREEMPTED
from minigpt.weights import load_consolidated

peft = pytest.importorskip("peft", reason="LoRA needs the peft package (the lora extra; .ci/run installs it)")

from minigpt.lora import (  # noqa: E402
    ADAPTER_DIR,
    attach_lora,
    hf_adapter_tensors,
    merged_state_dict,
    resolve_targets,
    save_peft_adapter,
)
from minigpt.train.loop import Trainer, dry_run  # noqa: E402

RANK, ALPHA = 4, 8.0


def adapted_model(vocab_size: int, targets: list[str] | None = None, seed: int = 0):
    """A random MiniGPT with adapters whose B is not zero (a freshly attached adapter changes nothing)."""
    model = random_model(vocab_size, seed=seed)
    attach_lora(model, RANK, ALPHA, 0.0, targets or [])
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model.eval()


def test_targets_take_our_names_and_llamas_and_refuse_others():
    assert resolve_targets([]) == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert resolve_targets(["q_proj", "v_proj", "down_proj"]) == ["qkv_proj", "down_proj"]
    with pytest.raises(ConfigError, match="--lora-targets 'attn' is no projection of the model"):
        TrainConfig.of(lora_rank=4, lora_targets=["attn"])
    with pytest.raises(ConfigError, match="give --lora-rank too"):
        TrainConfig.of(lora_alpha=16)
    assert TrainConfig.of(lora_rank=8).adapter.alpha == 16.0  # alpha 0: twice the rank


def test_only_the_adapters_train_and_the_merged_weights_give_the_adapted_models_logits(data_tokenizer):
    model = adapted_model(data_tokenizer.vocab_size)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in name for name in trainable)
    merged = merged_state_dict(model.state_dict(), ALPHA, RANK)
    plain = random_model(data_tokenizer.vocab_size)
    assert merged.keys() == plain.state_dict().keys()
    plain.load_state_dict(merged)
    ids = torch.tensor([data_tokenizer.encode("First Citizen: hear me speak.")])
    with torch.no_grad():
        assert torch.allclose(plain(ids), model(ids), atol=1e-5)
        assert not torch.allclose(random_model(data_tokenizer.vocab_size)(ids), model(ids), atol=1e-3)


def test_the_adapter_loads_with_peft_onto_our_hf_export_with_the_merged_logits(data_tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers", reason="the comparison needs transformers (the hf extra)")
    from minigpt.interop.hf_llama import export_hf

    model = adapted_model(data_tokenizer.vocab_size, targets=["q_proj", "o_proj", "gate_up_proj", "down_proj"])
    base = save_model(tmp_path / "base", random_model(data_tokenizer.vocab_size), data_tokenizer)
    adapter = save_peft_adapter(tmp_path / ADAPTER_DIR, model.state_dict(), model.config, rank=RANK, alpha=ALPHA,
                                dropout=0.0, base=str(base))
    assert {p.name for p in adapter.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == RANK and config["lora_alpha"] == ALPHA
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                                "v_proj"]

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(export_hf(base, tmp_path / "hf"),
                                                                 torch_dtype=torch.float32)
    with_adapter = peft.PeftModel.from_pretrained(hf_model, str(adapter)).eval()
    ids = torch.tensor([data_tokenizer.encode("学而时习之，不亦说乎？ First Citizen.")])
    with torch.no_grad():
        ours = model(ids)
        theirs = with_adapter(input_ids=ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-5
    # Every adapter tensor reached PEFT: none left at its init (lora_B of a fresh adapter is zero).
    assert len(hf_adapter_tensors(model.state_dict(), model.config)) == 2 * 7 * model.config.num_layers


def lora_config(out: Path, init: Path, shards: Path, data_tokenizer, **options) -> TrainConfig:
    settings = dict(mode="pretrain", config="tiny", data=[str(shards)], data_dir=str(out.parent), out=str(out),
                    tokenizer=str(data_tokenizer.directory), init_from=str(init), seq_len=32, batch_size=4,
                    max_steps=4, warmup_steps=1, learning_rate=1e-2, eval_interval=2, eval_batches=2,
                    save_interval=0, log_interval=100, sample_prompt="a", lora_rank=RANK)
    return TrainConfig.of(**{**settings, **options})


def rows(run_dir: Path, split: str) -> list[dict]:
    return [r for r in map(json.loads, filter(None, (run_dir / "metrics.jsonl").read_text().splitlines()))
            if r.get("split") == split]


def test_a_lora_run_trains_only_adapters_resumes_bitwise_and_writes_merged_weights_and_the_adapter(
        tmp_path, shards, data_tokenizer):
    init = save_model(tmp_path / "init", random_model(data_tokenizer.vocab_size), data_tokenizer)
    whole = tmp_path / "whole"
    assert Trainer(lora_config(whole, init, shards, data_tokenizer)).run() == EXIT_FINISHED

    interrupted = tmp_path / "interrupted"
    trainer = Trainer(lora_config(interrupted, init, shards, data_tokenizer))
    assert trainer.run(StopAtStep(trainer, 2)) == EXIT_PREEMPTED
    assert Trainer(lora_config(interrupted, init, shards, data_tokenizer, auto_resume=True)).run() == EXIT_FINISHED
    assert [r["loss"] for r in rows(interrupted, "train")] == [r["loss"] for r in rows(whole, "train")]

    base, _tokenizer = load_consolidated(init)
    merged, tokenizer = load_consolidated(whole / "final")  # a plain model: generate, chat, export read it as ever
    resumed, _ = load_consolidated(interrupted / "final")
    assert tokenizer is not None and merged.state_dict().keys() == base.state_dict().keys()
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in merged.state_dict().items())
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(v, base.state_dict()[k])}
    assert changed and all(k.rsplit(".", 2)[-2] in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
                           for k in changed)  # the embeddings and norms stayed frozen
    assert (whole / "final" / ADAPTER_DIR / "adapter_model.safetensors").is_file()


def test_lora_from_random_weights_is_refused_by_name(tmp_path, shards, data_tokenizer):
    cfg = TrainConfig.of(mode="pretrain", config="tiny", data=[str(shards)], out=str(tmp_path / "run"),
                         tokenizer=str(data_tokenizer.directory), lora_rank=RANK)
    with pytest.raises(ConfigError, match="--lora-rank adapts trained weights, but this run starts from random init"):
        Trainer(cfg)


def test_a_dry_run_reports_the_adapters_and_their_optimizer_state_as_the_run_has_them(tmp_path, shards,
                                                                                     data_tokenizer, capsys):
    init = save_model(tmp_path / "init", random_model(data_tokenizer.vocab_size), data_tokenizer)
    cfg = lora_config(tmp_path / "run", init, shards, data_tokenizer, max_steps=1, eval_interval=0)
    assert dry_run(cfg) == EXIT_FINISHED
    plan = capsys.readouterr().out
    assert not (tmp_path / "run").exists()
    trainer = Trainer(cfg)
    started = capsys.readouterr().out
    note = next(line for line in started.splitlines() if "trainable parameters of" in line).removeprefix("[minigpt] ")
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for name, p in trainer.model.named_parameters() if ".lora_" not in name)
    assert f"adapters        {note}; AdamW state {8 * trainable / 2**20:.1f} MB (full fine-tuning: " \
           f"{8 * total / 2**20:.1f} MB)" in plan
    trainer.train_step()
    state = [t for state in trainer.engine.optimizer.state.values() for name, t in state.items() if name != "step"]
    assert sum(t.numel() * t.element_size() for t in state) == 8 * trainable  # AdamW's two fp32 moments
    trainer.release_run_dir()


def test_a_dry_run_refuses_lora_from_random_weights_as_the_run_does(tmp_path, shards, data_tokenizer):
    cfg = TrainConfig.of(mode="pretrain", config="tiny", data=[str(shards)], out=str(tmp_path / "run"),
                         tokenizer=str(data_tokenizer.directory), lora_rank=RANK)
    with pytest.raises(ConfigError, match="--lora-rank adapts trained weights, but this run starts from random init"):
        dry_run(cfg)


def test_a_lora_policy_is_its_own_reference_with_the_adapters_off(data_tokenizer):
    from minigpt.train.sequences import load_frozen_model

    model = adapted_model(data_tokenizer.vocab_size).train()
    reference = load_frozen_model(None, torch.device("cpu"), "dpo", "fp32", policy=model)
    base = random_model(data_tokenizer.vocab_size)
    ids = torch.tensor([data_tokenizer.encode("All: Speak, speak.")])
    with torch.no_grad():
        assert torch.equal(reference(ids), base(ids))  # the frozen weights are the base: exactly its logits
        assert not torch.allclose(model(ids), base(ids), atol=1e-3)  # the adapters are on again afterwards
    assert sum(p.numel() for p in reference.parameters()) == 0  # no second copy of the weights
    assert model.training and all(p.requires_grad for n, p in model.named_parameters() if ".lora_" in n)


def test_lora_init_continues_a_saved_adapter_on_its_own_base_only(tmp_path, shards, data_tokenizer):
    init = save_model(tmp_path / "init", random_model(data_tokenizer.vocab_size), data_tokenizer)
    first = tmp_path / "first"
    assert Trainer(lora_config(first, init, shards, data_tokenizer, max_steps=2)).run() == EXIT_FINISHED
    adapter = first / "final" / ADAPTER_DIR

    cfg = lora_config(tmp_path / "second", init, shards, data_tokenizer, lora_init=str(adapter))
    cfg = cfg.replace(lora_rank=0)  # rank, alpha and targets come from the adapter
    continued = Trainer(cfg)
    merged, _tokenizer = load_consolidated(first / "final")
    ids = torch.tensor([data_tokenizer.encode("First Citizen: hear me speak.")])
    with torch.no_grad():  # the base plus the saved adapter is the first run's merged model
        assert torch.allclose(continued.model.eval()(ids), merged(ids), atol=1e-5)
    continued.release_run_dir()

    with pytest.raises(ConfigError, match=f"--lora-init {adapter} has --lora-rank {RANK}, not 8"):
        Trainer(lora_config(tmp_path / "third", init, shards, data_tokenizer, lora_init=str(adapter)).replace(
            lora_rank=8))
    other = save_model(tmp_path / "other", random_model(data_tokenizer.vocab_size, seed=5), data_tokenizer)
    with pytest.raises(ConfigError, match="was trained on another base than --init-from"):
        Trainer(lora_config(tmp_path / "fourth", other, shards, data_tokenizer, lora_init=str(adapter)))


@pytest.mark.integration
def test_deepspeed_zero2_two_ranks_train_the_adapters_like_the_plain_engine(tmp_path, shards, data_tokenizer):
    """Two ZeRO-2 ranks of batch 4 log the losses of one plain rank accumulating the same two micro-batches, the
    optimizer (sharded by ZeRO) holds the adapters only, and `final/` is the merged model plus the adapter."""
    pytest.importorskip("deepspeed")
    from two_engines import train_losses, train_on_both_engines

    init = save_model(tmp_path / "init", random_model(data_tokenizer.vocab_size), data_tokenizer)
    common = ["--mode", "pretrain", "--config", "tiny", "--init-from", str(init), "--lora-rank", str(RANK),
              "--seq-len", "32", "--max-steps", "4", "--warmup-steps", "1", "--learning-rate", "1e-2",
              "--eval-interval", "0", "--eval-batches", "1", "--log-interval", "1", "--save-interval", "0",
              "--sample-prompt", "a", "--data", str(shards), "--data-dir", str(tmp_path),
              "--tokenizer", str(data_tokenizer.directory), "--precision", "fp32", "--prefetch", "0"]
    done = train_on_both_engines(tmp_path, common, "zero2.json")
    losses = {}
    for name, finished in done.items():
        assert "trainable parameters of" in finished.stdout
        losses[name] = train_losses(tmp_path / name)
        assert (tmp_path / name / "final" / ADAPTER_DIR / "adapter_model.safetensors").is_file()
    assert len(losses["plain"]) == len(losses["deepspeed"]) == 4
    assert all(abs(a - b) < 1e-4 for a, b in zip(losses["plain"], losses["deepspeed"], strict=True)), losses
    plain, _tokenizer = load_consolidated(tmp_path / "plain" / "final")
    sharded, _tokenizer = load_consolidated(tmp_path / "deepspeed" / "final")
    assert all(torch.allclose(v, sharded.state_dict()[k], atol=1e-5) for k, v in plain.state_dict().items())


def test_a_lora_run_on_a_hugging_face_llama_gives_an_adapter_that_peft_loads_back_onto_it(tmp_path, shards,
                                                                                           data_tokenizer):
    """Fine-tuning a model one already has: --init-from an HF Llama directory, --lora-rank; the adapter the run
    writes loads with `peft` onto that same directory and gives the logits of the run's merged final/."""
    transformers = pytest.importorskip("transformers", reason="an HF Llama directory needs transformers (the hf extra)")
    from minigpt.interop.hf_llama import export_hf

    base = save_model(tmp_path / "base", random_model(data_tokenizer.vocab_size), data_tokenizer)
    hf_dir = export_hf(base, tmp_path / "hf")
    run = tmp_path / "run"
    assert Trainer(lora_config(run, hf_dir, shards, data_tokenizer)).run() == EXIT_FINISHED

    merged, _tokenizer = load_consolidated(run / "final")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.tensor([data_tokenizer.encode("学而时习之 First Citizen: hear me speak.")])
    with torch.no_grad():
        before = hf_model(input_ids=ids).logits
        with_adapter = peft.PeftModel.from_pretrained(hf_model, str(run / "final" / ADAPTER_DIR)).eval()
        assert (merged.eval()(ids) - with_adapter(input_ids=ids).logits).abs().max().item() <= 1e-5
        assert not torch.allclose(merged(ids), before, atol=1e-4)  # the adapter did train
