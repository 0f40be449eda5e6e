"""An OpenAI-compatible HTTP server over a `TextGenerator`, on the standard library's ThreadingHTTPServer.

    server = ModelServer(TextGenerator.from_dir(DIR), model_name="minigpt", port=8000)
    server.serve_forever()          # or server.start() for a background thread (tests, benchmarks)

Routes: GET / (the web chat page), GET /v1/models[/ID], POST /v1/completions, POST /v1/chat/completions,
GET /health. Each connection has its own thread (`connections.CappedHTTPServer`) that parses and answers;
the model is used only by the `GenerationWorker` thread. Answers stream as server-sent events with
`"stream": true`. Who may call it: `access.AccessPolicy`.
"""

from __future__ import annotations

import io
import json
import select
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from importlib import resources

from minigpt.generate import GenerationConfig, TextGenerator
from minigpt.i18n import _
from minigpt.serve.access import AccessPolicy
from minigpt.serve.connections import (
    RETRY_AFTER_SECONDS,
    CappedHTTPServer,
    ConnectionLimits,
    DeadlineReader,
    RequestTooSlow,
)
from minigpt.serve.openai_api import (
    APIError,
    GenerationRequest,
    RequestLimits,
    chunk,
    error_body,
    lone_surrogate_path,
    model_object,
    models_list,
    parse_request,
    response,
    usage,
)
from minigpt.serve.worker import MAX_QUEUE, ClientGone, GenerationWorker, Job, QueueFull

MAX_BODY_BYTES = 8 * 1024 * 1024


def web_page() -> bytes:
    """The single-page web chat shipped in the package (static/index.html, no build step, no CDN)."""
    return resources.files("minigpt.serve").joinpath("static/index.html").read_bytes()


class ModelServer:
    """The HTTP server, the generation worker and what the handlers need to know about the model."""

    def __init__(self, generator: TextGenerator, model_name: str, defaults: GenerationConfig | None = None,
                 host: str = "127.0.0.1", port: int = 8000, quiet: bool = False,
                 request_limits: RequestLimits | None = None,
                 connection_limits: ConnectionLimits | None = None, access: AccessPolicy | None = None,
                 max_queue: int = MAX_QUEUE):
        if generator.tokenizer is None:
            raise ValueError(_("serving needs a tokenizer; this TextGenerator was built without one"))
        self.generator = generator
        self.model_name = model_name
        self.defaults = defaults or GenerationConfig(max_new_tokens=256)
        self.quiet = quiet
        self.created = int(time.time())
        self.request_limits = request_limits or RequestLimits()
        self.connection_limits = connection_limits or ConnectionLimits()
        self.access = access or AccessPolicy.for_address(host)
        self.httpd = CappedHTTPServer((host, port), _handler_class(self), self.connection_limits)
        self.worker = GenerationWorker(generator, max_queue=max_queue)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def start(self) -> ModelServer:
        """Serve from a background thread; `close` stops it."""
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="minigpt-http", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
        self.httpd.server_close()
        self.worker.stop()

    def parse(self, body: object, chat: bool) -> GenerationRequest:
        return parse_request(body, chat, self.model_name, self.generator.tokenizer,
                             self.generator.model.config.max_seq_len, self.defaults, self.request_limits)

    def submit(self, request: GenerationRequest) -> Job:
        """Queue the request for the worker; a 429 APIError when the queue is full."""
        try:
            return self.worker.submit(request.prompt_ids, request.config, request.chat)
        except QueueFull as err:
            raise APIError(f"the server is busy: {err.waiting} requests are already waiting for the model "
                           f"(--max-queue {self.worker.max_queue}); retry after {RETRY_AFTER_SECONDS} s",
                           status=429, kind="rate_limit_error", code="queue_full") from None


