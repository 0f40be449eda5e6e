"""The MiniGPT decoder: pre-norm blocks of RMSNorm, rotary grouped-query attention and SwiGLU.

One file, read top to bottom: `RMSNorm`, rotary helpers, `KVCache`, `Attention`, `FeedForward`,
the mixture of experts (`route`, `MoEFeedForward`), `Block`, `MiniGPT`. Attention goes through `scaled_dot_product_attention`, which picks a fused
kernel (flash / memory-efficient) on CUDA and a vectorised one on CPU.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minigpt.config import MiniGPTConfig
from minigpt.i18n import _


class _RMSNormFunction(torch.autograd.Function):
    """y = x / rms(x) * weight, normalised in fp32, with a hand-written backward.

    Autograd's backward of the composed ops runs ~16 full-size elementwise kernels per norm; this one runs 7
    (measured 1.7-1.9x faster per norm on a CPU, where each kernel on a small model's activations costs a
    thread wake-up more than arithmetic). The forward equals the composed form to rounding (the sum of squares
    is one dot product instead of pow + mean); gradients agree within rounding.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # Normalise in fp32: bf16's 8-bit mantissa loses the mean of squares on long rows.
        x32 = x.float()
        rstd = torch.linalg.vecdot(x32, x32, dim=-1).unsqueeze(-1).div_(x.shape[-1]).add_(eps).rsqrt_()
        normed = x32 * rstd
        ctx.save_for_backward(normed, rstd, weight)
        return normed.type_as(x) * weight

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        normed, rstd, weight = ctx.saved_tensors
        grad32 = grad.float()
        grad_weight = (grad32 * normed).flatten(0, -2).sum(0)
        scaled = grad32 * weight.float()  # the gradient w.r.t. the normalised x
        # d(x * rstd): the row's gradient less its projection on the normalised row, times rstd.
        dot = torch.linalg.vecdot(scaled, normed, dim=-1).unsqueeze(-1).div_(normed.shape[-1])
        grad_x = torch.addcmul(scaled, normed, dot, value=-1).mul_(rstd)
        return grad_x.to(grad.dtype), grad_weight.to(weight.dtype), None


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale (no bias, no mean subtraction)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFunction.apply(x, self.weight, self.eps)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed-sin tables of shape (max_len, head_dim) in the rotate-half layout (Llama / GPT-NeoX).

    The sin table carries the rotation's sign (-sin on the first half, +sin on the second), so
    `apply_rope` swaps the halves without negating one of them."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1)
    signed_sin = torch.cat([-angles.sin(), angles.sin()], dim=-1)
    return cos.float(), signed_sin.float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` (B, H, T, D) by per-position angles; cos/signed_sin broadcast to it ((1|B), 1, T, D)."""
    swapped = x.roll(x.shape[-1] // 2, dims=-1)  # [x2, x1]: rolling by half swaps the halves
    return (x * cos + swapped * signed_sin).type_as(x)


class KVCache:
    """Pre-allocated keys and values of every layer for incremental decoding.

    `length` is how many positions are filled; the model appends a step's keys/values in each layer
    and advances `length` once the whole forward pass is done.
    """

    def __init__(self, config: MiniGPTConfig, batch_size: int, max_len: int | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.max_len = max_len or config.max_seq_len
        shape = (config.num_layers, batch_size, config.num_kv_heads, self.max_len, config.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k/v (B, Hkv, T, D) for `layer`; return all keys/values so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(_("KV cache holds {positions} positions; this step needs {needed}").format(
                positions=self.max_len, needed=end))
        self.keys[layer, :, :, self.length:end] = k
        self.values[layer, :, :, self.length:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows `rows` (used to drop finished sequences)."""
        self.keys = self.keys[:, rows]
        self.values = self.values[:, rows]


class Attention(nn.Module):
    """Causal self-attention with rotary positions and grouped key/value heads."""

    def __init__(self, config: MiniGPTConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        # One projection for queries, keys and values: one large matmul instead of three small ones.
        self.qkv_proj = nn.Linear(config.hidden_size, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim,
                                  bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None) -> torch.Tensor:
        b, t, _width = x.shape
        heads = self.qkv_proj(x).view(b, t, self.num_heads + 2 * self.num_kv_heads, self.head_dim).transpose(1, 2)
        # Queries and keys are rotated together, in one pass over their heads.
        qk, v = heads.split([self.num_heads + self.num_kv_heads, self.num_kv_heads], dim=1)
        q, k = apply_rope(qk, cos, sin).split([self.num_heads, self.num_kv_heads], dim=1)
        if cache is not None:
            k, v = cache.append(self.layer_index, k, v)
            if t == 1:
                return self.o_proj(self._decode_step(q, k, v, mask).reshape(b, 1, -1))
        if self.num_kv_heads != self.num_heads:
            # Expanding k/v is as fast as SDPA's enable_gqa on CPU and works on every torch >= 2.2.
            repeat = self.num_heads // self.num_kv_heads
            k = k.repeat_interleave(repeat, dim=1)
            v = v.repeat_interleave(repeat, dim=1)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and t > 1,
            dropout_p=self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))

    def _decode_step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor | None) -> torch.Tensor:
        """One new query per row (B, H, 1, D) against the cached keys/values (B, Hkv, S, D): two small matmuls.

        The query heads that share a key/value head are grouped, so the cache is read where it lies (no
        repeat_interleave copy of every layer's keys and values at every step), and the keys are the left
        operand: matmul reads the cache's (S, D) blocks as stored (the transposed-keys form copies them)."""
        b, s = q.shape[0], k.shape[2]
        grouped = q.reshape(b, self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim)
        scores = torch.matmul(k, grouped.transpose(-1, -2)).mul_(self.head_dim ** -0.5)  # (B, Hkv, S, G)
        if mask is not None:  # (B, 1, 1, S): the padding of left-padded prompts
            scores = scores.masked_fill(~mask.reshape(b, 1, s, 1), float("-inf"))
        probs = scores.softmax(dim=-2).to(v.dtype)
        return torch.matmul(probs.transpose(-1, -2), v)  # (B, Hkv, G, D): the query heads in their order


class _SwiGLUFunction(torch.autograd.Function):
    """silu(gate) * up of `gate_up_proj`'s (..., 2F) output, whose backward writes the gradients of both
    halves straight into one (..., 2F) tensor instead of concatenating them afterwards (bitwise the same
    as the composed ops, one full-size kernel less per block)."""

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        activated = F.silu(gate)
        ctx.save_for_backward(gate, up, activated)
        return activated * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        gate, up, activated = ctx.saved_tensors
        grad_gate_up = torch.empty(*grad.shape[:-1], 2 * grad.shape[-1], dtype=gate.dtype, device=grad.device)
        grad_gate, grad_up = grad_gate_up.chunk(2, dim=-1)
        torch.mul(grad, activated, out=grad_up)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_gate)
        return grad_gate_up


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), with gate and up computed by one matmul (`gate_up_proj`)."""

    def __init__(self, config: MiniGPTConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=False)
        self.down_proj = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(_SwiGLUFunction.apply(self.gate_up_proj(x)))


@dataclass
class Routing:
    """Where a router sends each of S tokens among E experts."""

    mask: torch.Tensor
    """(S, E) bool: token s goes through expert e (after capacity dropping)."""
    weights: torch.Tensor
    """(S, E) fp32 combine weights: the gate probabilities of the chosen experts, renormalised for k >= 2."""
    aux_loss: torch.Tensor
    """Load-balancing loss (1.0 when perfectly balanced), before its weight."""
    counts: torch.Tensor
    """(E,) routed assignments per expert before capacity dropping (DeepSpeed's `exp_counts`)."""


def route(logits: torch.Tensor, k: int, capacity_factor: float = 0.0) -> Routing:
    """DeepSpeed's `TopKGate` maths (deepspeed/moe/sharded_moe.py, 0.19) on fp32 router logits (S, E), with
    its noise, second-expert sampling and random token selection off, so both engines compute the same:

    k = 1 (Switch): weight = the chosen gate probability; aux = E * sum_e(mean gate_e * share routed to e).
    k = 2 (GShard): the two gates renormalised; aux as for k = 1 with the share of first choices.
    k > 2: the k gates renormalised; aux = E / k * sum_e(mean gate_e * share of routes to e).
    capacity_factor > 0 (k >= 2): each expert keeps ceil(S / E * k * factor) routes; k = 2 drops the later
    tokens (first choices before second ones), k > 2 the routes with the smallest gate probability."""
    gates = F.softmax(logits, dim=1)
    num_tokens, num_experts = gates.shape
    capacity = max(math.ceil(num_tokens / num_experts * capacity_factor * k), 1) if capacity_factor else 0
    if k <= 2:
        mask1 = F.one_hot(gates.argmax(dim=1), num_experts)
        aux = (gates.mean(0) * mask1.float().mean(0)).sum() * num_experts
        if k == 1:
            return Routing(mask1.bool(), gates * mask1, aux, mask1.sum(0))
        mask2 = F.one_hot(logits.masked_fill(mask1.bool(), float("-inf")).argmax(dim=1), num_experts)
        counts = (mask1 + mask2).sum(0)
        if capacity:
            first = torch.cumsum(mask1, dim=0) - 1
            second = torch.cumsum(mask2, dim=0) - 1 + mask1.sum(0, keepdim=True)
            mask1, mask2 = mask1 * (first < capacity), mask2 * (second < capacity)
        gate1, gate2 = (gates * mask1).sum(1), (gates * mask2).sum(1)
        denom = (gate1 + gate2).clamp(min=torch.finfo(gates.dtype).eps)
        weights = (gate1 / denom)[:, None] * mask1 + (gate2 / denom)[:, None] * mask2
        return Routing((mask1 + mask2).bool(), weights, aux, counts)
    top_gate, top_index = torch.topk(gates, k=k, dim=1)
    mask = torch.zeros_like(gates, dtype=torch.bool).scatter_(1, top_index, True)
    counts = mask.sum(0)
    aux = (gates.mean(0) * mask.float().mean(0)).mean() * num_experts * num_experts / k
    if capacity:
        chosen = torch.zeros_like(gates).scatter(1, top_index, top_gate)
        keep = torch.topk(chosen, k=min(capacity, num_tokens), dim=0, sorted=False).indices
        mask &= torch.zeros_like(mask).scatter_(0, keep, True)
    masked = gates * mask
    weights = masked / masked.sum(-1, keepdim=True).clamp(min=torch.finfo(gates.dtype).eps)
    return Routing(mask, weights, aux, counts)


def router_z_loss(x: torch.Tensor, router_weight: torch.Tensor) -> torch.Tensor:
    """ST-MoE's z-loss: mean over tokens of logsumexp(router logits)^2 (keeps the logits small)."""
    logits = F.linear(x.reshape(-1, x.shape[-1]).float(), router_weight.float())
    return torch.logsumexp(logits, dim=-1).square().mean()


@dataclass
class MoEStats:
    """What one MoE layer's last forward pass leaves for the objective: its losses and expert loads."""

    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    counts: torch.Tensor
    """(E,) routed assignments per expert."""


class MoEFeedForward(nn.Module):
    """Router + `num_experts` routed SwiGLU experts (top-k) + `num_shared_experts` always-on ones.

    Parameters: `router.weight` (E, H), `experts.N.*` and `shared.N.*` (each a `FeedForward`). The
    DeepSpeed engine runs the routed part through `deepspeed.moe.layer.MoE` with these very weights
    (minigpt/engine/moe.py), so checkpoints and `final/` use these names on either engine."""

    def __init__(self, config: MiniGPTConfig):
        super().__init__()
        self.k, self.capacity_factor = config.experts_per_token, config.moe_capacity_factor
        self.router = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(config) for _expert in range(config.num_experts))
        self.shared = nn.ModuleList(FeedForward(config) for _expert in range(config.num_shared_experts))
        self.stats: MoEStats | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        logits = F.linear(flat.float(), self.router.weight.float())  # routing in fp32, as DeepSpeed's gate
        routing = route(logits, self.k, self.capacity_factor)
        routed = torch.zeros(flat.shape, dtype=torch.float32, device=x.device)
        for index, expert in enumerate(self.experts):
            rows = routing.mask[:, index].nonzero().squeeze(1)
            if rows.numel():
                routed.index_add_(0, rows, expert(flat[rows]).float() * routing.weights[rows, index, None])
        self.stats = MoEStats(routing.aux_loss, torch.logsumexp(logits, dim=-1).square().mean(),
                              routing.counts.detach().float())
        out = routed.to(x.dtype).view_as(x)
        for expert in self.shared:
            out = out + expert(x)
        return out


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, config: MiniGPTConfig, layer_index: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.attn = Attention(config, layer_index)
        self.ffn_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.ffn = MoEFeedForward(config) if config.num_experts else FeedForward(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.dropout(self.attn(self.attn_norm(x), cos, sin, mask, cache))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class MiniGPT(nn.Module):
    """Decoder-only language model. `forward` returns logits (B, T, vocab)."""

    def __init__(self, config: MiniGPTConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.checkpoint_fn: Callable | None = None
        """Activation checkpointing: `fn(block, *inputs)` runs a block keeping only its inputs, to recompute
        the rest in backward (set by the engine: torch.utils.checkpoint or DeepSpeed's). Training only."""
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2 scaling: each residual branch adds variance, so its output projection starts smaller.
        for name, param in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.num_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def set_dropout(self, rate: float) -> None:
        """Change the dropout of loaded weights everywhere it is applied: the residual `nn.Dropout`s,
        attention's own rate, and `config` (which the run's snapshot and saved weights record)."""
        self.config = dataclasses.replace(self.config, dropout=rate)
        self.config.validate()
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.p = rate
            elif isinstance(module, Attention):
                module.dropout = rate

    def forward(self, input_ids: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
                cache: KVCache | None = None, return_hidden: bool = False,
                logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for `input_ids` (B, T), or the final normed hidden states with `return_hidden`.

        position_ids:   (B, T) rotary positions; default continues from the cache (0.. without one).
        attention_mask: (B, S) 1 for real tokens, 0 for padding, over all keys the step can see
                        (cached + new); padding is never attended to.
        segment_ids:    (B, T) document ids of packed sequences; attention stays inside a document.
        cache:          KVCache to read past keys/values from and append this step's to.
        logits_at:      (B, T) bool; logits only at these positions, as (N, vocab) in row-major order. The
                        LM head is most of a small model's FLOPs, and SFT trains on a minority of positions.
        """
        b, t = input_ids.shape
        past = cache.length if cache is not None else 0
        if past + t > self.config.max_seq_len:
            raise ValueError(_("sequence of {tokens} tokens exceeds max_seq_len={limit}").format(
                tokens=past + t, limit=self.config.max_seq_len))
        if position_ids is None:  # consecutive positions: a slice of the tables, shared by the batch
            cos, sin = self.rope_cos[None, None, past:past + t], self.rope_sin[None, None, past:past + t]
        else:
            cos, sin = self.rope_cos[position_ids].unsqueeze(1), self.rope_sin[position_ids].unsqueeze(1)
        mask = self._attention_mask(b, t, past, attention_mask, segment_ids, input_ids.device)
        x = self.embed(input_ids)
        recompute = self.checkpoint_fn is not None and self.training and cache is None and torch.is_grad_enabled()
        for block in self.blocks:
            x = self.checkpoint_fn(block, x, cos, sin, mask, None) if recompute else block(x, cos, sin, mask, cache)
        if cache is not None:
            cache.length += t
        if logits_at is not None:
            x = x[logits_at]  # the norm is per position, so it too runs on the selected rows only
        x = self.norm(x)
        return x if return_hidden else self.lm_head(x)

    @staticmethod
    def _attention_mask(b, t, past, attention_mask, segment_ids, device) -> torch.Tensor | None:
        """Boolean (B, 1, T, S) mask, or None when plain causal attention (or one cached step) will do."""
        if attention_mask is None and segment_ids is None and (past == 0 or t == 1):
            return None
        s = past + t
        query_pos = torch.arange(past, s, device=device).unsqueeze(1)
        mask = (torch.arange(s, device=device).unsqueeze(0) <= query_pos).expand(b, 1, t, s)
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, :s].bool()
        if segment_ids is not None:
            if past:
                raise ValueError(_("segment_ids are for packed training sequences, not cached decoding"))
            mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
        # A padded query row would mask every key (NaN softmax): let every query see itself.
        return mask | (torch.arange(s, device=device).unsqueeze(0) == query_pos)

    def moe_stats(self) -> list[MoEStats]:
        """Each MoE layer's losses and expert loads from the last forward pass ([] for a dense model)."""
        return [block.ffn.stats for block in self.blocks if getattr(block.ffn, "stats", None) is not None]

    def token_logprobs(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """log p(input_ids[:, i+1] | input_ids[:, :i+1]) for each position: shape (B, T-1), fp32."""
        logits = self(input_ids, **kwargs)[:, :-1].float()
        return torch.gather(logits.log_softmax(-1), 2, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
