"""Policy optimisation with PPO (Schulman et al., 2017) as in InstructGPT (Ouyang et al., 2022): a critic,
GAE, the KL penalty in the reward. `--mode rlhf --rl-algo ppo`; rollouts, rewards and evaluation are GRPO's
(`minigpt.train.rollouts`).

Per micro-batch of prompts (G responses each, `--rl-group-size`, 1 by default):

    reward     r_t = -kl_coef * (log pi_old(y_t) - log ref(y_t))  on every response token,
               plus the score (task checker or reward model) on the last one
    critic     V(s_t): a scalar head on the policy's final hidden state before token t (`PolicyWithValue`)
    GAE        delta_t = r_t + gamma V(s_t+1) - V(s_t) (V = 0 after the last token);
               A_t = sum_k (gamma lambda)^k delta_t+k;  returns R_t = A_t + V(s_t)
               advantages whitened over this rank's batch of rollouts (zero mean, unit std over its tokens)
    loss       token mean of  -min(ratio A, clip(ratio, 1 +- eps) A)
                              + value_coef * 0.5 max((V - R)^2, (V_old + clip(V - V_old, +- value_clip) - R)^2)

The critic shares the policy's trunk: one model to sample, score and train (a separate critic would double
the weights, the optimizer state and the forward passes of a step), checkpointed by the engine with the
policy (so resuming restores it bitwise), and left out of `final/`, which holds the language model alone
(generate, chat, serve, eval and export read it unchanged). The price: the value loss's gradient reaches the
shared trunk; `--rl-value-coef` keeps it small next to the policy's. The KL to the reference is in the reward
(k1, per token, as InstructGPT), so the critic learns to expect it; the logged `kl` is the k3 estimate GRPO
logs, so the two algorithms' curves compare.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minigpt.config import ConfigError, MiniGPTConfig
from minigpt.engine.device import autocast_context
from minigpt.i18n import _
from minigpt.train.objective import SetupContext
from minigpt.train.rollouts import (
    PolicyOptimization,
    Rollout,
    clipped_policy_loss,
    kl_k3,
    logits_of_responses,
    masked_mean,
)

WHITEN_EPS = 1e-8
POLICY_PREFIX, VALUE_PREFIX = "policy.", "value_head."
"""Where the language model's and the critic's weights sit in `PolicyWithValue`'s state dict."""


class PolicyWithValue(nn.Module):
    """The policy (MiniGPT) with a critic: a linear scalar head on its final normed hidden states.

    `forward(ids, ...)` gives the policy's logits (so the generator, the loop's sample and `--eval-task` see a
    language model); `forward(ids, values=True, ...)` gives (logits, values) from one pass over the trunk."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy
        self.config = policy.config
        self.value_head = nn.Linear(policy.config.hidden_size, 1)
        nn.init.normal_(self.value_head.weight, std=0.02)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor, *, values: bool = False,
                **kwargs: Any) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if not values:
            return self.policy(input_ids, **kwargs)
        hidden = self.policy(input_ids, return_hidden=True, **kwargs)
        return self.policy.lm_head(hidden), self.value_head(hidden).squeeze(-1).float()

    def token_logprobs(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.policy.token_logprobs(input_ids, **kwargs)


def policy_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The language model's weights of a `PolicyWithValue` state dict (the critic's left out)."""
    return {k[len(POLICY_PREFIX):]: v for k, v in state_dict.items() if k.startswith(POLICY_PREFIX)}


def token_rewards(scores: torch.Tensor, logprobs: torch.Tensor, reference_logprobs: torch.Tensor,
                  mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """(N, M) per-token rewards: -kl_coef x (log pi - log ref) on each response token, plus each response's
    score (N,) on its last token. `mask` (N, M) is 1 on a prefix of each row (the response)."""
    rewards = -kl_coef * (logprobs - reference_logprobs) * mask
    last = (mask.sum(-1).long() - 1).clamp(min=0)
    rows = torch.arange(len(scores), device=scores.device)
    rewards[rows, last] += scores * (mask.sum(-1) > 0)
    return rewards


def generalized_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
                           lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE (Schulman et al., 2016) over response tokens: (advantages, returns), both (N, M), 0 past each end.

    The state after a response's last token is terminal (its value 0)."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = WHITEN_EPS) -> torch.Tensor:
    """`values` shifted and scaled to zero mean and unit std over the tokens `mask` keeps (0 elsewhere)."""
    mean = masked_mean(values, mask)
    std = masked_mean((values - mean) ** 2, mask).sqrt()
    return (values - mean) / (std + eps) * mask


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped value loss 0.5 max((V - R)^2, (V_old + clip(V - V_old, +-clip) - R)^2), and where the
    value moved further than `clip` from the rollout's (there the loss is the clipped one, its gradient 0 when
    the clipped error is the larger)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    loss = 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)
    return loss, ((values - old_values).abs() > clip).float()


