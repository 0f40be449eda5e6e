"""A MiniGPT mixture-of-experts model as transformers' GraniteMoeShared (`GraniteMoeSharedForCausalLM`), exactly.

Why this architecture: its attention, norms and RoPE are Llama's (q/k/v/o without biases, RMSNorm,
rotate-half RoPE, grouped-query attention); its router takes the top-k router logits and softmaxes over
those k, which equals our DeepSpeed TopKGate weights (softmax over all experts, top-k, renormalised over
the k) for k >= 2; its routed experts are SwiGLU with `gate` before `up` in one fused matrix, like our
`gate_up_proj`; and its one shared MLP has no gate, so our `num_shared_experts` always-on SwiGLU experts
become one shared MLP whose intermediate width is their sum (gates stacked, then ups; downs side by
side). Its multipliers are set neutral: embedding, residual and logits 1, attention `head_dim ** -0.5`.

What it cannot express is refused by the field's name: top-1 routing (we weight the expert by its gate
probability, GraniteMoeShared by 1), a capacity factor (we may drop tokens, it never does).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from minigpt.config import MiniGPTConfig
from minigpt.i18n import _

MOE_FIELDS = ("num_experts", "experts_per_token", "num_shared_experts", "moe_aux_loss_weight",
              "moe_z_loss_weight", "moe_capacity_factor")
"""MiniGPTConfig MoE fields the GraniteMoeShared export takes into account (the losses only train)."""

# Our per-layer MoE tensors → GraniteMoeShared's (as saved on disk; transformers renames on load).
ROUTER = ("blocks.{i}.ffn.router.weight", "model.layers.{i}.block_sparse_moe.router.layer.weight")
EXPERTS_GATE_UP = "model.layers.{i}.block_sparse_moe.input_linear.weight"  # (E, 2F, H): stacked gate_up_proj
EXPERTS_DOWN = "model.layers.{i}.block_sparse_moe.output_linear.weight"  # (E, H, F): stacked down_proj
SHARED_GATE_UP = "model.layers.{i}.shared_mlp.input_linear.weight"  # (2 S F, H): all gates, then all ups
SHARED_DOWN = "model.layers.{i}.shared_mlp.output_linear.weight"  # (H, S F): downs side by side


def moe_problem(config: MiniGPTConfig) -> str | None:
    """Why `config`'s MoE cannot be written as GraniteMoeShared exactly (naming the field), or None."""
    if config.experts_per_token < 2:
        return _("model config field experts_per_token={value} has no GraniteMoeShared equivalent (top-1 "
                 "routing weights the expert by its gate probability; transformers by 1)"
                 ).format(value=config.experts_per_token)
    if config.moe_capacity_factor:
        return _("model config field moe_capacity_factor={value!r} has no GraniteMoeShared equivalent (it drops "
                 "tokens over an expert's capacity; transformers never does); export a model trained with "
                 "moe_capacity_factor 0").format(value=config.moe_capacity_factor)
    return None


def moe_hf_tensors(state_dict: Mapping[str, torch.Tensor], config: MiniGPTConfig, layer: int,
                   convert) -> dict[str, torch.Tensor]:
    """Layer `layer`'s router, experts and shared experts as GraniteMoeShared tensors (`convert` casts)."""
    prefix = f"blocks.{layer}.ffn."
    out = {ROUTER[1].format(i=layer): convert(state_dict[ROUTER[0].format(i=layer)])}
    experts = range(config.num_experts)
    out[EXPERTS_GATE_UP.format(i=layer)] = convert(torch.stack(
        [state_dict[f"{prefix}experts.{e}.gate_up_proj.weight"] for e in experts]))
    out[EXPERTS_DOWN.format(i=layer)] = convert(torch.stack(
        [state_dict[f"{prefix}experts.{e}.down_proj.weight"] for e in experts]))
    if config.num_shared_experts:
        shared = range(config.num_shared_experts)
        halves = [state_dict[f"{prefix}shared.{s}.gate_up_proj.weight"].chunk(2, dim=0) for s in shared]
        out[SHARED_GATE_UP.format(i=layer)] = convert(torch.cat([h[0] for h in halves] + [h[1] for h in halves]))
        out[SHARED_DOWN.format(i=layer)] = convert(torch.cat(
            [state_dict[f"{prefix}shared.{s}.down_proj.weight"] for s in shared], dim=1))
    return out


def moe_tensor_names(config: MiniGPTConfig) -> set[str]:
    """Our state-dict names the MoE part of the export consumes."""
    names = set()
    for i in range(config.num_layers):
        names.add(ROUTER[0].format(i=i))
        for group, count in (("experts", config.num_experts), ("shared", config.num_shared_experts)):
            for e in range(count):
                names |= {f"blocks.{i}.ffn.{group}.{e}.gate_up_proj.weight", f"blocks.{i}.ffn.{group}.{e}.down_proj.weight"}
    return names


def moe_hf_config(llama: dict[str, Any], config: MiniGPTConfig) -> dict[str, Any]:
    """`config.json` of the GraniteMoeSharedForCausalLM, from the Llama one of the same attention."""
    hf = {key: value for key, value in llama.items()
          if key not in ("mlp_bias", "pretraining_tp", "head_dim", "rope_scaling", "rope_theta")}
    hf.update({
        "architectures": ["GraniteMoeSharedForCausalLM"], "model_type": "granitemoeshared",
        "num_local_experts": config.num_experts, "num_experts_per_tok": config.experts_per_token,
        "shared_intermediate_size": config.num_shared_experts * config.ffn_hidden_size,
        "embedding_multiplier": 1.0, "residual_multiplier": 1.0, "logits_scaling": 1.0,
        "attention_multiplier": config.head_dim ** -0.5,
        "output_router_logits": False, "router_aux_loss_coef": config.moe_aux_loss_weight,
    })
    return hf

