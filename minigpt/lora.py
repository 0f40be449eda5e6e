"""LoRA adapters through the PEFT library: `--lora-rank R` trains low-rank adapters on the chosen projections of
a frozen model, in any mode and on either engine.

PEFT injects its `LoraLayer`s into our own `MiniGPT` (`peft.inject_adapter_in_model`), so the engines, the
checkpoints and the objectives see an ordinary module whose only trainable tensors are the adapters (and what
the objective adds around the model, such as the reward head): the optimizer holds only those, and ZeRO
shards only those. At the end of a run `final/` holds the merged weights (`merged_state_dict`: W + B·A·alpha/r),
so every reader of `final/` is unchanged, and `final/adapter/` the adapter alone in PEFT's own format with
Hugging Face Llama module names (`save_peft_adapter`), which `peft` loads onto our Hugging Face export.

Our attention and feed-forward projections are fused (`qkv_proj` is q, k and v; `gate_up_proj` is gate and up),
so one LoRA on `qkv_proj` is, in Llama's names, three LoRAs that share their `lora_A` and split `lora_B` by rows:
(B·A) split by rows is (B split by rows)·A. `--lora-targets q_proj` therefore means all of `qkv_proj`.

peft (with transformers) is an optional extra, `pip install -e ".[lora]"`; it is imported only when a run asks
for adapters.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from minigpt.config import ConfigError, MiniGPTConfig, lora_targets
from minigpt.fsutil import staged_directory
from minigpt.i18n import _

ADAPTER_DIR = "adapter"
"""Where a LoRA run's `final/` keeps the adapter alone (PEFT format)."""
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.default)?\.weight$")


class LoraError(ValueError):
    """A LoRA setting or file that cannot be used; the message names it."""


def resolve_targets(names: list[str]) -> list[str]:
    """Our module names for `--lora-targets` (empty: every projection); an unknown name is a LoraError."""
    try:
        return lora_targets(names)
    except ConfigError as err:
        raise LoraError(str(err)) from None


def _peft():
    try:
        import peft
    except ImportError:
        raise LoraError(_("--lora-rank needs the peft package: pip install -e \".[lora]\"")) from None
    return peft


def lora_config(rank: int, alpha: float, dropout: float, targets: list[str]):
    """The `peft.LoraConfig` of our adapters on `targets` (our module names)."""
    return _peft().LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")


def attach_lora(model: nn.Module, rank: int, alpha: float, dropout: float, targets: list[str]) -> int:
    """Inject LoRA adapters into every `MiniGPT` inside `model` (in place) and freeze everything else of it;
    returns the number of trainable adapter parameters. Parameters outside the MiniGPT (a head an objective
    adds later) are not touched."""
    from minigpt.model import MiniGPT

    backbones = [module for module in model.modules() if isinstance(module, MiniGPT)]
    if any(backbone.config.is_moe for backbone in backbones):
        raise LoraError(_("--lora-rank: mixture-of-experts models are not supported yet (their experts are not "
                          "Llama projections); fine-tune them in full"))
    peft = _peft()
    config = lora_config(rank, alpha, dropout, resolve_targets(targets))
    trainable = 0
    for backbone in backbones:
        peft.inject_adapter_in_model(config, backbone)
        for name, param in backbone.named_parameters():
            param.requires_grad_(".lora_" in name)
            trainable += param.numel() if param.requires_grad else 0
    return trainable