@dataclass
class PPORollout(Rollout):
    """A rollout with what PPO computes once, after sampling: the critic's values, advantages and returns."""

    old_values: torch.Tensor | None = None  # (N, M) V(s_t) at sampling time
    advantages: torch.Tensor | None = None  # (N, M) whitened GAE advantages
    returns: torch.Tensor | None = None     # (N, M) the critic's targets


class PPO(PolicyOptimization):
    """`--mode rlhf --rl-algo ppo` (see the module docstring): the policy trains with a critic on its trunk."""

    algorithm = "PPO"

    def wrap_model(self, model: nn.Module) -> PolicyWithValue:
        """The starting weights under a fresh value head (on the policy's trunk; see the module docstring)."""
        return PolicyWithValue(model)

    def setup(self, context: SetupContext) -> None:
        if getattr(context.engine, "zero_stage", 0) == 3:
            raise ConfigError(_("--rl-algo ppo runs under DeepSpeed ZeRO stages 0-2, where its critic is tested, not "
                                "ZeRO-3; use ZeRO-2 (--ds-config ds_configs/zero2.json) or --rl-algo grpo"))
        super().setup(context)

    @torch.no_grad()
    def _values(self, rollout: Rollout) -> torch.Tensor:
        """(N, M) the critic's V(s_t) for each response token t (the state before it), as the policy samples."""
        module = self.engine.module
        was_training = module.training
        module.eval()
        with autocast_context(self.engine.device, self.engine.precision):
            _logits, values = module(rollout.input_ids, values=True, position_ids=rollout.position_ids,
                                     attention_mask=rollout.attention_mask)
        module.train(was_training)
        start = rollout.prompt_len
        return values[:, start - 1:-1].float() * rollout.response_mask

    def begin_batch(self, step: int, micro_batches: list[dict[str, torch.Tensor]]) -> list[PPORollout]:
        """Sample, score and take the reference's log-probs (as GRPO), then the critic's values, the per-token
        rewards, GAE and the whitened advantages; the loop trains on these for the next `rl_updates` steps."""
        rollouts = []
        for rollout in self.sample_rollouts(micro_batches):
            mask = rollout.response_mask
            old_values = self._values(rollout)
            rewards = token_rewards(rollout.rewards, rollout.old_logprobs, rollout.reference_logprobs, mask,
                                    self.cfg.kl_coef)
            advantages, returns = generalized_advantages(rewards, old_values, mask, self.cfg.rl_gamma,
                                                         self.cfg.rl_gae_lambda)
            rollouts.append(PPORollout(**vars(rollout), old_values=old_values, advantages=advantages,
                                       returns=returns))
        masks = torch.cat([r.response_mask.flatten() for r in rollouts])
        whitened = whiten(torch.cat([r.advantages.flatten() for r in rollouts]), masks)
        for rollout, advantages in zip(rollouts, whitened.split([r.advantages.numel() for r in rollouts]),
                                       strict=True):
            rollout.advantages = advantages.view_as(rollout.advantages)
        return rollouts

    def loss(self, engine, rollout: PPORollout) -> tuple[torch.Tensor, dict[str, float]]:
        logits, values = engine(rollout.input_ids, values=True, position_ids=rollout.position_ids,
                                attention_mask=rollout.attention_mask)
        logprobs = logits_of_responses(logits, rollout)
        values = values[:, rollout.prompt_len - 1:-1].float()
        mask = rollout.response_mask
        surrogate, clipped = clipped_policy_loss(logprobs, rollout.old_logprobs, rollout.advantages,
                                                 self.cfg.rl_clip)
        value_loss, value_clipped = clipped_value_loss(values, rollout.old_values, rollout.returns,
                                                       self.cfg.rl_value_clip)
        policy_loss, value_loss = masked_mean(surrogate, mask), masked_mean(value_loss, mask)
        loss = policy_loss + self.cfg.rl_value_coef * value_loss
        kl = kl_k3(logprobs.detach(), rollout.reference_logprobs)
        stats = {"reward": rollout.rewards.mean(),
                 "kl": masked_mean(kl, mask),
                 "response_length": mask.sum(-1).mean(),
                 "clip_fraction": masked_mean(clipped, mask),
                 "policy_loss": policy_loss.detach(),
                 "value_loss": value_loss.detach(),
                 "value_clip_fraction": masked_mean(value_clipped, mask),
                 "value": masked_mean(values.detach(), mask)}
        return self.add_model_losses(engine, loss, {name: float(value) for name, value in stats.items()},
                                     "ppo_loss")  # a mixture of experts' load balancing

    def save_consolidated(self, out_dir: str | Path, state_dict: dict[str, torch.Tensor], config: MiniGPTConfig,
                          tokenizer_dir: str | Path | None, extra: dict | None = None) -> Path:
        """`final/` holds the language model alone, as every other mode's: the critic stays in the checkpoints."""
        return super().save_consolidated(out_dir, policy_state_dict(state_dict), config, tokenizer_dir, extra)
