"""Serve a consolidated MiniGPT model over HTTP: an OpenAI-compatible API and a web chat page.

    python launch/serve.py --model checkpoints/sft_tiny/final --port 8000
    # web chat:  http://127.0.0.1:8000/
    # API:       OPENAI_BASE_URL=http://127.0.0.1:8000/v1 OPENAI_API_KEY=unused <any OpenAI client>

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with "stream": true as
server-sent events), GET / (web chat), GET /health. The sampling flags are the defaults of requests that
leave a field out; requests name the model by --model-name (default: the model directory's name).
See docs/serving.md.

Exit codes: 0 stopped with Ctrl-C, 2 bad usage, a model directory that cannot be loaded or a port in use.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from minigpt.cli.args import FlagParser
from minigpt.cli.generate import add_sampling_arguments, load_generator
from minigpt.config import ConfigError
from minigpt.tokenizer import TokenizerError
from minigpt.weights import WeightsError


def build_parser() -> argparse.ArgumentParser:
    parser = FlagParser(prog="launch/serve.py", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="consolidated model directory")
    parser.add_argument("--model-name", default="",
                        help="the model id clients send and /v1/models lists (default: the directory's name)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (0.0.0.0 for every interface; there is no authentication)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port)")
    parser.add_argument("--quiet", action="store_true", help="do not log each request to stderr")
    add_sampling_arguments(parser, max_new_tokens=256)
    return parser


def model_name(model_dir: str) -> str:
    """The default model id: the directory's name, or its parent's when it is a run's `final/`."""
    path = Path(model_dir).resolve()
    return path.parent.name if path.name == "final" and path.parent.name else path.name


def main(argv: list[str] | None = None) -> int:
    from minigpt.serve.server import ModelServer

    args = build_parser().parse_args(argv)
    try:
        generator, defaults = load_generator(args)
    except (ConfigError, WeightsError, TokenizerError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    name = args.model_name or model_name(args.model)
    try:
        server = ModelServer(generator, name, defaults, host=args.host, port=args.port, quiet=args.quiet)
    except OSError as err:
        print(f"error: --host {args.host} --port {args.port}: cannot listen there: {err.strerror or err}",
              file=sys.stderr)
        return 2
    print(f"serving {args.model} as {name!r} on {server.url}  (web chat: {server.url}/, API: {server.url}/v1)",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("\nstopped", file=sys.stderr)
    finally:
        server.httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
