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
from pathlib import Path

import torch
from torch import nn

from minigpt.config import MiniGPTConfig
from minigpt.fsutil import staged_directory
from minigpt.i18n import _

TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
"""The projections LoRA can adapt, by our module names (the default: all of them)."""
HF_ALIASES = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
              "up_proj": "gate_up_proj"}
"""Hugging Face Llama names of parts of a fused projection: each selects the whole fused one."""
ADAPTER_DIR = "adapter"
"""Where a LoRA run's `final/` keeps the adapter alone (PEFT format)."""
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.default)?\.weight$")


class LoraError(ValueError):
    """A LoRA setting or file that cannot be used; the message names it."""


def resolve_targets(names: list[str]) -> list[str]:
    """Our module names for `--lora-targets` (empty: every projection); an unknown name is a LoraError."""
    if not names:
        return list(TARGETS)
    chosen = []
    for name in names:
        target = HF_ALIASES.get(name, name)
        if target not in TARGETS:
            raise LoraError(_("--lora-targets {name!r} is no projection of the model; choose from {targets} (or their "
                              "Llama names {aliases})").format(name=name, targets=", ".join(TARGETS),
                                                               aliases=", ".join(HF_ALIASES)))
        if target not in chosen:
            chosen.append(target)
    return chosen


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


def merged_state_dict(state_dict: Mapping[str, torch.Tensor], alpha: float, rank: int) -> dict[str, torch.Tensor]:
    """The plain state dict of an adapted model: each adapted weight W becomes W + (B·A)·alpha/rank, in fp32 and
    cast back to W's dtype; PEFT's `base_layer.` disappears from the names and the adapters are dropped."""
    adapters: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state_dict.items():
        match = _LORA_KEY.match(name)
        if match:
            adapters.setdefault(match["module"], {})[match["part"]] = tensor
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
    found: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state_dict.items():
        match = _LORA_KEY.match(name)
        if match:
            module = match["module"]
            module = module[module.index("blocks."):] if "blocks." in module else module  # a wrapper's prefix
            found.setdefault(module, {})[match["part"]] = tensor
    return {module: (parts["A"], parts["B"]) for module, parts in found.items()}


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
                      rank: int, alpha: float, dropout: float, base: str = "") -> Path:
    """Write the adapters of `state_dict` as a PEFT adapter directory (`adapter_config.json` +
    `adapter_model.safetensors`) for the Hugging Face export of the base model; atomically."""
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
            {"rank": rank, "alpha": alpha, "targets": targets, "base": base}, indent=2) + "\n")
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
