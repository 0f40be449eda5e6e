"""The OpenAI wire format: request bodies checked and turned into generation jobs, and the JSON objects
(responses, stream chunks, errors) the official clients expect.

Only plain JSON and the standard library: the `openai` package is a test dependency, never imported here.
Fields MiniGPT has no use for (`user`, `logprobs`, `presence_penalty`: 0, ...) are accepted and ignored,
so existing clients and chat front-ends work unchanged; a field with a value MiniGPT cannot honour is
refused with a 400 that names it.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from minigpt.config import ConfigError
from minigpt.generate import GenerationConfig
from minigpt.tokenizer import Tokenizer, is_utf8_text

MAX_N = 16
"""Most choices one request may ask for (they decode as one batch)."""
MAX_STOP = 4
"""Most stop strings per request, as OpenAI allows."""
MIN_TEMPERATURE = 1e-3
"""The lowest sampling temperature: below it the logits divided by it can overflow to inf (NaN sampling)."""
REPETITION_PENALTY_RANGE = (1e-2, 100.0)
"""A penalty outside it scales logits to inf or to zero."""
SEED_RANGE = (-(2**63), 2**64 - 1)
"""What torch.Generator.manual_seed accepts."""


@dataclass(frozen=True)
class RequestLimits:
    """How much work one request may ask for, so that one request cannot hold the worker for minutes or
    grow the process without bound (the serve command's --max-rows-per-request, --max-tokens-per-request)."""

    max_rows: int = 32
    """Sequences decoded for one request: prompts × n."""
    max_tokens: int = 8192
    """New tokens one request may generate: each sequence's max_tokens (cut at the context) summed."""


class APIError(Exception):
    """A request the server refuses: HTTP status and an OpenAI-shaped error body."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.kind = message, status, param, code, kind

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """{"error": {...}} as the OpenAI API returns it."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class GenerationRequest:
    """A checked /v1/completions or /v1/chat/completions request, ready for the worker."""

    chat: bool
    prompt_ids: list[list[int]]
    """One entry per choice: each prompt repeated `n` times, in the order of the choices' indices."""
    config: GenerationConfig
    stream: bool
    n: int = 1
    """Choices per prompt."""
    include_usage: bool = False
    """stream_options.include_usage: a last chunk with the token counts."""
    id: str = field(default_factory=lambda: "")
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def prompt_tokens(self) -> int:
        """Tokens of the prompts, each counted once however many choices it has (as OpenAI counts)."""
        return sum(len(ids) for ids in self.prompt_ids[::self.n])


def _field(body: dict, name: str, kinds: type | tuple[type, ...], default=None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise APIError(f"'{name}' must be {_kind_names(kinds)}, got {value!r}", param=name)
    if not isinstance(value, kinds):
        raise APIError(f"'{name}' must be {_kind_names(kinds)}, got {value!r}", param=name)
    return value


def _kind_names(kinds: type | tuple[type, ...]) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "an object"}
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    return " or ".join(dict.fromkeys(names[k] for k in kinds))


def generation_config(body: dict, defaults: GenerationConfig) -> GenerationConfig:
    """The sampling fields of a request; a field the request leaves out takes the server's default
    (`defaults`, from the serve command's flags). 400 naming a field out of range."""
    max_tokens = _field(body, "max_completion_tokens", int, _field(body, "max_tokens", int,
                                                                       defaults.max_new_tokens))
    temperature = float(_field(body, "temperature", (int, float), defaults.temperature if defaults.do_sample
                                                                      else 0.0))
    top_p = float(_field(body, "top_p", (int, float), defaults.top_p))
    stop = _field(body, "stop", (str, list), list(defaults.stop_strings))
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise APIError(f"'stop' must be a string or a list of at most {MAX_STOP} non-empty strings",
                       param="stop")
    if not (temperature == 0 or MIN_TEMPERATURE <= temperature <= 2):
        raise APIError(f"'temperature' must be 0 (greedy) or between {MIN_TEMPERATURE} and 2, "
                       f"got {temperature}", param="temperature")
    if not 0 < top_p <= 1:
        raise APIError(f"'top_p' must be in (0, 1], got {top_p}", param="top_p")
    if max_tokens < 1:
        raise APIError(f"'max_tokens' must be at least 1, got {max_tokens}", param="max_tokens")
    for name in ("presence_penalty", "frequency_penalty"):
        if _field(body, name, (int, float), 0) != 0:
            raise APIError(f"'{name}' is not supported by this server (use 'repetition_penalty')", param=name)
    repetition_penalty = float(_field(body, "repetition_penalty", (int, float), defaults.repetition_penalty))
    _check_range("repetition_penalty", repetition_penalty, *REPETITION_PENALTY_RANGE)
    top_k = _field(body, "top_k", int, defaults.top_k)
    seed = _field(body, "seed", int, defaults.seed)
    if seed is not None:
        _check_range("seed", seed, *SEED_RANGE)
    try:
        return GenerationConfig(
            max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            repetition_penalty=repetition_penalty, do_sample=temperature > 0, stop_strings=tuple(stop),
            seed=seed)
    except ConfigError as err:
        raise APIError(str(err)) from None


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        shown = value if abs(value) < 2**64 else f"a number of {len(str(abs(int(value))))} digits"
        raise APIError(f"'{name}' must be between {low} and {high}, got {shown}", param=name)


def _prompts(body: dict, tokenizer: Tokenizer) -> list[list[int]]:
    """A completion's `prompt`: a string, a list of strings, a list of token ids or a list of such lists."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompt = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_int(i) for i in prompt):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise APIError("'prompt' must be a string, a list of strings or a list of token ids", param="prompt")
    ids = []
    for item in prompt:
        if isinstance(item, str):
            ids.append(tokenizer.encode(item) or [tokenizer.eos_id])
        elif isinstance(item, list) and item and all(_is_int(i) for i in item):
            ids.append(list(item))
        else:
            raise APIError("'prompt' must be a string, a list of strings or a list of token ids",
                           param="prompt")
    return ids


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _messages(body: dict) -> list[dict]:
    """Chat `messages` as the tokenizer's template takes them: roles system/user/assistant, text content
    (a string, or a list of {"type": "text"} parts joined)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError("'messages' must be a non-empty list of {role, content} objects", param="messages")
    checked = []
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise APIError(f"messages[{index}].role must be 'system', 'user' or 'assistant', got {role!r}",
                           param=f"messages[{index}].role")
        content = message.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(f"messages[{index}].content: only text parts are supported",
                               param=f"messages[{index}].content")
            content = "".join(p["text"] for p in content)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise APIError(f"messages[{index}].content must be a string", param=f"messages[{index}].content")
        checked.append({"role": role, "content": content})
    return checked


def parse_request(body: object, chat: bool, model_name: str, tokenizer: Tokenizer, max_seq_len: int,
                  defaults: GenerationConfig, limits: RequestLimits | None = None) -> GenerationRequest:
    """Check a request body (already parsed JSON) and build its job; APIError (400) naming what is wrong."""
    limits = limits or RequestLimits()
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(f"'model' is required: the id of the served model, {model_name!r}", param="model")
    if model != model_name:
        raise APIError(f"the model {model!r} does not exist; this server serves {model_name!r}",
                       param="model", code="model_not_found")
    n = _field(body, "n", int, 1)
    if not 1 <= n <= MAX_N:
        raise APIError(f"'n' must be between 1 and {MAX_N}, got {n}", param="n")
    _check_rows(1 if chat else _prompt_count(body), n, limits.max_rows)
    config = generation_config(body, defaults)
    if chat:
        prompts = [tokenizer.encode_chat(_messages(body), add_generation_prompt=True).ids]
    else:
        prompts = _prompts(body, tokenizer)
    _check_prompts(prompts, chat, tokenizer.vocab_size, max_seq_len)
    _check_new_tokens(prompts, n, config.max_new_tokens, max_seq_len, limits.max_tokens)
    stream = _field(body, "stream", bool, False)
    options = _field(body, "stream_options", dict, {})
    return GenerationRequest(
        chat=chat, prompt_ids=[ids for ids in prompts for _ in range(n)], config=config, stream=stream, n=n,
        include_usage=bool(stream and options.get("include_usage")),
        id=("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24])


def _prompt_count(body: dict) -> int:
    """How many prompts a completion request has, counted before any is tokenized."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and not all(_is_int(i) for i in prompt):
        return len(prompt)
    return 1


def _check_rows(prompts: int, n: int, max_rows: int) -> None:
    if prompts * n > max_rows:
        raise APIError(f"this request asks for {prompts} prompts × n={n} = {prompts * n} sequences; this "
                       f"server decodes at most {max_rows} per request (--max-rows-per-request)",
                       param="n" if n > 1 else "prompt")


def _check_new_tokens(prompts: list[list[int]], n: int, max_tokens: int, max_seq_len: int, cap: int) -> None:
    """Refuse a request whose sequences could generate more than `cap` tokens in all (each sequence's
    max_tokens cut at the room its prompt leaves in the context, as the generator cuts it)."""
    total = n * sum(min(max_tokens, max_seq_len - len(ids)) for ids in prompts)
    if total > cap:
        raise APIError(f"this request may generate up to {total} new tokens ({len(prompts) * n} sequences, "
                       f"max_tokens {max_tokens}, cut at the context); this server allows at most {cap} per "
                       "request (--max-tokens-per-request): lower 'max_tokens' or 'n'", param="max_tokens")


def _check_prompts(prompts: list[list[int]], chat: bool, vocab_size: int, max_seq_len: int) -> None:
    for index, ids in enumerate(prompts):
        if any(not 0 <= i < vocab_size for i in ids):
            raise APIError(f"prompt {index} has token ids outside the vocabulary [0, {vocab_size})",
                           param="prompt")
        if len(ids) >= max_seq_len:
            what = "the messages are" if chat else f"prompt {index} is"
            raise APIError(f"{what} {len(ids)} tokens; the model's context is {max_seq_len} tokens, which "
                           "leaves no room to generate", param="messages" if chat else "prompt",
                           code="context_length_exceeded")


def lone_surrogate_path(value: object) -> str | None:
    """Where a parsed JSON body holds a string with a lone UTF-16 surrogate ("\\ud800" is valid JSON but
    not text: nothing can encode it), as `messages[0].content`; None if nowhere."""
    pending: list[tuple[object, str]] = [(value, "")]
    while pending:
        item, path = pending.pop()
        if isinstance(item, str) and not is_utf8_text(item):
            return path or "the body"
        if isinstance(item, dict):
            for key, child in item.items():
                if not is_utf8_text(key):
                    return f"a key in {path or 'the body'}"
                pending.append((child, f"{path}.{key}" if path else key))
        elif isinstance(item, list):
            pending.extend((child, f"{path}[{index}]") for index, child in enumerate(item))
    return None


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(request: GenerationRequest, model_name: str, texts: list[str], reasons: list[str],
             completion_tokens: int) -> dict:
    """The whole (non-streamed) answer: a `text_completion` or `chat.completion` object."""
    if request.chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": reason}
                   for i, (text, reason) in enumerate(zip(texts, reasons, strict=True))]
    else:
        choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                   for i, (text, reason) in enumerate(zip(texts, reasons, strict=True))]
    return {"id": request.id, "object": "chat.completion" if request.chat else "text_completion",
            "created": request.created, "model": model_name, "choices": choices,
            "usage": usage(request.prompt_tokens, completion_tokens)}


def chunk(request: GenerationRequest, model_name: str, index: int | None = None, text: str | None = None,
          finish_reason: str | None = None, role: bool = False, usage_counts: dict | None = None) -> dict:
    """One server-sent event of a streamed answer (a `chat.completion.chunk` or `text_completion`)."""
    choices = []
    if index is not None:
        if request.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choices = [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        else:
            choices = [{"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}]
    event = {"id": request.id, "object": "chat.completion.chunk" if request.chat else "text_completion",
             "created": request.created, "model": model_name, "choices": choices}
    if usage_counts is not None:
        event["usage"] = usage_counts
    return event


def models_list(model_name: str, created: int) -> dict:
    return {"object": "list", "data": [model_object(model_name, created)]}


def model_object(model_name: str, created: int) -> dict:
    return {"id": model_name, "object": "model", "created": created, "owned_by": "minigpt"}


__all__ = ["APIError", "GenerationRequest", "RequestLimits", "chunk", "error_body", "generation_config",
           "lone_surrogate_path", "model_object", "models_list", "parse_request", "response", "usage"]