def _handler_class(server: ModelServer) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        model_server = server

    return Handler


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "minigpt-serve"
    model_server: ModelServer

    # --- connection -------------------------------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        self.reader = DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self.reader)

    def handle_one_request(self) -> None:
        """Wait up to the idle timeout for a request (then close without a word), then give it the request
        timeout to arrive whole: a request that does not is answered 408. Anything unexpected is a 500
        JSON error, not a dropped connection."""
        limits = self.model_server.connection_limits
        if not self._next_request_started(limits.idle_timeout):
            self.close_connection = True
            return
        self._replied = False
        self.command, self.requestline, self.request_version = None, "", "HTTP/1.1"
        self.reader.deadline = time.monotonic() + limits.request_timeout
        try:
            super().handle_one_request()
        except RequestTooSlow:
            self.close_connection = True
            if not self._replied:
                self._send_error(APIError(f"the request did not arrive within {limits.request_timeout} s",
                                          status=408, code="request_timeout"))
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception as err:  # noqa: BLE001  (a bug must not drop the connection without an answer)
            self.close_connection = True
            self.log_error("internal error: %r", err)
            if not self._replied:
                self._send_json(500, error_body(f"internal error: {err!r}", "server_error"))

    def _next_request_started(self, idle_timeout: float) -> bool:
        """Whether the first byte of a request arrives within `idle_timeout` seconds."""
        self.reader.deadline = time.monotonic() + idle_timeout
        try:
            return bool(self.rfile.peek(1))
        except (RequestTooSlow, OSError):
            return False

    def _request_read(self) -> None:
        """The request has arrived whole: from here on, only writes wait (for a client reading slowly)."""
        self.reader.deadline = None
        self.connection.settimeout(self.model_server.connection_limits.write_timeout)

    def _client_gone(self) -> bool:
        """Whether the client has closed its connection (checked while its answer is being generated)."""
        try:
            if hasattr(select, "poll"):
                poller = select.poll()
                poller.register(self.connection, select.POLLIN)
                if not poller.poll(0):
                    return False
            elif not select.select([self.connection], [], [], 0)[0]:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    # --- plumbing ---------------------------------------------------------------------------------

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        if not self.model_server.quiet:
            sys.stderr.write(f"{self.address_string()} - {format % args}\n")

    def send_response(self, code: int, message: str | None = None) -> None:
        self._replied = True
        super().send_response(code, message)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The HTTP layer's own errors (bad request line, too many headers, unknown method), as JSON."""
        self.close_connection = True
        text = message or self.responses.get(code, ("error",))[0]
        self._send_error(APIError(text, status=code))

    def _send(self, status: int, body: bytes, content_type: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in {**self._cors_headers(), **(headers or {})}.items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, payload: dict, headers: dict | None = None) -> None:
        text = json.dumps(payload, ensure_ascii=False)
        self._send(status, text.encode("utf-8", "backslashreplace"), "application/json", headers)

    def _send_error(self, err: APIError) -> None:
        headers = {}
        if err.status == 429:
            headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        elif err.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        self._send_json(err.status, err.body(), headers)

    def _cors_headers(self) -> dict:
        origin = self.model_server.access.cors_origin(self.headers) if hasattr(self, "headers") else None
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"} if origin else {}

    def _content_length(self) -> int:
        """The body's length from its Content-Length header; 411, 400 or 413 (closing the connection, as
        the body cannot be skipped)."""
        values = self.headers.get_all("Content-Length") or []
        problem = None
        if not values:
            problem = APIError("the request needs a Content-Length header (chunked bodies are not supported)",
                               status=411)
        elif len(set(values)) > 1 or not (values[0].isascii() and values[0].isdigit()) or len(values[0]) > 15:
            problem = APIError(f"the Content-Length header must be one decimal number, got "
                               f"{', '.join(values)!r}")
        elif int(values[0]) > MAX_BODY_BYTES:
            problem = APIError(f"the request body is over {MAX_BODY_BYTES} bytes", status=413)
        if problem is not None:
            self.close_connection = True
            raise problem
        return int(values[0])

    def _read_body(self, length: int, keep: bool = True) -> bytes:
        """The body's bytes (`keep`), or read and dropped in pieces so the connection can be reused."""
        if keep:
            data = self.rfile.read(length)
        else:
            while length > 0 and (piece := self.rfile.read(min(length, 65536))):
                length -= len(piece)
            data = b""
        self._request_read()
        return data

    def _parse_json(self, raw: bytes) -> object:
        try:
            body = json.loads(raw, parse_constant=_refuse_constant)
        except RecursionError:
            raise APIError("the request body is not valid JSON: nested too deeply") from None
        except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
            raise APIError(f"the request body is not valid JSON: {err}") from None
        where = lone_surrogate_path(body)
        if where is not None:
            raise APIError(f"{where} has a lone surrogate (a \\ud800-\\udfff escape not part of a pair): "
                           "not valid Unicode text", param=where)
        return body

    def _check_access(self, needs_key: bool) -> None:
        self.model_server.access.check_request(self.headers, needs_key)

    # --- routes -----------------------------------------------------------------------------------

    def do_OPTIONS(self) -> None:  # CORS preflight, answered for the origins given with --allow-origin
        try:
            self._read_body(self._content_length() if "Content-Length" in self.headers else 0, keep=False)
            self._check_access(needs_key=False)
            if self.model_server.access.cors_origin(self.headers) is None:
                raise APIError("cross-origin requests are not allowed from this origin (see --allow-origin)",
                               status=403, code="origin_not_allowed")
        except APIError as err:
            self._send_error(err)
            return
        # The origin is allowed: so are the headers its client asks for (the openai JS client sends its own).
        asked = self.headers.get("Access-Control-Request-Headers") or "Authorization, Content-Type"
        self._send(204, b"", "text/plain", {"Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                                            "Access-Control-Allow-Headers": asked,
                                            "Access-Control-Max-Age": "600"})

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        try:
            self._read_body(self._content_length() if "Content-Length" in self.headers else 0, keep=False)
            self._check_access(needs_key=path.startswith("/v1"))
            self._get(path)
        except APIError as err:
            self._send_error(err)

    def _get(self, path: str) -> None:
        name = self.model_server.model_name
        if path in ("/", "/index.html"):
            self._send(200, web_page(), "text/html; charset=utf-8")
        elif path == "/health":
            self._send_json(200, {"status": "ok"})
        elif path == "/v1/models":
            self._send_json(200, models_list(name, self.model_server.created))
        elif path.startswith("/v1/models/"):
            requested = path[len("/v1/models/"):]
            if requested != name:
                raise APIError(f"the model {requested!r} does not exist; this server serves {name!r}",
                               status=404, param="model", code="model_not_found")
            self._send_json(200, model_object(name, self.model_server.created))
        else:
            raise APIError(f"no route GET {path}", status=404)

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        routes = {"/v1/completions": False, "/v1/chat/completions": True}
        try:
            length = self._content_length()
            refusal = self._refusal(path in routes)
            body = self._read_body(length, keep=refusal is None)
            if refusal is not None:
                raise refusal
            request = self.model_server.parse(self._parse_json(body), chat=routes[path])
            job = self.model_server.submit(request)
        except APIError as err:
            self._send_error(err)
            return
        try:
            if request.stream:
                self._stream(request, job)
            else:
                self._answer(request, job)
        except (ClientGone, OSError):  # gone, or not reading: free the worker for the others
            job.cancel()
            self.close_connection = True

    def _refusal(self, known_route: bool) -> APIError | None:
        """Why a POST is refused before its body is parsed (access, then route), or None."""
        try:
            self._check_access(needs_key=True)
        except APIError as err:
            return err
        if not known_route:
            return APIError(f"no route POST {self.path.split('?', 1)[0]}", status=404)
        return None

    def _answer(self, request: GenerationRequest, job: Job) -> None:
        texts = [""] * len(request.prompt_ids)
        reasons = ["length"] * len(request.prompt_ids)
        counts = [0] * len(request.prompt_ids)
        try:
            for deltas in job.results(self._client_gone):
                for delta in deltas:
                    texts[delta.index] += delta.text
                    counts[delta.index] = delta.completion_tokens
                    reasons[delta.index] = delta.finish_reason or reasons[delta.index]
        except ClientGone:
            raise
        except Exception as err:  # noqa: BLE001  (reported to the client in the OpenAI shape)
            self._send_json(500, error_body(f"generation failed: {err}", "server_error"))
            return
        self._send_json(200, response(request, self.model_server.model_name, texts, reasons, sum(counts)))

    def _stream(self, request: GenerationRequest, job: Job) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        for name, value in self._cors_headers().items():
            self.send_header(name, value)
        self.send_header("Connection", "close")  # the end of the stream is the end of the connection
        self.end_headers()
        self.close_connection = True
        name = self.model_server.model_name
        if request.chat:
            for index in range(len(request.prompt_ids)):
                self._event(chunk(request, name, index, role=True))
        counts = [0] * len(request.prompt_ids)
        try:
            for deltas in job.results(self._client_gone):
                for delta in deltas:
                    counts[delta.index] = delta.completion_tokens
                    if request.chat and delta.text and delta.finish_reason:
                        self._event(chunk(request, name, delta.index, delta.text))
                        self._event(chunk(request, name, delta.index, finish_reason=delta.finish_reason))
                    else:
                        self._event(chunk(request, name, delta.index, delta.text, delta.finish_reason))
        except (ClientGone, OSError):
            raise
        except Exception as err:  # noqa: BLE001  (headers are sent: the error becomes an event)
            self._event(error_body(f"generation failed: {err}", "server_error"))
            return
        if request.include_usage:
            self._event(chunk(request, name, usage_counts=usage(request.prompt_tokens, sum(counts))))
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _event(self, payload: dict) -> None:
        text = json.dumps(payload, ensure_ascii=False)
        self.wfile.write(b"data: " + text.encode("utf-8", "backslashreplace") + b"\n\n")
        self.wfile.flush()


def _refuse_constant(name: str) -> None:
    raise APIError(f"the request body is not valid JSON: {name} is not a JSON number")


__all__ = ["ModelServer", "web_page"]
