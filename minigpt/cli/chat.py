"""Chat with a consolidated MiniGPT model in the terminal: multi-turn, streamed, in the ChatML template.

    python launch/chat.py --model checkpoints/sft_tiny/final --system "You are a helpful assistant."
    printf 'Hello\n/reset\n你好\n' | python launch/chat.py --model DIR --greedy   # scripted, from stdin

Each line you type is a user message; the answer streams as it is generated. Commands:
  /reset        forget the conversation (the system prompt stays)
  /system TEXT  set the system prompt (empty TEXT removes it); the conversation is kept
  /exit         leave (end of input and Ctrl-D do too; Ctrl-C stops the answer being written)
When the conversation no longer fits the model's context, the oldest whole turns are dropped.
Answers go to stdout, notices (prompts, dropped turns, command results) to stderr.

Exit codes: 0 done, 2 bad usage, a model directory that cannot be loaded, or piped input that is not UTF-8.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator
from typing import TextIO

from minigpt.chat import ChatSession
from minigpt.cli.args import FlagParser
from minigpt.cli.generate import add_sampling_arguments, load_generator_or_report
from minigpt.i18n import _
from minigpt.tokenizer import is_utf8_text


def build_parser() -> argparse.ArgumentParser:
    parser = FlagParser(prog="launch/chat.py", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="consolidated model directory (a chat-tuned model)")
    parser.add_argument("--system", default="", help="system prompt at the start of the conversation")
    add_sampling_arguments(parser, max_new_tokens=256)
    return parser


class ChatInputError(ValueError):
    """A piped stdin line that is not UTF-8 text."""


def piped_lines(stream: TextIO) -> Iterator[str]:
    """The lines of a piped stdin, decoded as UTF-8 line by line (a byte-order mark skipped);
    ChatInputError names the line, byte and column of one that is not UTF-8."""
    source = getattr(stream, "buffer", stream)
    for number, line in enumerate(source, start=1):
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ChatInputError(_("stdin line {number}: not valid UTF-8 (byte 0x{byte:02x} at column "
                                       "{column}); the message was not sent")
                                     .format(number=number, byte=line[err.start], column=err.start + 1)) from None
        yield (line.removeprefix("\ufeff") if number == 1 else line).rstrip("\r\n")


def typed_lines() -> Iterator[str]:
    """Lines typed at a terminal with `input()` (line editing, a prompt on stderr); a line the terminal did
    not send as UTF-8 is refused with a notice and the chat goes on."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    while True:
        try:
            print(">>> ", end="", file=sys.stderr, flush=True)
            line = input()
        except EOFError:
            print(file=sys.stderr)
            return
        if is_utf8_text(line):
            yield line
        else:
            print(_("[that line is not valid UTF-8 text (check the terminal's encoding); not sent]"), file=sys.stderr)


def run_command(session: ChatSession, line: str) -> bool:
    """Carry out a /command; False when it asks to leave."""
    name, _space, argument = line.partition(" ")
    if name in ("/exit", "/quit"):
        return False
    if name == "/reset":
        session.reset()
        print(_("[conversation reset]"), file=sys.stderr)
    elif name == "/system":
        session.system_prompt = argument.strip()
        print(_("[system prompt set]") if session.system_prompt else _("[system prompt removed]"), file=sys.stderr)
    else:
        print(_("[unknown command {name}; use /reset, /system TEXT or /exit]").format(name=name), file=sys.stderr)
    return True


def converse(session: ChatSession, lines: Iterable[str]) -> None:
    """The chat loop: each line a message or a command, each answer streamed to stdout."""
    for line in lines:
        if not line.strip():
            continue
        if line.startswith("/"):
            if not run_command(session, line.strip()):
                return
            continue
        try:
            for piece in session.reply(line):
                print(piece, end="", flush=True)
        except ValueError as err:  # the message alone does not fit the context
            print(_("[{err}]").format(err=err), file=sys.stderr)
            continue
        except KeyboardInterrupt:
            print("\n" + _("[answer interrupted; not kept in the conversation]"), file=sys.stderr)
            continue
        print(flush=True)
        if session.dropped_turns:
            print(_("[context full: dropped the oldest {turns} turn(s)]").format(turns=session.dropped_turns),
                  file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    loaded = load_generator_or_report(args)
    if loaded is None:
        return 2
    generator, config = loaded
    session = ChatSession(generator, config, system_prompt=args.system)
    interactive = sys.stdin.isatty()
    if interactive:
        print(_("[chatting with {model}; /reset, /system TEXT, /exit]").format(model=args.model), file=sys.stderr)
    try:
        converse(session, typed_lines() if interactive else piped_lines(sys.stdin))
    except KeyboardInterrupt:
        print(file=sys.stderr)
    except ChatInputError as err:
        print(_("error: {error}").format(error=err), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