def _lora_parts(state_dict: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Adapted module's full name -> {"A": lora_A, "B": lora_B} of every adapter in `state_dict`."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state_dict.items():
        match = _LORA_KEY.match(name)
        if match:
            parts.setdefault(match["module"], {})[match["part"]] = tensor
    return parts


def _in_model(module: str) -> str:
    """`module`'s name inside the MiniGPT (`blocks.0.attn.qkv_proj`), a wrapper's prefix (the reward model's, the
    PPO critic's) left off."""
    return module[module.index("blocks."):] if "blocks." in module else module


def merged_state_dict(state_dict: Mapping[str, torch.Tensor], alpha: float, rank: int) -> dict[str, torch.Tensor]:
    """The plain state dict of an adapted model: each adapted weight W becomes W + (B·A)·alpha/rank, in fp32 and
    cast back to W's dtype; PEFT's `base_layer.` disappears from the names and the adapters are dropped."""
    adapters = _lora_parts(state_dict)
    merged = {}
    scale = alpha / rank
    for name, tensor in state_dict.items():
        if _LORA_KEY.match(name):
            continue
        module, _dot, leaf = name.rpartition(".")
        plain = name.replace(".base_layer.", ".")
        owner = module.removesuffix(".base_layer")
        if module.endswith(".base_layer") and leaf == "weight" and owner in adapters:
            pair = adapters[owner]
            delta = pair["B"].float() @ pair["A"].float() * scale
            tensor = (tensor.float() + delta).to(tensor.dtype)
        merged[plain] = tensor
    return merged


def adapter_tensors(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Our module name (e.g. `blocks.0.attn.qkv_proj`) -> (lora_A, lora_B) of every adapter in `state_dict`."""
    return {_in_model(module): (parts["A"], parts["B"]) for module, parts in _lora_parts(state_dict).items()}


def hf_adapter_tensors(state_dict: Mapping[str, torch.Tensor], config: MiniGPTConfig) -> dict[str, torch.Tensor]:
    """The adapters as PEFT names them on a Hugging Face `LlamaForCausalLM`
    (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`): a fused projection's `lora_A` is
    shared by its parts and its `lora_B` split by rows, as `minigpt.interop.hf_llama` splits the weight."""
    from minigpt.interop.hf_llama import split_sizes, tensor_table

    llama_names = dict(tensor_table(config))
    out = {}
    for module, (a, b) in adapter_tensors(state_dict).items():
        weight = f"{module}.weight"
        if weight not in llama_names:
            raise LoraError(_("adapter on {module}: no Llama equivalent to export it to").format(module=module))
        theirs = llama_names[weight]
        sizes = split_sizes(weight, config)
        b_parts = b.split(sizes, dim=0) if sizes else (b,)
        for hf_weight, b_part in zip(theirs, b_parts, strict=True):
            hf_module = hf_weight.removesuffix(".weight")
            out[f"base_model.model.{hf_module}.lora_A.weight"] = a.detach().to("cpu", torch.float32).contiguous().clone()
            out[f"base_model.model.{hf_module}.lora_B.weight"] = (
                b_part.detach().to("cpu", torch.float32).contiguous().clone())
    return out


def save_peft_adapter(out_dir: str | Path, state_dict: Mapping[str, torch.Tensor], config: MiniGPTConfig, *,
                      rank: int, alpha: float, dropout: float, base: str = "", base_checksum: str | None = None
                      ) -> Path:
    """Write the adapters of `state_dict` as a PEFT adapter directory (`adapter_config.json` +
    `adapter_model.safetensors`) for the Hugging Face export of the base model; atomically. `minigpt_adapter.json`
    beside them records the base (`base`, and the SHA-256 of its weights file, which `--lora-init` checks)."""
    from safetensors.torch import save_file

    tensors = hf_adapter_tensors(state_dict, config)
    targets = sorted({name.split(".")[-3] for name in tensors})
    peft_config = _peft().LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                                     bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base or None)
    out_dir = Path(out_dir)
    with staged_directory(out_dir) as tmp:
        peft_config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "minigpt_adapter.json").write_text(json.dumps(
            {"rank": rank, "alpha": alpha, "targets": targets, "base": base, "base_checksum": base_checksum},
            indent=2) + "\n")
    return out_dir


def describe(trainable: int, total: int, rank: int, alpha: float, targets: list[str]) -> str:
    """The start line of a LoRA run: what trains and how much of the model that is."""
    return _("LoRA rank {rank}, alpha {alpha:g} on {targets}: {trainable:,} trainable parameters of {total:,} "
             "({share:.2%}); the rest is frozen").format(
        rank=rank, alpha=alpha, targets=", ".join(resolve_targets(targets)), trainable=trainable, total=total,
        share=trainable / max(total, 1))


def lora_layers(model: nn.Module) -> list[nn.Module]:
    """PEFT's LoRA layers inside `model`."""
    from peft.tuners.lora import LoraLayer

    return [module for module in model.modules() if isinstance(module, LoraLayer)]


class AdaptersOff(nn.Module):
    """A LoRA policy with its adapters switched off for the length of one forward pass, without gradients: the
    frozen base it adapts, used as the DPO/GRPO reference with no second copy of the weights. The policy is
    held, not registered, so this module's `eval()`/`train()` and state dict never reach it."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self._policy = (policy,)
        self._layers = lora_layers(policy)

    def forward(self, *args, **kwargs):
        policy = self._policy[0]
        training = policy.training
        policy.eval()  # as a loaded reference runs: no dropout
        for layer in self._layers:
            layer.enable_adapters(False)
        try:
            with torch.no_grad():
                return policy(*args, **kwargs)
        finally:
            for layer in self._layers:
                layer.enable_adapters(True)  # PEFT makes the active adapters trainable again
            policy.train(training)


@dataclass(frozen=True)
class LoraSpec:
    """The adapters a run trains: rank, alpha, dropout and targets (our module names)."""

    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]


@dataclass
class SavedAdapter:
    """A PEFT adapter directory read back: its settings, its tensors (PEFT's Llama names) and the base it records."""

    directory: Path
    spec: LoraSpec
    tensors: dict[str, torch.Tensor]
    base_checksum: str | None


def weights_checksum(model_dir: Path) -> str:
    """SHA-256 of a consolidated directory's weights file: what an adapter records of its base."""
    from minigpt.checkpoint import sha256_of
    from minigpt.weights import WEIGHTS_FILE

    return sha256_of(Path(model_dir) / WEIGHTS_FILE)


def read_adapter(directory: str | Path) -> SavedAdapter:
    """Read a PEFT LoRA adapter directory (safetensors only: nothing in it can run code); a LoraError names what
    is missing or unusable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from minigpt import strict_json

    directory = Path(directory)
    config_path, weights_path = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise LoraError(_("--lora-init {dir}: no {name} (a PEFT adapter directory, such as a LoRA run's "
                              "final/adapter)").format(dir=directory, name=path.name))
    try:
        config = strict_json.read_json(config_path, 1 << 20)
        tensors = load_file(str(weights_path))
    except (strict_json.JSONFileError, SafetensorError, OSError) as err:
        raise LoraError(_("--lora-init {dir}: {error}").format(dir=directory, error=err)) from None
    if config.get("peft_type") != "LORA" or not isinstance(config.get("r"), int) or config["r"] <= 0:
        raise LoraError(_("{path}: not a LoRA adapter (peft_type {kind!r}, r {rank!r})").format(
            path=config_path, kind=config.get("peft_type"), rank=config.get("r")))
    targets = resolve_targets(list(config.get("target_modules") or []))
    spec = LoraSpec(config["r"], float(config.get("lora_alpha") or 2 * config["r"]),
                    float(config.get("lora_dropout") or 0.0), tuple(targets))
    ours = directory / "minigpt_adapter.json"
    base = strict_json.read_json(ours, 1 << 20).get("base_checksum") if ours.is_file() else None
    return SavedAdapter(directory, spec, tensors, base)


def load_adapter_weights(model: nn.Module, saved: SavedAdapter, config: MiniGPTConfig) -> None:
    """Copy a saved adapter into the LoRA layers `attach_lora` made (fused projections' parts joined again: their
    `lora_A` must be one shared matrix, as ours writes it); a LoraError names a tensor that does not fit."""
    from minigpt.interop.hf_llama import tensor_table

    llama_names = dict(tensor_table(config))
    params = dict(model.named_parameters())
    for name, param in params.items():
        match = _LORA_KEY.match(name)
        if not match:
            continue
        module = match["module"]
        weight = _in_model(module) + ".weight"
        parts = [f"base_model.model.{hf.removesuffix('.weight')}.lora_{match['part']}.weight"
                 for hf in llama_names.get(weight, ())]
        missing = [part for part in parts if part not in saved.tensors]
        if not parts or missing:
            raise LoraError(_("{dir}: no adapter tensor {name} for {module}").format(
                dir=saved.directory, name=(missing or [module])[0], module=module))
        tensors = [saved.tensors[part] for part in parts]
        if match["part"] == "A":
            if any(not torch.equal(tensors[0], other) for other in tensors[1:]):
                raise LoraError(_("{dir}: the parts of {module} have different lora_A matrices; MiniGPT's fused "
                                  "projection needs one shared lora_A (as MiniGPT writes its adapters)").format(
                    dir=saved.directory, module=module))
            value = tensors[0]
        else:
            value = torch.cat(tensors, dim=0)
        if value.shape != param.shape:
            raise LoraError(_("{dir}: adapter tensor for {module}.lora_{part} has shape {shape}, the model's is "
                              "{expected}: the adapter was trained on another model").format(
                dir=saved.directory, module=module, part=match["part"], shape=tuple(value.shape),
                expected=tuple(param.shape)))
        with torch.no_grad():
            param.copy_(value.to(param.dtype))
