"""Connections of the HTTP server: how many are served at once and how long each may take.

A thread per connection, at most `max_connections`; the next one is answered 503 by a single refusing
thread, so a flood of connections cannot grow the threads. A request must arrive whole within a deadline
(`DeadlineReader`), so a client sending a byte at a time cannot hold a thread either.
"""

from __future__ import annotations

import io
import json
import queue
import socket
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from minigpt.serve.openai_api import error_body

RETRY_AFTER_SECONDS = 1
"""What a 429 or 503 asks the client to wait before retrying."""


@dataclass(frozen=True)
class ConnectionLimits:
    """How many connections the server holds and for how long (the serve command's flags)."""

    max_connections: int = 128
    """Connections served at once, each by its own thread; more are answered 503 and closed."""
    backlog: int = 128
    """Connections the operating system queues before the server accepts them."""
    idle_timeout: float = 30.0
    """A kept-alive connection with no new request for this many seconds is closed."""
    request_timeout: float = 10.0
    """A request's line, headers and body must all arrive within this many seconds of its first byte."""
    write_timeout: float = 60.0
    """A client that reads nothing of its answer for this long is dropped (and its decoding stopped)."""


class CappedHTTPServer(ThreadingHTTPServer):
    """A thread per connection, at most `max_connections` of them: a connection beyond the cap is answered
    503 by one refusing thread and closed, so a flood of connections cannot grow the threads."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler],
                 limits: ConnectionLimits):
        self.request_queue_size = limits.backlog
        self.limits = limits
        self._slots = threading.BoundedSemaphore(limits.max_connections)
        self._refusals: queue.Queue[socket.socket] = queue.Queue(maxsize=64)
        self._closed = threading.Event()
        self.unexpected_errors = 0
        """Handler threads that ended in an exception (printed by `handle_error`); 0 unless there is a bug."""
        super().__init__(address, handler)
        threading.Thread(target=self._refuse_loop, name="minigpt-refuser", daemon=True).start()

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            try:
                self._refusals.put_nowait(request)
            except queue.Full:
                self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address) -> None:
        self.unexpected_errors += 1
        super().handle_error(request, client_address)

    def server_close(self) -> None:
        self._closed.set()
        super().server_close()

    def _refuse_loop(self) -> None:
        refusal = _raw_error(503, f"the server holds its maximum of {self.limits.max_connections} "
                                  "connections (--max-connections); retry later", "server_busy")
        while not self._closed.is_set():
            try:
                sock = self._refusals.get(timeout=0.5)
            except queue.Empty:
                continue
            _answer_and_close(sock, refusal)


def _raw_error(status: int, message: str, code: str) -> bytes:
    """A whole HTTP error response, for the refusing thread that has no request handler."""
    body = json.dumps(error_body(message, "server_error", code=code)).encode()
    return (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: {RETRY_AFTER_SECONDS}\r\nConnection: close\r\n\r\n"
            ).encode() + body


def _answer_and_close(sock: socket.socket, answer: bytes, seconds: float = 1.0) -> None:
    """Read what the client sent (briefly), answer, and close once the client has seen the answer (closing
    with unread input would reset the connection and could lose the answer), all within `seconds`."""
    deadline = time.monotonic() + seconds
    try:
        sock.settimeout(0.1)
        try:
            sock.recv(65536)
        except TimeoutError:
            pass
        sock.sendall(answer)
        sock.shutdown(socket.SHUT_WR)
        while time.monotonic() < deadline and sock.recv(65536):
            pass
    except OSError:
        pass
    finally:
        sock.close()


class DeadlineReader(io.RawIOBase):
    """A socket's input with one deadline for a whole request rather than one timeout per read, so a client
    sending a byte at a time (slowloris) cannot hold its connection open."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.deadline: float | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise RequestTooSlow
            self.sock.settimeout(left)
        try:
            return self.sock.recv_into(buffer)
        except TimeoutError:
            raise RequestTooSlow from None


class RequestTooSlow(Exception):
    """The client did not send its request (or the next one) in time."""


__all__ = ["RETRY_AFTER_SECONDS", "CappedHTTPServer", "ConnectionLimits", "DeadlineReader", "RequestTooSlow"]
