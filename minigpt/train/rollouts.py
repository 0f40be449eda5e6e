"""What `--mode rlhf`'s two algorithms share: their options, prompts, rollouts, rewards and greedy evaluation.

GRPO (`minigpt.train.rlhf`) and PPO (`minigpt.train.ppo`) both:

    rollout    sample responses to each prompt with the project's generator (KV cache), the policy in eval mode
    reward     rule-based (the verifiable-task checker, `minigpt.data.tasks.reward`) or a reward model
    reference  score the responses under a frozen copy of the starting weights (for the KL to it)
    ratio      exp(log pi - log pi_behaviour), clipped to [1 - eps, 1 + eps] in the surrogate; pi_behaviour's
               log-probs are those the generator sampled with

and evaluate alike (greedy answers to held-out prompts: val_reward, val_exact, val_response_length). They
differ in the advantage (GRPO: the group's rewards; PPO: a critic and GAE) and in where the KL goes.

Every rank always decodes exactly `--rl-max-new-tokens` steps (stop tokens are applied afterwards):
under ZeRO-3 each forward pass gathers weights collectively, so ranks must run the same number.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from minigpt.config import (
    ConfigError,
    check_at_least,
    check_choice,
    check_interval,
    check_not_negative,
    check_positive,
    option,
)
from minigpt.data.datasets import RLHFPrompts
from minigpt.data.tasks import expected_answer
from minigpt.data.tasks import reward as task_reward
from minigpt.engine.device import autocast_context
from minigpt.generate import GenerationConfig, TextGenerator
from minigpt.i18n import _
from minigpt.metrics import MetricSums
from minigpt.train.objective import Objective, SetupContext
from minigpt.train.reward import load_reward_model, score_sequences
from minigpt.train.sequences import load_frozen_model

ALGORITHMS = ("grpo", "ppo")
"""`--rl-algo`'s choices; GRPO is the default."""
ADVANTAGE_SCALES = ("group", "batch", "none")
"""What GRPO divides each group's centred rewards by (`--rl-scale-rewards`, `rlhf.group_advantages`)."""
DEFAULT_GROUP_SIZE = {"grpo": 8, "ppo": 1}
"""Responses per prompt when `--rl-group-size` is left at 0: GRPO's baseline is the group, so it needs several;
PPO's baseline is its critic, so one is enough."""


@dataclass
class RLHFOptions:
    """`--mode rlhf`'s own flags (both algorithms'; the ones of one algorithm are refused for the other)."""

    rl_algo: str = option("RLHF: policy optimisation algorithm: grpo (group-relative advantages, no critic) or ppo "
                          "(a value head on the policy's trunk, GAE, the KL penalty in the reward)", default="grpo")
    reward_model: str = option("RLHF: reward model directory (from --mode reward); empty: the rule-based reward "
                               "of the verifiable-task checker", default="")
    rl_group_size: int = option("RLHF: responses sampled per prompt; 0: 8 for GRPO (its advantages are relative to "
                                "the group, at least 2), 1 for PPO (its critic is the baseline)", default=0)
    rl_max_new_tokens: int = option("RLHF: tokens generated per response (every rank always runs this many "
                                    "decoding steps)", default=16)
    rl_temperature: float = option("RLHF: sampling temperature of the rollouts", default=1.0)
    kl_coef: float = option("RLHF: weight of the KL penalty to the reference (starting) policy (GRPO: in the "
                            "loss; PPO: subtracted from each token's reward)", default=0.05)
    rl_clip: float = option("RLHF: PPO/GRPO ratio clipping range epsilon", default=0.2)
    rl_scale_rewards: str = option("RLHF (GRPO): what divides each group's centred rewards: group (its std, GRPO), "
                                   "batch (the std over all groups: partial credit keeps its size) or none "
                                   "(Dr. GRPO)", default="group")
    rl_updates: int = option("RLHF: optimizer steps on each batch of rollouts (GRPO's mu, PPO's epochs); above 1 "
                             "the policy moves away from the one that sampled and the ratio clipping bounds "
                             "each step", default=1)
    rl_value_coef: float = option("RLHF (PPO): weight of the critic's value loss next to the policy loss",
                                  default=0.1)
    rl_value_clip: float = option("RLHF (PPO): how far a value may move from the rollout's before its loss is "
                                  "clipped", default=0.2)
    rl_gamma: float = option("RLHF (PPO): discount over the response's tokens in GAE", default=1.0)
    rl_gae_lambda: float = option("RLHF (PPO): GAE's lambda (1: Monte Carlo returns, 0: one-step TD)",
                                  default=0.95)

    PPO_ONLY = ("rl_value_coef", "rl_value_clip", "rl_gamma", "rl_gae_lambda")
    GRPO_ONLY = ("rl_scale_rewards",)

    def __post_init__(self) -> None:
        check_choice(self, "rl_algo", ALGORITHMS)
        check_positive(self, "rl_temperature", "rl_clip", "rl_max_new_tokens", "rl_value_clip")
        check_not_negative(self, "kl_coef", "rl_value_coef", "rl_group_size")
        check_interval(self, "rl_gamma", 0, 1)
        check_interval(self, "rl_gae_lambda", 0, 1)
        check_at_least(self, rl_updates=1)
        check_choice(self, "rl_scale_rewards", ADVANTAGE_SCALES)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        other = "grpo" if self.rl_algo == "ppo" else "ppo"
        for name in self.GRPO_ONLY if self.rl_algo == "ppo" else self.PPO_ONLY:
            if getattr(self, name) != defaults[name]:
                raise ConfigError(_("--{flag} applies to --rl-algo {other}, not to --rl-algo {algo}").format(
                    flag=name.replace("_", "-"), other=other, algo=self.rl_algo))
        if self.rl_algo == "grpo" and self.rl_group_size == 1:
            raise ConfigError(_("--rl-group-size must be at least 2 for GRPO (its advantages compare the responses "
                                "to one prompt), got 1; --rl-algo ppo learns from one response per prompt"))

    @property
    def group_size(self) -> int:
        """Responses sampled per prompt: `--rl-group-size`, or the algorithm's default."""
        return self.rl_group_size or DEFAULT_GROUP_SIZE[self.rl_algo]


