"""Policy optimisation with GRPO (Shao et al., 2024): group-relative advantages, no value head.

This file is `--mode rlhf`'s entry in the mode table (`RLHF`, which builds the objective `--rl-algo` names:
`GRPO` here, `minigpt.train.ppo.PPO`); what both algorithms share (options, rollouts, rewards, evaluation)
is in `minigpt.train.rollouts`. Per micro-batch of prompts:

    rollout   sample G responses per prompt (`rollouts.PolicyOptimization.sample_rollouts`) and score them
    advantage A_i = (r_i - mean(r_group)) / (std(r_group) + eps)       one value per response
    loss      mean over responses of the token-mean of
              -min(ratio * A, clip(ratio, 1 - eps_clip, 1 + eps_clip) * A) + kl_coef * KL_k3(pi || ref)

`ratio = exp(log pi - log pi_behaviour)`, where pi_behaviour's log-probs are those the generator
sampled with. `--rl-updates mu` takes mu optimizer steps on each batch of rollouts (`begin_batch`
turns a new batch into rollouts, and the loop hands those back for every update: rewards and reference
log-probs are kept, not recomputed):
from the second step on the policy has moved away from the sampler's, and the clipping bounds how far
each step may push a token's probability; the clip fraction is logged to show it. With mu = 1 the
ratio is 1 up to sampler/trainer numerics (dropout, autocast).
`KL_k3 = exp(ref - log pi) - (ref - log pi) - 1` is Schulman's unbiased, always-positive estimator;
the reference is a frozen copy of the starting weights.
"""

from __future__ import annotations

import torch

from minigpt.i18n import _
from minigpt.train.ppo import PPO
from minigpt.train.rollouts import (
    ADVANTAGE_SCALES,
    PolicyOptimization,
    RLHFOptions,
    Rollout,
    clipped_policy_loss,
    kl_k3,
    masked_sequence_mean,
    response_logprobs,
)

ADVANTAGE_EPS = 1e-4


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group",
                     eps: float = ADVANTAGE_EPS) -> torch.Tensor:
    """GRPO advantages of rewards laid out group after group: (N,) -> (N,), zero mean per group.

    scale "group" divides by each group's std (GRPO); "batch" by the std of all the centred rewards,
    which keeps a group's small partial-credit differences small next to another's right-or-wrong
    ones (the group std inflates them to the same size); "none" keeps raw differences (Dr. GRPO)."""
    groups = rewards.view(-1, group_size)
    centred = groups - groups.mean(-1, keepdim=True)
    if scale == "group":
        centred = centred / (groups.std(-1, keepdim=True, correction=0) + eps)
    elif scale == "batch":
        centred = centred / (centred.std(correction=0) + eps)
    elif scale not in ADVANTAGE_SCALES:
        raise ValueError(_("advantage scale must be one of {choices}, got {value!r}").format(
            choices=ADVANTAGE_SCALES, value=scale))
    return centred.view(-1)


class GRPO(PolicyOptimization):
    """GRPO (see the module docstring); its training micro-batches are `Rollout`s."""

    algorithm = "GRPO"

    # -- loss ----------------------------------------------------------------------------------------
    def begin_batch(self, step: int, micro_batches: list[dict[str, torch.Tensor]]) -> list[Rollout]:
        """Sample and score each prompt micro-batch's rollouts with the current policy; the loop trains on
        these for the next `rl_updates` steps."""
        return self.sample_rollouts(micro_batches)

    def loss(self, engine, rollout: Rollout) -> tuple[torch.Tensor, dict[str, float]]:
        advantages = group_advantages(rollout.rewards, self.group_size, self.cfg.rl_scale_rewards)
        logprobs = response_logprobs(engine, rollout)
        surrogate, clipped = clipped_policy_loss(logprobs, rollout.old_logprobs, advantages, self.cfg.rl_clip)
        kl = kl_k3(logprobs, rollout.reference_logprobs)
        mask = rollout.response_mask
        loss = masked_sequence_mean(surrogate + self.cfg.kl_coef * kl, mask)
        tokens = mask.sum().clamp(min=1.0)
        stats = {"reward": rollout.rewards.mean(),
                 "reward_std": rollout.rewards.view(-1, self.group_size).std(-1, correction=0).mean(),
                 "kl": (kl.detach() * mask).sum() / tokens,
                 "response_length": mask.sum(-1).mean(),
                 "clip_fraction": (clipped * mask).sum() / tokens}
        return self.add_model_losses(engine, loss, {name: float(value) for name, value in stats.items()},
                                     "policy_loss")  # a mixture of experts' load balancing


class RLHF(PolicyOptimization):
    """`--mode rlhf` in the mode table: its facts and options (shared by both algorithms); `from_options` builds
    the objective `--rl-algo` names."""

    @classmethod
    def from_options(cls, options: RLHFOptions, tokenizer) -> PolicyOptimization:
        return {"grpo": GRPO, "ppo": PPO}[options.rl_algo](options, tokenizer)
