"""An OpenAI-compatible HTTP server over a `TextGenerator`, on the standard library's ThreadingHTTPServer.

    server = ModelServer(TextGenerator.from_dir(DIR), model_name="minigpt", port=8000)
    server.serve_forever()          # or server.start() for a background thread (tests, benchmarks)

Routes: GET / (the web chat page), GET /v1/models[/ID], POST /v1/completions, POST /v1/chat/completions,
GET /health. Each connection has its own thread that parses and answers; the model is used only by the
`GenerationWorker` thread. Answers stream as server-sent events with `"stream": true`.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources

from minigpt.generate import GenerationConfig, TextGenerator
from minigpt.serve.openai_api import (
    APIError,
    GenerationRequest,
    chunk,
    error_body,
    model_object,
    models_list,
    parse_request,
    response,
    usage,
)
from minigpt.serve.worker import GenerationWorker, Job

MAX_BODY_BYTES = 8 * 1024 * 1024


def web_page() -> bytes:
    """The single-page web chat shipped in the package (static/index.html, no build step, no CDN)."""
    return resources.files("minigpt.serve").joinpath("static/index.html").read_bytes()


class ModelServer:
    """The HTTP server, the generation worker and what the handlers need to know about the model."""

    def __init__(self, generator: TextGenerator, model_name: str, defaults: GenerationConfig | None = None,
                 host: str = "127.0.0.1", port: int = 8000, quiet: bool = False):
        if generator.tokenizer is None:
            raise ValueError("serving needs a tokenizer; this TextGenerator was built without one")
        self.generator = generator
        self.model_name = model_name
        self.defaults = defaults or GenerationConfig(max_new_tokens=256)
        self.quiet = quiet
        self.created = int(time.time())
        self.worker = GenerationWorker(generator)
        self.httpd = ThreadingHTTPServer((host, port), _handler_class(self))
        self.httpd.daemon_threads = True
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
                             self.generator.model.config.max_seq_len, self.defaults)


def _handler_class(server: ModelServer) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        model_server = server

    return Handler


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "minigpt-serve"
    model_server: ModelServer

    # --- plumbing ---------------------------------------------------------------------------------

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        if not self.model_server.quiet:
            sys.stderr.write(f"{self.address_string()} - {format % args}\n")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Access-Control-Allow-Origin", "*")
        self.end_headers()
        self.wfile.write(body)

    def _send_json(self, status: int, payload: dict) -> None:
        self._send(status, json.dumps(payload, ensure_ascii=False).encode(), "application/json")

    def _send_error(self, err: APIError) -> None:
        self._send_json(err.status, err.body())

    def _read_json(self) -> object:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            raise APIError("the request needs a Content-Length header", status=411)
        if int(length) > MAX_BODY_BYTES:
            self.close_connection = True
            raise APIError(f"the request body is over {MAX_BODY_BYTES} bytes", status=413)
        raw = self.rfile.read(int(length))
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise APIError(f"the request body is not valid JSON: {err}") from None

    # --- routes -----------------------------------------------------------------------------------

    def do_OPTIONS(self) -> None:  # CORS preflight, so browser front-ends on other origins can call the API
        self.send_response(204)
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
        self.send_header("Access-Control-Allow-Headers", "Authorization, Content-Type")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        name = self.model_server.model_name
        if path in ("/", "/index.html"):
            self._send(200, web_page(), "text/html; charset=utf-8")
        elif path == "/health":
            self._send_json(200, {"status": "ok"})
        elif path == "/v1/models":
            self._send_json(200, models_list(name, self.model_server.created))
        elif path.startswith("/v1/models/"):
            requested = path[len("/v1/models/"):]
            if requested == name:
                self._send_json(200, model_object(name, self.model_server.created))
            else:
                self._send_error(APIError(f"the model {requested!r} does not exist; this server serves "
                                          f"{name!r}", status=404, param="model", code="model_not_found"))
        else:
            self._send_error(APIError(f"no route GET {path}", status=404))

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        routes = {"/v1/completions": False, "/v1/chat/completions": True}
        try:
            if path not in routes:
                self.close_connection = True  # the body is left unread
                raise APIError(f"no route POST {path}", status=404)
            request = self.model_server.parse(self._read_json(), chat=routes[path])
        except APIError as err:
            self._send_error(err)
            return
        job = self.model_server.worker.submit(request.prompt_ids, request.config, request.chat)
        try:
            if request.stream:
                self._stream(request, job)
            else:
                self._answer(request, job)
        except (BrokenPipeError, ConnectionResetError):
            job.cancel()  # the client went away; free the worker for the others
            self.close_connection = True

    def _answer(self, request: GenerationRequest, job: Job) -> None:
        texts = [""] * len(request.prompt_ids)
        reasons = ["length"] * len(request.prompt_ids)
        counts = [0] * len(request.prompt_ids)
        try:
            for deltas in job.results():
                for delta in deltas:
                    texts[delta.index] += delta.text
                    counts[delta.index] = delta.completion_tokens
                    reasons[delta.index] = delta.finish_reason or reasons[delta.index]
        except Exception as err:  # noqa: BLE001  (reported to the client in the OpenAI shape)
            self._send_json(500, error_body(f"generation failed: {err}", "server_error"))
            return
        self._send_json(200, response(request, self.model_server.model_name, texts, reasons, sum(counts)))

    def _stream(self, request: GenerationRequest, job: Job) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Connection", "close")  # the end of the stream is the end of the connection
        self.end_headers()
        self.close_connection = True
        name = self.model_server.model_name
        if request.chat:
            for index in range(len(request.prompt_ids)):
                self._event(chunk(request, name, index, role=True))
        counts = [0] * len(request.prompt_ids)
        try:
            for deltas in job.results():
                for delta in deltas:
                    counts[delta.index] = delta.completion_tokens
                    if request.chat and delta.text and delta.finish_reason:
                        self._event(chunk(request, name, delta.index, delta.text))
                        self._event(chunk(request, name, delta.index, finish_reason=delta.finish_reason))
                    else:
                        self._event(chunk(request, name, delta.index, delta.text, delta.finish_reason))
        except (BrokenPipeError, ConnectionResetError):
            raise
        except Exception as err:  # noqa: BLE001  (headers are sent: the error becomes an event)
            self._event(error_body(f"generation failed: {err}", "server_error"))
            return
        if request.include_usage:
            self._event(chunk(request, name, usage_counts=usage(request.prompt_tokens, sum(counts))))
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _event(self, payload: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n")
        self.wfile.flush()


__all__ = ["ModelServer", "web_page"]
