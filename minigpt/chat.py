"""A multi-turn conversation with a chat model: history in the ChatML template, oldest turns dropped to fit.

    session = ChatSession(TextGenerator.from_dir("checkpoints/sft_tiny/final"), GenerationConfig(),
                          system_prompt="You are terse.")
    for piece in session.reply("Hello"):
        print(piece, end="", flush=True)

The model sees the whole conversation each turn (system prompt, then every kept user/assistant turn,
then the new user message). When that would leave too little room for the answer, the oldest whole
turns (a user message and its answer) are dropped; the system prompt always stays.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from minigpt.generate import GenerationConfig, TextGenerator
from minigpt.i18n import _


@dataclass
class Turn:
    user: str
    assistant: str


class ChatSession:
    """History and the context-fitting rule of a terminal chat; `reply` streams one answer."""

    def __init__(self, generator: TextGenerator, config: GenerationConfig, system_prompt: str = ""):
        if generator.tokenizer is None:
            raise ValueError(_("chat needs a tokenizer; this TextGenerator was built without one"))
        self.generator = generator
        self.config = config
        self.system_prompt = system_prompt
        self.turns: list[Turn] = []
        self.dropped_turns = 0
        """How many of the oldest turns the last `reply` dropped to fit the context."""

    @property
    def max_seq_len(self) -> int:
        return self.generator.model.config.max_seq_len

    @property
    def answer_room(self) -> int:
        """Tokens kept free for the answer: max_new_tokens, but at most half the context."""
        return min(self.config.max_new_tokens, self.max_seq_len // 2)

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.turns.clear()

    def messages(self, user: str, turns: list[Turn] | None = None) -> list[dict]:
        """The chat messages the model sees for a new `user` message after `turns` (default: all kept)."""
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        for turn in self.turns if turns is None else turns:
            messages += [{"role": "user", "content": turn.user}, {"role": "assistant", "content": turn.assistant}]
        return messages + [{"role": "user", "content": user}]

    def prompt_ids(self, user: str) -> tuple[list[int], int]:
        """Prompt ids for `user` after as many of the latest turns as fit, and how many old turns were left out.

        Raises ValueError when the system prompt and the message alone leave no room to answer.
        """
        tokenizer = self.generator.tokenizer
        for dropped in range(len(self.turns) + 1):
            ids = tokenizer.encode_chat(self.messages(user, self.turns[dropped:]), add_generation_prompt=True).ids
            if len(ids) + self.answer_room <= self.max_seq_len:
                return ids, dropped
        if len(ids) < self.max_seq_len:
            return ids, len(self.turns)  # the message alone fits with a shorter answer
        raise ValueError(_("the message is {tokens} tokens with the chat template and system prompt; the model's "
                           "context is {max_seq_len} tokens, which leaves no room to answer").format(
            tokens=len(ids), max_seq_len=self.max_seq_len))

    def reply(self, user: str) -> Iterator[str]:
        """Stream the answer to `user` as text pieces (whole characters); the turn joins the history
        once the answer is complete. Old turns that do not fit are dropped first (see `dropped_turns`)."""
        ids, self.dropped_turns = self.prompt_ids(user)
        pieces = []
        for step in self.generator.stream_batch([ids], self.config, chat=True):
            for delta in step:
                if delta.text:
                    pieces.append(delta.text)
                    yield delta.text
        del self.turns[:self.dropped_turns]
        self.turns.append(Turn(user, "".join(pieces)))


__all__ = ["ChatSession", "Turn"]
