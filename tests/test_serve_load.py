"""`launch/serve.py` under load and abuse at once, over loopback: 64 clients send well-formed requests
(chat and completions, streamed or not, greedy, seeded, n=2) while one abusive request of each kind from
issue 24 arrives beside them. Every well-formed request is answered (a 429 is retried after its
Retry-After, as the official clients do), every abusive one gets its 4xx/429 or is closed on a timeout,
and the server's peak memory and thread count stay bounded."""

from __future__ import annotations

import http.client
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from chat_model import shared_chat_model
from ports import free_port
from test_web_chat import wait_until_serving

REPO = Path(__file__).resolve().parents[1]
MODEL = "tiny-chat"
KEY = "load-test-key"
CLIENTS = 64
MAX_CONNECTIONS = 128
PEAK_RSS_BOUND_MB = 1024
"""The server's peak resident memory (VmHWM) must stay under this (340 MB measured: torch and the model); the
unbounded server of issue 24 grew to 21.8 GB on one 500 KB request."""

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model_dir = shared_chat_model(tmp_path_factory)
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "OMP_NUM_THREADS": "1",
           "MINIGPT_API_KEY": KEY}
    process = subprocess.Popen(
        [sys.executable, "launch/serve.py", "--model", str(model_dir), "--port", str(port),
         "--model-name", MODEL, "--max-new-tokens", "24", "--quiet", "--max-rows-per-request", "16",
         "--max-tokens-per-request", "512",
         "--max-queue", "48", "--max-connections", str(MAX_CONNECTIONS), "--idle-timeout", "3",
         "--request-timeout", "2"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until_serving(f"http://127.0.0.1:{port}", process)
        yield port, process
    finally:
        process.terminate()
        process.wait(timeout=30)


def send(port: int, method: str, path: str, body: bytes = b"", headers: dict | None = None,
         timeout: float = 120) -> tuple[int, bytes, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body or None,
                           headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json",
                                    **(headers or {})})
        reply = connection.getresponse()
        return reply.status, reply.read(), dict(reply.getheaders())
    finally:
        connection.close()


def raw(port: int, data: bytes, timeout: float = 60) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def well_formed(index: int) -> tuple[str, dict]:
    """A mix of what real clients send: chat or completion, streamed or not, greedy or seeded, n 1 or 2."""
    rng = random.Random(index)
    chat = index % 2 == 0
    body: dict = {"model": MODEL, "max_tokens": rng.choice([8, 16, 24]), "stream": index % 3 == 0}
    if chat:
        body["messages"] = [{"role": "user", "content": rng.choice(["Hi", "你好", "All"])}]
    else:
        body["prompt"] = rng.choice(["First Citizen:", "The", "你好"])
    if index % 4 == 1:
        body.update(temperature=1.0, seed=index)
    else:
        body["temperature"] = 0
    if index % 5 == 0:
        body["n"] = 2
    return ("/v1/chat/completions" if chat else "/v1/completions"), body


def answer_well_formed(port: int, index: int, results: dict) -> None:
    """Send one request until answered; a 429 waits its Retry-After and tries again (up to 30 times)."""
    path, body = well_formed(index)
    retries = 0
    for _ in range(30):
        status, data, headers = send(port, "POST", path, json.dumps(body).encode())
        if status != 429:
            break
        retries += 1
        time.sleep(float(headers["Retry-After"]))
    if body["stream"]:
        complete = data.endswith(b"data: [DONE]\n\n")
    else:
        complete = len(json.loads(data)["choices"]) == body.get("n", 1)
    results[index] = (status, complete, retries)


def abusive_requests(port: int) -> dict:
    """name -> (function returning the status seen, the statuses that count as handled)."""
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}

    def post(body: dict | bytes, **headers) -> int:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return send(port, "POST", "/v1/chat/completions" if b"messages" in data else "/v1/completions", data,
                    headers)[0]

    def slowloris() -> int:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\n")
            sock.settimeout(0.3)
            answer = b""
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                try:
                    chunk = sock.recv(1000)
                except TimeoutError:
                    sock.sendall(b"X-Slow: 1\r\n")
                    continue
                if not chunk:
                    break
                answer += chunk
        return status_of(answer)

    def abandon(stream: bool) -> int:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            body = json.dumps({"model": MODEL, "prompt": "The", "max_tokens": 90, "temperature": 2.0,
                               "seed": 0, "n": 4, "stream": stream}).encode()
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Content-Type: application/json\r\n"
                         + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                         + body)
            time.sleep(0.5)
        return 0

    def flood() -> list[int]:
        """30 valid requests at once, not retrying: with the queue nearly full of others, some get 429."""
        statuses: list[int] = []
        body = {"model": MODEL, "prompt": "The", "max_tokens": 24, "temperature": 1.0, "seed": 7}
        threads = [threading.Thread(target=lambda: statuses.append(post(body))) for _ in range(30)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return statuses

    return {
        "too many rows": (lambda: post({"model": MODEL, "prompt": ["a"] * 64, "n": 16}), {400}),
        "too many tokens": (lambda: post({**chat, "n": 16, "max_tokens": 2000}), {400}),
        "500 KB of prompts": (lambda: post({"model": MODEL, "prompt": ["ab"] * 100_000}), {400}),
        "lone surrogate": (lambda: post({**chat, "messages": [{"role": "user", "content": "\ud800"}]}),
                           {400}),
        "superscript length": (lambda: status_of(raw(port, b"POST /v1/completions HTTP/1.1\r\n"
                                                       b"Host: 127.0.0.1\r\n"
                                                       + "Content-Length: ²\r\n\r\n{}".encode())), {400}),
        "1 MB nested JSON": (lambda: post(b"[" * 500_000 + b"]" * 500_000), {400}),
        "huge seed": (lambda: post({**chat, "seed": 2**200}), {400}),
        "tiny penalty": (lambda: post({**chat, "repetition_penalty": 1e-300}), {400}),
        "no key": (lambda: post(chat, Authorization="Bearer wrong"), {401}),
        "other origin": (lambda: post(chat, Origin="http://evil.example"), {403}),
        "rebound host": (lambda: post(chat, Host=f"evil.example:{port}"), {403}),
        "slowloris": (slowloris, {408}),
        "abandoned": (lambda: abandon(False), {0}),
        "abandoned stream": (lambda: abandon(True), {0}),
        "flood": (flood, None),
    }


def sample_process(pid: int, stop: threading.Event, peaks: dict) -> None:
    while not stop.is_set():
        status = Path(f"/proc/{pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        peaks["threads"] = max(peaks.get("threads", 0), int(fields["Threads"]))
        peaks["rss_mb"] = int(fields["VmHWM"].split()[0]) // 1024
        time.sleep(0.05)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's memory from /proc")
def test_64_clients_are_all_answered_beside_every_kind_of_abuse(served):
    port, process = served
    peaks: dict = {}
    stop = threading.Event()
    sampler = threading.Thread(target=sample_process, args=(process.pid, stop, peaks), daemon=True)
    sampler.start()
    idle = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(20)]
    abuse = abusive_requests(port)
    abuse_seen: dict = {}
    results: dict = {}
    threads = [threading.Thread(target=answer_well_formed, args=(port, i, results)) for i in range(CLIENTS)]
    threads += [threading.Thread(target=lambda name=name, run=run: abuse_seen.__setitem__(name, run()))
                for name, (run, _) in abuse.items()]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    elapsed = time.monotonic() - started
    stop.set()
    sampler.join()
    idle_closed = sum(sock.recv(100) == b"" for sock in idle)  # the idle timeout closed them
    print(f"\n{CLIENTS} clients in {elapsed:.1f} s; peak RSS {peaks['rss_mb']} MB, peak threads "
          f"{peaks['threads']}; 429s retried {sum(r[2] for r in results.values())}; flood statuses "
          f"{sorted(set(abuse_seen['flood']))}; abuse {abuse_seen}")

    assert sorted(results) == list(range(CLIENTS))
    assert all(status == 200 and complete for status, complete, _ in results.values()), results
    for name, (_, expected) in abuse.items():
        if expected is not None:
            assert abuse_seen[name] in expected, (name, abuse_seen[name])
    assert set(abuse_seen["flood"]) <= {200, 429} and len(abuse_seen["flood"]) == 30
    assert idle_closed == len(idle)
    assert peaks["rss_mb"] < PEAK_RSS_BOUND_MB
    assert peaks["threads"] <= MAX_CONNECTIONS + 16  # handlers, worker, refuser and torch's own
    assert send(port, "GET", "/health")[0] == 200 and process.poll() is None
