"""The server under abuse: requests too big to serve, malformed input, a full queue, clients that go away,
idle and slow connections. Each is answered with a 4xx/429 JSON error or closed on a timeout, and never
stalls the requests of others."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest
from chat_model import shared_chat_model

from minigpt.generate import GenerationConfig, TextGenerator
from minigpt.serve.connections import ConnectionLimits
from minigpt.serve.openai_api import RequestLimits
from minigpt.serve.server import ModelServer

MODEL = "tiny-chat"
# Seeded at a high temperature, the tiny model does not meet EOS in its 90 tokens (greedy, it stops at 8).
ENDLESS = {"model": MODEL, "prompt": "The", "max_tokens": 90, "temperature": 2.0, "top_k": 0, "seed": 0}


@pytest.fixture(scope="module")
def generator(tmp_path_factory) -> TextGenerator:
    return TextGenerator.from_dir(shared_chat_model(tmp_path_factory))


@pytest.fixture(scope="module")
def server(generator):
    limits = RequestLimits(max_rows=8, max_tokens=400)
    server = ModelServer(generator, MODEL, GenerationConfig(max_new_tokens=40), port=0, quiet=True,
                         request_limits=limits).start()
    yield server
    server.close()


def request(server: ModelServer, method: str, path: str, body: bytes | None = None,
            headers: dict | None = None, timeout: float = 60) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of one request on its own connection."""
    host, port = server.httpd.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request(method, path, body=body,
                           headers={"Content-Type": "application/json", **(headers or {})})
        reply = connection.getresponse()
        return reply.status, json.loads(reply.read() or b"{}"), dict(reply.getheaders())
    finally:
        connection.close()


def post(server: ModelServer, body: dict | bytes, path: str = "/v1/completions", **kwargs):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return request(server, "POST", path, data, **kwargs)


