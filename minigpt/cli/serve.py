"""Serve a consolidated MiniGPT model over HTTP: an OpenAI-compatible API and a web chat page.

    python launch/serve.py --model checkpoints/sft_tiny/final --port 8000
    # web chat:  http://127.0.0.1:8000/
    # API:       OPENAI_BASE_URL=http://127.0.0.1:8000/v1 OPENAI_API_KEY=unused <any OpenAI client>
    MINIGPT_API_KEY=secret python launch/serve.py --model ... --host 0.0.0.0   # clients send that key

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with "stream": true as
server-sent events), GET / (web chat), GET /health. The sampling flags are the defaults of requests that
leave a field out; requests name the model by --model-name (default: the model directory's name).
Requests too big for --max-rows-per-request / --max-tokens-per-request are 400s, a full queue is a 429.
See docs/serving.md (its security model says what --api-key, --allow-origin and --allow-host protect).

Exit codes: 0 stopped with Ctrl-C, 2 bad usage, a model directory that cannot be loaded or a port in use.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from minigpt.cli.args import FlagParser
from minigpt.cli.generate import add_sampling_arguments, load_generator_or_report
from minigpt.i18n import _, docs_page
from minigpt.serve.access import AccessPolicy, is_loopback
from minigpt.serve.connections import ConnectionLimits
from minigpt.serve.openai_api import RequestLimits
from minigpt.serve.server import ModelServer
from minigpt.serve.worker import MAX_QUEUE
from minigpt.weights import FINAL_DIR

API_KEY_ENV = "MINIGPT_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    parser = FlagParser(prog="launch/serve.py", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="consolidated model directory (or a run directory: its final/), or a Hugging Face "
                             "Llama directory")
    parser.add_argument("--model-name", default="",
                        help="the model id clients send and /v1/models lists (default: the directory's name)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (0.0.0.0 for every interface: set --api-key then)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port)")
    parser.add_argument("--quiet", action="store_true", help="do not log each request to stderr")
    add_sampling_arguments(parser, max_new_tokens=256)
    add_access_arguments(parser)
    add_limit_arguments(parser)
    return parser


def add_access_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(f"access (see {docs_page('serving.md')}, security model)")
    group.add_argument("--api-key", default=None,
                       help=f"require 'Authorization: Bearer KEY' on /v1 routes (default: ${API_KEY_ENV}, "
                            "which keeps the key out of the process list; unset: no key)")
    group.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                       help="a web page origin (https://app.example:8443) allowed to call the API from a "
                            "browser, with CORS headers; repeatable; '*' for any (default: only the server's "
                            "own page)")
    group.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                       help="a Host name accepted besides the loopback ones (the Host check, against DNS "
                            "rebinding, is on when listening on loopback or when this is given); repeatable")


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    requests, connections = RequestLimits(), ConnectionLimits()
    group = parser.add_argument_group("limits")
    group.add_argument("--max-rows-per-request", type=positive_int, default=requests.max_rows, metavar="N",
                       help=f"most sequences (prompts × n) one request may decode "
                            f"(default {requests.max_rows})")
    group.add_argument("--max-tokens-per-request", type=positive_int, default=requests.max_tokens,
                       metavar="N",
                       help="most new tokens one request may ask for, over all its sequences "
                            f"(default {requests.max_tokens})")
    group.add_argument("--max-queue", type=positive_int, default=MAX_QUEUE, metavar="N",
                       help=f"requests waiting for the model; beyond, 429 with Retry-After "
                            f"(default {MAX_QUEUE})")
    group.add_argument("--max-connections", type=positive_int, default=connections.max_connections,
                       metavar="N",
                       help="connections served at once; beyond, 503 (default "
                            f"{connections.max_connections})")
    group.add_argument("--idle-timeout", type=positive_float, default=connections.idle_timeout, metavar="S",
                       help=f"close a connection idle this long (default {connections.idle_timeout:g} s)")
    group.add_argument("--request-timeout", type=positive_float, default=connections.request_timeout,
                       metavar="S", help="a request's line, headers and body must arrive within this long, "
                                         f"else 408 (default {connections.request_timeout:g} s)")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(_("must be at least 1, got {value}").format(value=value))
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(_("must be a positive number of seconds, got {text}").format(text=text))
    return value


def api_key(args: argparse.Namespace) -> str | None:
    """The key from --api-key, else from the environment; None (no key) when neither is set or empty."""
    return args.api_key or os.environ.get(API_KEY_ENV) or None


def model_name(model_dir: str) -> str:
    """The default model id: the directory's name, or its parent's when it is a run's `final/`."""
    path = Path(model_dir).resolve()
    return path.parent.name if path.name == FINAL_DIR and path.parent.name else path.name


def server_options(args: argparse.Namespace) -> dict:
    """ModelServer's keyword arguments for the access and limit flags."""
    return {"access": AccessPolicy.for_address(args.host, api_key(args), tuple(args.allow_origin),
                                               tuple(args.allow_host)),
            "request_limits": RequestLimits(args.max_rows_per_request, args.max_tokens_per_request),
            "connection_limits": ConnectionLimits(max_connections=args.max_connections,
                                                  backlog=max(args.max_connections, 128),
                                                  idle_timeout=args.idle_timeout,
                                                  request_timeout=args.request_timeout),
            "max_queue": args.max_queue}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    loaded = load_generator_or_report(args)
    if loaded is None:
        return 2
    generator, defaults = loaded
    name = args.model_name or model_name(args.model)
    try:
        server = ModelServer(generator, name, defaults, host=args.host, port=args.port, quiet=args.quiet,
                             **server_options(args))
    except OSError as err:
        print(_("error: --host {host} --port {port}: cannot listen there: {reason}")
              .format(host=args.host, port=args.port, reason=err.strerror or err), file=sys.stderr)
        return 2
    print(_("serving {model} as {name!r} on {url}  (web chat: {url}/, API: {url}/v1)")
          .format(model=args.model, name=name, url=server.url), file=sys.stderr, flush=True)
    if server.access.api_key is None and not is_loopback(args.host):
        print(_("warning: --host {host} without --api-key: anyone who can reach this port can use the model")
              .format(host=args.host), file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("\n" + _("stopped"), file=sys.stderr)
    finally:
        server.httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
