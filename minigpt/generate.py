"""Standalone text generation: greedy and sampled decoding with a KV cache, batched and streamed.

Imports torch and MiniGPT's own model/config/tokenizer/weights code only (never deepspeed), so a
consolidated model directory can be served anywhere torch runs:

    generator = TextGenerator.from_dir("checkpoints/sft_tiny/final")
    print(generator.generate(["Hello"], GenerationConfig(max_new_tokens=50), chat=True)[0])

Logit filters are small pure functions (`apply_repetition_penalty`, `apply_temperature`,
`apply_top_k`, `apply_top_p`) applied in that order by `filter_logits`. Before them, `Utf8Guard`
(minigpt/utf8_guard.py) removes the byte-fallback pieces that would leave a broken character, so no
output, streamed or not, shows a U+FFFD the prompt did not have.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from minigpt.config import ConfigError
from minigpt.i18n import _
from minigpt.interop.common import is_hf_llama_dir
from minigpt.interop.hf_llama import load_hf_llama
from minigpt.model import KVCache, MiniGPT
from minigpt.tokenizer import Tokenizer
from minigpt.utf8_guard import Utf8Guard
from minigpt.weights import load_consolidated


@dataclass
class GenerationConfig:
    """How to continue a prompt. Validated on construction; errors name the field."""

    max_new_tokens: int = 128
    """Most tokens to generate per prompt (clipped so prompt + output fits the model's max_seq_len)."""
    temperature: float = 1.0
    """Divide logits by this before sampling; 0 means greedy."""
    top_k: int = 0
    """Sample only among the k most likely tokens (0: no limit)."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens whose probability reaches top_p (1.0: no limit)."""
    repetition_penalty: float = 1.0
    """CTRL penalty on tokens already in the prompt or output: >1 discourages repeats (1.0: off)."""
    do_sample: bool = True
    """Sample from the filtered distribution; False picks the most likely token (greedy)."""
    stop_strings: tuple[str, ...] = ()
    """Stop a sequence once its text contains one of these; the text is cut before it."""
    stop_token_ids: tuple[int, ...] | None = None
    """Ids that end a sequence (kept as its last token); None: the tokenizer's EOS and <|im_end|>."""
    seed: int | None = None
    """Seed of the sampling generator, for reproducible samples (None: torch's global RNG)."""
    whole_characters: bool = True
    """Emit a byte-fallback piece only where it builds a valid UTF-8 character (`Utf8Guard`); False takes the
    model's own choice, as transformers and llama.cpp do (what a parity test against them compares)."""

    def __post_init__(self) -> None:
        self.stop_strings = tuple(self.stop_strings)
        if self.stop_token_ids is not None:
            self.stop_token_ids = tuple(self.stop_token_ids)
        self.validate()

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    def validate(self) -> None:
        """Raise `ConfigError` naming the first field out of range."""
        def fail(field: str, requirement: str) -> None:
            raise ConfigError(_("GenerationConfig.{field} {requirement}, got {value!r}").format(
                field=field, requirement=requirement, value=getattr(self, field)))

        if not _is_int(self.max_new_tokens) or self.max_new_tokens <= 0:
            fail("max_new_tokens", _("must be a positive integer"))
        if not self.temperature >= 0:
            fail("temperature", _("must be >= 0 (0 means greedy)"))
        if not _is_int(self.top_k) or self.top_k < 0:
            fail("top_k", _("must be an integer >= 0 (0 disables it)"))
        if not 0.0 < self.top_p <= 1.0:
            fail("top_p", _("must be in (0, 1]"))
        if not self.repetition_penalty > 0:
            fail("repetition_penalty", _("must be > 0 (1.0 disables it)"))
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            fail("stop_strings", _("must be non-empty strings"))
        if self.stop_token_ids is not None and any(not _is_int(i) or i < 0 for i in self.stop_token_ids):
            fail("stop_token_ids", _("must be non-negative integers"))
        if self.seed is not None and not _is_int(self.seed):
            fail("seed", _("must be an integer or None"))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL repetition penalty: for tokens marked in `seen` (B, V bool), shrink positive logits by
    `penalty` and push negative ones further down, so a seen token always becomes less likely."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sharpen (<1) or flatten (>1) the distribution."""
    return logits if temperature == 1.0 else logits / temperature


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (and any tied with the k-th); set the rest to -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose total probability reaches p; -inf the rest."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.float().softmax(-1)
    # A token goes once the more likely tokens before it already hold p; the top token always stays.
    remove = probs.cumsum(-1) - probs >= p
    remove[..., 0] = False
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def filter_logits(logits: torch.Tensor, seen: torch.Tensor | None, config: GenerationConfig) -> torch.Tensor:
    """All of `config`'s filters in order: repetition penalty, temperature, top-k, top-p."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, config.repetition_penalty)
    if config.greedy:
        return logits
    logits = apply_temperature(logits, config.temperature)
    return apply_top_p(apply_top_k(logits, config.top_k), config.top_p)


@dataclass
class GeneratedSequence:
    """One prompt's continuation: token ids, their log-probs under the model, and why it ended."""

    token_ids: list[int]
    logprobs: list[float]
    """log p(token | prefix) from the model's raw logits (before penalty, temperature, top-k/p)."""
    finish_reason: str
    """"stop" (a stop token or string) or "length" (max_new_tokens or max_seq_len reached)."""


@dataclass
class TextDelta:
    """New text of one prompt of a streamed batch (see `TextGenerator.stream_batch`)."""

    index: int
    """Which prompt of the batch."""
    text: str
    finish_reason: str | None
    """None while the prompt runs; "stop" or "length" on its last delta."""
    completion_tokens: int
    """Tokens generated for this prompt so far (a stop token included)."""


@dataclass
class _StepToken:
    row: int
    token_id: int
    logprob: float
    finish_reason: str | None


class TextGenerator:
    """Continue prompts with a `MiniGPT`; the tokenizer is needed for text in/out and stop strings.

    Training documents are packed one after another, each ending with EOS, so a text prompt is
    encoded as the start of a document: plain ids, and an empty prompt starts from EOS (the document
    boundary). `add_bos` prepends BOS for models trained on BOS-prefixed data.
    """

    def __init__(self, model: MiniGPT, tokenizer: Tokenizer | None = None,
                 device: str | torch.device | None = None, add_bos: bool = False):
        self.add_bos = add_bos
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device)
        self.tokenizer = tokenizer
        if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(_("tokenizer has {tokenizer_vocab} tokens, the model only {model_vocab}").format(
                tokenizer_vocab=tokenizer.vocab_size, model_vocab=model.config.vocab_size))

    @classmethod
    def from_dir(cls, model_dir: str | Path, device: str | torch.device = "cpu") -> TextGenerator:
        """A generator over a consolidated model directory (see `minigpt.weights`) or a Hugging Face
        Llama directory of a supported shape (see `minigpt.interop.hf_llama`; needs safetensors)."""
        if is_hf_llama_dir(model_dir):
            model, tokenizer = load_hf_llama(model_dir, device=device)
        else:
            model, tokenizer = load_consolidated(model_dir, device=device)
        return cls(model, tokenizer, device)

    def generate_sequences(self, prompts: Sequence[Sequence[int]], config: GenerationConfig,
                           use_cache: bool = True) -> list[GeneratedSequence]:
        """Continue each prompt (token ids); prompts of different lengths are batched with left padding."""
        tokens: list[list[int]] = [[] for _prompt in prompts]
        logprobs: list[list[float]] = [[] for _prompt in prompts]
        reasons = ["length"] * len(prompts)
        for step in self._steps(prompts, config, use_cache):
            for item in step:
                tokens[item.row].append(item.token_id)
                logprobs[item.row].append(item.logprob)
                if item.finish_reason:
                    reasons[item.row] = item.finish_reason
        return [GeneratedSequence(t, lp, r) for t, lp, r in zip(tokens, logprobs, reasons, strict=True)]

    def generate_ids(self, prompts: Sequence[Sequence[int]], config: GenerationConfig, use_cache: bool = True,
                     return_logprobs: bool = False
                     ) -> list[list[int]] | tuple[list[list[int]], list[list[float]]]:
        """Generated ids per prompt (a stop token, when hit, is the last id); with `return_logprobs`,
        also the per-token log-probs under the model (see `GeneratedSequence.logprobs`)."""
        sequences = self.generate_sequences(prompts, config, use_cache)
        ids = [s.token_ids for s in sequences]
        return (ids, [s.logprobs for s in sequences]) if return_logprobs else ids

    def generate(self, prompts: Sequence[str], config: GenerationConfig, chat: bool = False) -> list[str]:
        """Continue text prompts (or, with `chat`, answer them as user turns); stop strings are cut off."""
        prompt_ids = [self.encode_prompt(p, chat) for p in prompts]
        sequences = self.generate_sequences(prompt_ids, config)
        return [_cut_at_stop(self.continuation_text(ids, self._without_stop(s.token_ids, config), chat),
                             config.stop_strings)[0]
                for ids, s in zip(prompt_ids, sequences, strict=True)]

    def stream(self, prompt: str, config: GenerationConfig, chat: bool = False) -> Iterator[str]:
        """Yield the continuation of one prompt as text pieces, as soon as they are certain.

        Text is decoded from all ids so far and the new part yielded, so characters spread over
        several byte tokens (e.g. Chinese) come out whole; text that may be the start of a stop
        string is held back until it is known not to be one.
        """
        for step in self.stream_batch([self.encode_prompt(prompt, chat)], config, chat):
            for delta in step:
                if delta.text:
                    yield delta.text

    def stream_batch(self, prompts: Sequence[Sequence[int]], config: GenerationConfig,
                     chat: bool = False) -> Iterator[list[TextDelta]]:
        """Continue prompt ids as one batch, yielding per decoding step the new text of each prompt.

        The text rules are those of `stream` (whole characters, stop strings held back and cut). A
        prompt's last delta carries its `finish_reason` and any text still held back; a step lists
        only the prompts with new text or that just finished.
        """
        generated: list[list[int]] = [[] for _prompt in prompts]
        emitted = [0] * len(prompts)
        for step in self._steps(prompts, config, use_cache=True):
            deltas = []
            for item in step:
                generated[item.row].append(item.token_id)
                text = self.continuation_text(prompts[item.row], self._without_stop(generated[item.row], config),
                                              chat)
                text, stopped = _cut_at_stop(text, config.stop_strings)
                done = item.finish_reason is not None
                safe = len(text) if stopped or done else _safe_length(text, config.stop_strings)
                piece, emitted[item.row] = text[emitted[item.row]:safe], max(safe, emitted[item.row])
                if piece or done:
                    deltas.append(TextDelta(item.row, piece, item.finish_reason, len(generated[item.row])))
            if deltas:
                yield deltas

    def encode_prompt(self, prompt: str, chat: bool = False) -> list[int]:
        """Token ids of a text prompt (BOS first with `add_bos`; an empty prompt is the EOS boundary)."""
        tokenizer = self._require_tokenizer(_("text prompts"))
        if chat:
            ids = tokenizer.encode_chat([{"role": "user", "content": prompt}], add_generation_prompt=True).ids
        else:
            ids = tokenizer.encode(prompt)
        if self.add_bos:
            return [tokenizer.bos_id] + ids
        return ids or [tokenizer.eos_id]

    def continuation_text(self, prompt_ids: Sequence[int], generated: Sequence[int], chat: bool = False) -> str:
        """Text of `generated` as it reads after the prompt.

        A plain continuation is decoded with the prompt's last token as an anchor, which keeps a
        leading space that sentencepiece drops at the start of a decode (" cat" after "The"). A chat
        answer is decoded alone: it was encoded alone in training, so its leading space is not text.
        """
        tokenizer = self._require_tokenizer(_("decoding"))
        if not generated:
            return ""
        if chat or not prompt_ids:
            return tokenizer.decode(list(generated))
        anchor = list(prompt_ids[-1:])
        prefix = tokenizer.decode(anchor)
        text = tokenizer.decode(anchor + list(generated))
        return text[len(prefix):] if prefix and text.startswith(prefix) else tokenizer.decode(list(generated))

    def _require_tokenizer(self, purpose: str) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(_("{purpose} need a tokenizer; this TextGenerator was built without one").format(
                purpose=purpose))
        return self.tokenizer

    def _stop_ids(self, config: GenerationConfig) -> tuple[int, ...]:
        if config.stop_token_ids is not None:
            return config.stop_token_ids
        return self.tokenizer.stop_ids if self.tokenizer is not None else ()

    def _without_stop(self, ids: list[int], config: GenerationConfig) -> list[int]:
        return ids[:-1] if ids and ids[-1] in self._stop_ids(config) else ids

    def _check_prompts(self, prompts: Sequence[Sequence[int]]) -> int:
        """Validate prompt ids; return how many tokens can be generated for the batch."""
        if not prompts:
            raise ValueError(_("no prompts given"))
        config = self.model.config
        for index, ids in enumerate(prompts):
            if len(ids) == 0:
                raise ValueError(_("prompt {index} is empty; give at least one token (e.g. BOS)").format(index=index))
            bad = [i for i in ids if not 0 <= int(i) < config.vocab_size]
            if bad:
                raise ValueError(_("prompt {index} has token id(s) {ids} outside the vocabulary [0, {vocab_size})")
                                 .format(index=index, ids=bad[:5], vocab_size=config.vocab_size))
            if len(ids) >= config.max_seq_len:
                raise ValueError(_("prompt {index} has {tokens} tokens; the model's max_seq_len is {max_seq_len}, "
                                   "which leaves no room to generate").format(index=index, tokens=len(ids),
                                                                              max_seq_len=config.max_seq_len))
        return config.max_seq_len - max(len(ids) for ids in prompts)

    @torch.inference_mode()
    def _steps(self, prompts: Sequence[Sequence[int]], config: GenerationConfig,
               use_cache: bool) -> Iterator[list[_StepToken]]:
        """The decoding loop: yields, per step, the new token of every still-running sequence.

        Prompts are left-padded to one length; `attention_mask` hides the padding and `position_ids`
        count real tokens only, so each row computes exactly what it would alone. Finished rows are
        dropped from the batch (and the cache). The model is in eval mode while decoding and gets its
        train/eval mode back afterwards (the training loop samples mid-run).
        """
        was_training = self.model.training
        self.model.eval()
        try:
            yield from self._decode(prompts, config, use_cache)
        finally:
            self.model.train(was_training)

    def _decode(self, prompts: Sequence[Sequence[int]], config: GenerationConfig,
                use_cache: bool) -> Iterator[list[_StepToken]]:
        budget = min(config.max_new_tokens, self._check_prompts(prompts))
        if config.stop_strings:
            self._require_tokenizer("stop_strings")
        stop_ids = torch.tensor(self._stop_ids(config), device=self.device, dtype=torch.long)
        batch, width = len(prompts), max(len(ids) for ids in prompts)
        vocab = self.model.config.vocab_size
        pad = self.tokenizer.pad_id if self.tokenizer is not None else 0
        seq = torch.full((batch, width), pad, dtype=torch.long, device=self.device)
        mask = torch.zeros((batch, width), dtype=torch.long, device=self.device)
        for row, ids in enumerate(prompts):
            seq[row, width - len(ids):] = torch.tensor([int(i) for i in ids], device=self.device)
            mask[row, width - len(ids):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        padded = bool((mask == 0).any())
        seen = None
        if config.repetition_penalty != 1.0:
            counts = torch.zeros((batch, vocab), dtype=torch.long, device=self.device)
            seen = counts.scatter_add_(1, seq, mask) > 0
        rng = None
        if config.seed is not None and not config.greedy:
            rng = torch.Generator(device=self.device).manual_seed(config.seed)
        cache = None
        if use_cache:
            dtype = next(self.model.parameters()).dtype
            cache = KVCache(self.model.config, batch, max_len=width + budget, device=self.device, dtype=dtype)
        rows = list(range(batch))
        generated: list[list[int]] = [[] for _prompt in prompts]
        guard = (Utf8Guard(self.tokenizer.byte_values, vocab, self.device)
                 if self.tokenizer is not None and config.whole_characters else None)
        usable_vocab = self.tokenizer.vocab_size if self.tokenizer is not None else vocab
        step_input, step_positions = seq, positions
        for step in range(budget):
            logits = self.model(step_input, position_ids=step_positions,
                                attention_mask=mask if padded else None, cache=cache)[:, -1].float()
            logprobs = logits.log_softmax(-1)  # the model's own distribution, before any filtering
            if guard is not None:  # ids the tokenizer cannot decode, pieces that would break a character
                logits += guard.mask(rows, budget - step)
            elif usable_vocab < vocab:
                logits[:, usable_vocab:] = float("-inf")  # ids the tokenizer cannot decode
            scores = filter_logits(logits, seen, config)
            if config.greedy:
                next_ids = scores.argmax(-1)
            else:
                next_ids = torch.multinomial(scores.softmax(-1), 1, generator=rng).squeeze(-1)
            chosen = logprobs.gather(1, next_ids[:, None]).squeeze(-1)
            finished = torch.isin(next_ids, stop_ids)
            out = []
            for i, (row, token, logprob) in enumerate(zip(rows, next_ids.tolist(), chosen.tolist(), strict=True)):
                generated[row].append(token)
                if guard is not None:
                    guard.advance(row, token)
                reason = "stop" if finished[i] else None
                if reason is None and config.stop_strings and self._hits_stop_string(prompts[row], generated[row],
                                                                                      config):
                    reason = "stop"
                    finished[i] = True
                if reason is None and step == budget - 1:
                    reason = "length"
                out.append(_StepToken(row, token, logprob, reason))
            yield out
            if bool(finished.all()):
                return
            keep = (~finished).nonzero().squeeze(-1)
            if len(keep) < len(rows):
                rows = [rows[i] for i in keep.tolist()]
                next_ids, mask, seq, positions = next_ids[keep], mask[keep], seq[keep], positions[keep]
                seen = seen[keep] if seen is not None else None
                if cache is not None:
                    cache.select(keep)
            if seen is not None:
                seen[torch.arange(len(rows), device=self.device), next_ids] = True
            next_positions = positions[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(next_ids)[:, None]], dim=1)
            if cache is not None:
                step_input, step_positions = next_ids[:, None], next_positions
                positions = next_positions
            else:
                seq = torch.cat([seq, next_ids[:, None]], dim=1)
                positions = torch.cat([positions, next_positions], dim=1)
                step_input, step_positions = seq, positions

    def _hits_stop_string(self, prompt_ids: Sequence[int], generated: list[int], config: GenerationConfig) -> bool:
        text = self.continuation_text(prompt_ids, generated)
        return any(s in text for s in config.stop_strings)


def _cut_at_stop(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the earliest stop string, and whether one was found."""
    cuts = [text.find(s) for s in stop_strings if s in text]
    return (text[:min(cuts)], True) if cuts else (text, False)


def _safe_length(text: str, stop_strings: Sequence[str]) -> int:
    """How much of `text` can be shown: not an unfinished character, not a possible stop-string start."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    for stop in stop_strings:
        for size in range(min(len(stop) - 1, end), 0, -1):
            if text[:end].endswith(stop[:size]):
                end -= size
                break
    return end


__all__ = ["GenerationConfig", "GeneratedSequence", "TextDelta", "TextGenerator", "apply_repetition_penalty",
           "apply_temperature", "apply_top_k", "apply_top_p", "filter_logits"]