def raw_exchange(server: ModelServer, data: bytes, timeout: float = 30) -> bytes:
    """Send bytes as they are (no client library to tidy them up) and read until the server closes."""
    with socket.create_connection(server.httpd.server_address[:2], timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_a_request_for_too_many_sequences_is_refused_at_once_naming_the_cap(server):
    started = time.monotonic()
    status, body, _ = post(server, {"model": MODEL, "prompt": ["a"] * 100_000, "n": 16})
    assert time.monotonic() - started < 10  # refused before a single prompt is tokenized
    assert status == 400 and body["error"]["param"] == "n"
    assert "100000 prompts × n=16" in body["error"]["message"] and "at most 8" in body["error"]["message"]
    assert "--max-rows-per-request" in body["error"]["message"]


def test_a_request_for_too_many_new_tokens_is_refused_naming_max_tokens(server):
    status, body, _ = post(server, {"model": MODEL, "prompt": ["a", "b", "c", "d"], "n": 2, "max_tokens": 60})
    assert status == 400 and body["error"]["param"] == "max_tokens"
    assert "480 new tokens" in body["error"]["message"] and "at most 400" in body["error"]["message"]
    # max_tokens beyond the context counts only what the context leaves room for
    status, body, _ = post(server, {"model": MODEL, "prompt": "a", "max_tokens": 10**30, "temperature": 0})
    assert status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("body, param, message", [
    ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content", "lone surrogate"),
    ({"messages": [{"role": "user", "content": "Hi"}], "seed": 2**200}, "seed", "'seed' must be between"),
    ({"messages": [{"role": "user", "content": "Hi"}], "repetition_penalty": 1e-300}, "repetition_penalty",
     "'repetition_penalty' must be between"),
    ({"messages": [{"role": "user", "content": "Hi"}], "temperature": 1e-300}, "temperature",
     "'temperature' must be 0"),
])
def test_values_the_model_cannot_use_are_400s_naming_the_field(server, body, param, message):
    status, reply, _ = post(server, {"model": MODEL, **body}, path="/v1/chat/completions")
    assert status == 400 and reply["error"]["param"] == param and message in reply["error"]["message"]


@pytest.mark.parametrize("data, message", [
    (b'{"model": "tiny-chat", "temperature": NaN, "prompt": "a"}', "not valid JSON"),
    (b"[" * 500_000 + b"]" * 500_000, "nested too deeply"),
    (b'{"model": "tiny-chat", "seed": ' + b"9" * 5000 + b', "prompt": "a"}', "not valid JSON"),
])
def test_malformed_json_is_a_400_not_a_dropped_connection(server, data, message):
    status, body, _ = post(server, data)
    assert status == 400 and message in body["error"]["message"]


@pytest.mark.parametrize("length", ["²", "-1", "1e3", "0x10", "12, 13"])
def test_a_content_length_that_is_not_a_decimal_number_is_a_400(server, length):
    answer = raw_exchange(server, b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                          + f"Content-Length: {length}\r\n\r\n{{}}".encode())
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and "Content-Length" in json.loads(body)["error"]["message"]


def test_errors_from_the_http_layer_are_json_too(server):
    answer = raw_exchange(server, b"BREW /pot HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 501") and json.loads(body)["error"]["message"]
    answer = raw_exchange(server, b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 200 + b"\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431") and json.loads(body)["error"]["type"] == "invalid_request_error"


def test_a_full_queue_answers_429_with_retry_after(generator):
    server = ModelServer(generator, MODEL, GenerationConfig(max_new_tokens=40), port=0, quiet=True,
                         max_queue=1).start()
    try:
        busy = threading.Thread(target=post, args=(server, ENDLESS))
        busy.start()
        while server.worker.steps_run == 0:  # the worker is decoding `busy`
            time.sleep(0.01)
        waiting = threading.Thread(target=post, args=(server, ENDLESS))
        waiting.start()
        while server.worker.queued == 0:
            time.sleep(0.01)
        status, body, headers = post(server, ENDLESS)
        assert status == 429 and int(headers["Retry-After"]) >= 1
        assert body["error"]["type"] == "rate_limit_error" and "--max-queue" in body["error"]["message"]
        assert "1 requests are already waiting for the model" in body["error"]["message"]
        busy.join()
        waiting.join()
    finally:
        server.close()


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_goes_away_stops_its_decoding_and_does_not_delay_the_next(server, stream):
    abandoned = {**ENDLESS, "n": 4, "stream": stream}
    steps_before = server.worker.steps_run
    post(server, {**abandoned, "stream": False})
    whole_steps = server.worker.steps_run - steps_before
    assert whole_steps >= 80  # what the request costs when its client stays
    steps_before = server.worker.steps_run
    with socket.create_connection(server.httpd.server_address[:2]) as sock:
        body = json.dumps(abandoned).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        while server.worker.steps_run < steps_before + 2:
            time.sleep(0.005)
    status, reply, _ = post(server, {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                                     "temperature": 0}, path="/v1/chat/completions")
    assert status == 200 and reply["choices"][0]["message"]["content"] == "Hello there, how are you?"
    abandoned_steps = server.worker.steps_run - steps_before - reply["usage"]["completion_tokens"]
    assert abandoned_steps < whole_steps / 2  # the worker dropped it soon after its client left


def test_idle_and_slow_connections_are_closed_and_over_the_cap_refused(generator):
    connections = ConnectionLimits(max_connections=3, idle_timeout=1.0, request_timeout=1.0)
    server = ModelServer(generator, MODEL, port=0, quiet=True, connection_limits=connections).start()
    address = server.httpd.server_address[:2]
    try:
        threads_before = threading.active_count()
        idle = [socket.create_connection(address, timeout=10) for _ in range(3)]
        time.sleep(0.3)
        refused = raw_exchange(server, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head, _, body = refused.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503") and b"Retry-After:" in head
        assert "--max-connections" in json.loads(body)["error"]["message"]
        assert threading.active_count() <= threads_before + 3 + 1  # the 3 handlers and the refuser
        kept_alive = idle[0]
        kept_alive.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = b""
        while not answer.endswith(b'{"status": "ok"}'):
            answer += kept_alive.recv(1000)
        assert answer.startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        for sock in idle:  # closed by the server, without a word, once idle for idle_timeout
            assert sock.recv(100) == b""
        assert time.monotonic() - started < 5
        slow = socket.create_connection(address, timeout=10)
        slow.sendall(b"GET /health HTTP/1.1\r\n")
        started = time.monotonic()
        answer = slowloris(slow, deadline=started + 5)
        assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 4
        status, body, _ = request(server, "GET", "/health")
        assert status == 200 and server.httpd.unexpected_errors == 0
    finally:
        server.close()


def slowloris(sock: socket.socket, deadline: float) -> bytes:
    """Send one header line every 0.2 s, never the end of the headers; what the server answers."""
    sock.settimeout(0.2)
    answer = b""
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(1000)
        except TimeoutError:
            sock.sendall(b"X: y\r\n")
            continue
        if not chunk:
            break
        answer += chunk
    return answer


def test_a_client_asking_to_close_after_its_post_is_closed(server):
    body = json.dumps({"model": MODEL, "prompt": "The", "max_tokens": 2, "temperature": 0}).encode()
    answer = raw_exchange(server, b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                          + f"Content-Length: {len(body)}\r\n\r\n".encode() + body, timeout=5)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"}")