def kl_k3(logprobs: torch.Tensor, reference_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from samples of pi: exp(d) - d - 1 with d = ref - pi (>= 0)."""
    delta = reference_logprobs - logprobs
    return torch.exp(delta) - delta - 1.0


def clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO-clip surrogate (to minimise) and where the ratio left [1 - clip, 1 + clip].

    logprobs, old_logprobs: (N, T); advantages: (N, T) per token (PPO), or (N,) broadcast over the tokens of each
    response (GRPO)."""
    ratio = torch.exp(logprobs - old_logprobs)
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    surrogate = torch.min(ratio * advantages, ratio.clamp(1.0 - clip, 1.0 + clip) * advantages)
    return -surrogate, ((ratio - 1.0).abs() > clip).float()


def masked_sequence_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over responses of each response's token mean: (N, T) with a (N, T) 0/1 mask -> scalar."""
    per_sequence = (values * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    return per_sequence.mean()


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the tokens the 0/1 mask keeps: (N, T) -> scalar."""
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


class PaddedPrompts:
    """RLHF prompts of one shard, left-padded to `max_prompt_len` with a mask (so the loop's collate stacks them).

    Prompts longer than `max_prompt_len` (= seq_len - rl_max_new_tokens) are left out and counted."""

    def __init__(self, prompts: RLHFPrompts, source: int, max_prompt_len: int, pad_id: int):
        self.prompts, self.source = prompts, source
        self.max_prompt_len, self.pad_id = max_prompt_len, pad_id
        lengths = prompts.reader.document_lengths()
        self.kept = np.flatnonzero(lengths <= max_prompt_len)
        self.num_too_long = int(len(lengths) - len(self.kept))

    def __len__(self) -> int:
        return len(self.kept)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        original = int(self.kept[index])
        ids = self.prompts[original]["prompt_ids"]
        pad = self.max_prompt_len - len(ids)
        return {"prompt_ids": np.concatenate([np.full(pad, self.pad_id, dtype=np.int64), ids]),
                "prompt_mask": np.concatenate([np.zeros(pad, dtype=np.int64), np.ones(len(ids), dtype=np.int64)]),
                "source": np.array(self.source, dtype=np.int64), "index": np.array(original, dtype=np.int64)}

    def record(self, original_index: int) -> dict:
        return self.prompts.record(original_index)


@dataclass
class Rollout:
    """Sampled responses laid out for one forward pass: [left-padded prompt | right-padded response]."""

    input_ids: torch.Tensor        # (N, P + M)
    attention_mask: torch.Tensor   # (N, P + M)
    position_ids: torch.Tensor     # (N, P + M)
    response_mask: torch.Tensor    # (N, M) float: 1 on real response tokens (up to and with a stop token)
    old_logprobs: torch.Tensor     # (N, M) log-probs the generator sampled with
    rewards: torch.Tensor          # (N,)
    prompt_len: int
    reference_logprobs: torch.Tensor | None = None  # (N, M) under the frozen reference, once computed


def logits_of_responses(logits: torch.Tensor, rollout: Rollout) -> torch.Tensor:
    """(N, M) log-probs of the response tokens, from the (N, P + M, V) logits of a forward pass over `rollout`."""
    start = rollout.prompt_len
    predicting = logits[:, start - 1:-1].float()
    targets = rollout.input_ids[:, start:]
    return torch.gather(predicting.log_softmax(-1), 2, targets.unsqueeze(-1)).squeeze(-1)


def response_logprobs(forward, rollout: Rollout) -> torch.Tensor:
    """(N, M) log-probs of the response tokens under `forward` (the policy or the reference)."""
    logits = forward(rollout.input_ids, position_ids=rollout.position_ids, attention_mask=rollout.attention_mask)
    return logits_of_responses(logits, rollout)


class PolicyOptimization(Objective):
    """The `--mode rlhf` objective of either algorithm: prompts, rollouts, rewards, the reference, evaluation.

    `GRPO` and `PPO` add their advantages and loss (`begin_batch`, `loss`); `rlhf.RLHF.from_options` picks one."""

    dataset_kind = "rlhf"
    options = RLHFOptions
    previous_stages = ("dpo", "sft")
    chat_samples = True
    varying_shapes = True
    eval_sums = ("reward_sum", "prompts", "exact", "response_length")
    algorithm = ""
    """The name the start-up line gives the algorithm."""

    def __init__(self, options: RLHFOptions, tokenizer):
        self.cfg, self.tokenizer = options, tokenizer
        self.group_size, self.max_new_tokens = options.group_size, options.rl_max_new_tokens
        self.updates_per_batch = options.rl_updates
        self.engine = None
        self.datasets: list[PaddedPrompts] = []
        self.reference_model: torch.nn.Module | None = None
        self.reward_model: torch.nn.Module | None = None

    @classmethod
    def from_options(cls, options: RLHFOptions, tokenizer) -> PolicyOptimization:
        return cls(options, tokenizer)

    def dataset(self, reader, seq_len: int, tokenizer) -> PaddedPrompts:
        max_prompt_len = seq_len - self.max_new_tokens
        if max_prompt_len < 2:
            raise ConfigError(_("--seq-len {seq_len} leaves no room for prompts after --rl-max-new-tokens "
                                "{new_tokens}").format(seq_len=seq_len, new_tokens=self.max_new_tokens))
        prompts = PaddedPrompts(RLHFPrompts(reader), len(self.datasets), max_prompt_len, tokenizer.pad_id)
        if reader.num_documents and not len(prompts):
            raise ConfigError(_("{path}: all {count} prompts are longer than {limit} tokens (--seq-len {seq_len} - "
                                "--rl-max-new-tokens {new_tokens}); raise --seq-len or shorten the prompts").format(
                path=reader.directory, count=reader.num_documents, limit=max_prompt_len, seq_len=seq_len,
                new_tokens=self.max_new_tokens))
        self.datasets.append(prompts)
        return prompts

    def setup(self, context: SetupContext) -> None:
        """Load the frozen reference policy and the reward (model, or check the prompts are verifiable)."""
        self.engine = context.engine
        self.reference_model = load_frozen_model(context.start_dir, context.engine.device, context.mode,
                                                 context.engine.precision, policy=context.engine.module)
        if self.cfg.reward_model:
            self.reward_model = load_reward_model(self.cfg.reward_model, self.tokenizer, context.engine.device)
            source = _("reward model {path}").format(path=self.cfg.reward_model)
        else:
            first = next((d for d in self.datasets if len(d)), None)
            record = first.record(int(first.kept[0])) if first is not None else {}
            if expected_answer(record) is None:
                raise ConfigError(_("--mode rlhf without --reward-model scores answers with the verifiable-task "
                                    "checker, but prompt {prompt!r} has no reference answer and is no known task; "
                                    "give --reward-model DIR (from --mode reward)").format(
                    prompt=record.get("messages", record)))
            source = _("rule-based task checker")
        too_long = sum(d.num_too_long for d in self.datasets)
        if context.engine.is_main:
            left_out = _("; {count} prompt(s) longer than the context left out").format(
                count=too_long) if too_long else ""
            print(_("[minigpt] rlhf: {algorithm}, {group} responses per prompt, reward from {source}{left_out}").format(
                algorithm=self.algorithm, group=self.group_size, source=source, left_out=left_out), flush=True)

    # -- rollouts ------------------------------------------------------------------------------------
    def _decode_config(self, greedy: bool) -> GenerationConfig:
        # No stop ids while decoding: every rank runs max_new_tokens steps; responses are cut afterwards.
        # Rollouts sample the policy's own distribution (whole_characters off): the loss scores each token by
        # the policy's log-prob, so a guard that masked some tokens would make the samples off-policy.
        return GenerationConfig(max_new_tokens=self.max_new_tokens, temperature=self.cfg.rl_temperature,
                                do_sample=not greedy, stop_token_ids=(), whole_characters=False)

    def _cut_at_stop(self, ids: list[int]) -> list[int]:
        stops = set(self.tokenizer.stop_ids)
        for position, token in enumerate(ids):
            if token in stops:
                return ids[:position + 1]
        return ids

    def _rewards(self, batch: dict[str, torch.Tensor], prompts: list[list[int]], responses: list[list[int]],
                 repeat: int, device: torch.device) -> torch.Tensor:
        if self.reward_model is not None:
            sequences = [p + r for p, r in zip(prompts, responses, strict=True)]
            return score_sequences(self.reward_model, sequences, self.tokenizer.pad_id, device).float()
        stops = set(self.tokenizer.stop_ids)
        values = []
        for row, response in enumerate(responses):
            prompt_row = row // repeat
            record = self.datasets[int(batch["source"][prompt_row])].record(int(batch["index"][prompt_row]))
            text = self.tokenizer.decode([t for t in response if t not in stops])
            values.append(task_reward(record, text))
        return torch.tensor(values, dtype=torch.float32, device=device)

    @torch.no_grad()
    def rollout(self, model, batch: dict[str, torch.Tensor], repeat: int, greedy: bool = False) -> Rollout:
        """Generate `repeat` responses per prompt of `batch` with `model` and score them."""
        device = batch["prompt_ids"].device
        prompts = [ids[mask.bool()].tolist() for ids, mask in zip(batch["prompt_ids"], batch["prompt_mask"],
                                                                  strict=True)]
        prompts = [p for p in prompts for _copy in range(repeat)]
        generator = TextGenerator(model, self.tokenizer, device)
        sequences = generator.generate_sequences(prompts, self._decode_config(greedy))
        responses = [self._cut_at_stop(s.token_ids) for s in sequences]
        n, width, m = len(prompts), batch["prompt_ids"].shape[1], self.max_new_tokens
        response_ids = torch.full((n, m), self.tokenizer.pad_id, dtype=torch.long)
        response_mask = torch.zeros((n, m))
        old_logprobs = torch.zeros((n, m))
        for row, (response, sequence) in enumerate(zip(responses, sequences, strict=True)):
            response_ids[row, :len(response)] = torch.tensor(response)
            response_mask[row, :len(response)] = 1.0
            old_logprobs[row, :len(response)] = torch.tensor(sequence.logprobs[:len(response)])
        prompt_ids = batch["prompt_ids"].repeat_interleave(repeat, 0)
        prompt_mask = batch["prompt_mask"].repeat_interleave(repeat, 0)
        attention_mask = torch.cat([prompt_mask, response_mask.long().to(device)], 1)
        return Rollout(input_ids=torch.cat([prompt_ids, response_ids.to(device)], 1),
                       attention_mask=attention_mask,
                       position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0),
                       response_mask=response_mask.to(device), old_logprobs=old_logprobs.to(device),
                       rewards=self._rewards(batch, prompts, responses, repeat, device), prompt_len=width)

    def sample_rollouts(self, micro_batches: list[dict[str, torch.Tensor]]) -> list[Rollout]:
        """`group_size` scored responses per prompt of each micro-batch, sampled from the current policy, with
        their log-probs under the reference."""
        rollouts = []
        for batch in micro_batches:
            # Sampled at the precision the loss runs at, so the sampling log-probs (the ratio's denominator)
            # differ from the first update's by rounding, not by bf16 against fp32.
            with autocast_context(self.engine.device, self.engine.precision):
                rollout = self.rollout(self.engine.module, batch, self.group_size)
            with torch.no_grad():
                rollout.reference_logprobs = response_logprobs(self.reference_model, rollout)
            rollouts.append(rollout)
        return rollouts

    def tokens_in(self, rollout: Rollout) -> int:
        """Tokens of one policy forward pass over a rollout: G x (prompt width + new tokens) per prompt."""
        return rollout.input_ids.numel()

    # -- evaluation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def eval_batch(self, model, batch: dict[str, torch.Tensor], sums: MetricSums) -> None:
        """Greedy answers to held-out prompts: their mean reward and length (and exact answers, rule reward)."""
        rollout = self.rollout(model, batch, 1, greedy=True)
        sums.add("reward_sum", rollout.rewards.sum())
        sums.add("prompts", len(rollout.rewards))
        if self.reward_model is None:
            sums.add("exact", (rollout.rewards >= 1.0).float().sum())
        sums.add("response_length", rollout.response_mask.sum())

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """val_reward (mean greedy reward), val_exact (share of correct answers), val_response_length."""
        count = max(sums["prompts"], 1.0)
        return {"val_reward": sums["reward_sum"] / count, "val_exact": sums["exact"] / count,
                "val_response_length": sums["response_length"] / count}
