"""Who may use the server: the Host check against DNS rebinding, the browser-origin rule and the API key.

A web page in the user's browser can send requests to any address, localhost included. Three checks keep
such pages out: a page on another origin is refused unless named by --allow-origin (and only those get
CORS headers, so only they can read answers); a Host header that is not a loopback name is refused while
the server listens on loopback (a DNS-rebinding page reaches 127.0.0.1 under its own name); and with
--api-key every API request must carry `Authorization: Bearer KEY`, which a page cannot know.
"""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass
from email.message import Message
from urllib.parse import urlsplit

from minigpt.serve.openai_api import APIError

LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    """Whether a bind address or Host name is this machine only (127.0.0.0/8, ::1, localhost)."""
    name = host.strip("[]").lower()
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_name(host_header: str) -> str:
    """The name in a Host header, without its port: `[::1]:8000` → `::1`, `Example.org:80` → `example.org`."""
    value = host_header.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


@dataclass(frozen=True)
class AccessPolicy:
    """The serve command's --api-key, --allow-origin and --allow-host, and the address it listens on."""

    api_key: str | None = None
    allowed_origins: tuple[str, ...] = ()
    """Origins (scheme://host[:port]) of web pages on other sites that may call the API; "*" for any."""
    allowed_hosts: tuple[str, ...] = ()
    """Host names accepted besides the loopback ones."""
    check_host: bool = True
    """Refuse Host names that are not loopback or allowed (on by default when listening on loopback)."""

    @classmethod
    def for_address(cls, bind_host: str, api_key: str | None = None, allowed_origins: tuple[str, ...] = (),
                    allowed_hosts: tuple[str, ...] = ()) -> AccessPolicy:
        """The policy for a server listening on `bind_host`: the Host check is on when that address is
        loopback or when names were allowed explicitly."""
        return cls(api_key or None, tuple(o.rstrip("/") for o in allowed_origins),
                   tuple(h.lower() for h in allowed_hosts), is_loopback(bind_host) or bool(allowed_hosts))

    def check_request(self, headers: Message, needs_key: bool) -> None:
        """Raise APIError (403 for the host or origin, 401 for the key) if the request may not be served."""
        self.check_host_header(headers.get("Host"))
        self.check_origin(headers)
        if needs_key:
            self.check_key(headers.get("Authorization"))

    def check_host_header(self, host: str | None) -> None:
        if not self.check_host or host is None:  # only browsers matter here, and they always send Host
            return
        name = host_name(host)
        if not (is_loopback(name) or name in self.allowed_hosts or "*" in self.allowed_hosts):
            raise APIError(f"the Host {host!r} is not allowed: this server answers only its loopback names "
                           "(start it with --allow-host NAME to add one)", status=403,
                           code="host_not_allowed")

    def check_origin(self, headers: Message) -> None:
        """A request from a web page carries its Origin: allowed for the server's own page (the origin's
        host:port is the Host the request was sent to) and for --allow-origin's."""
        origin = headers.get("Origin")
        if origin is None or self.cors_origin(headers) is not None:
            return
        if urlsplit(origin).netloc.lower() != (headers.get("Host") or "").lower():
            raise APIError(f"requests from web pages on {origin!r} are not allowed (start the server with "
                           f"--allow-origin {origin} to allow them)", status=403, code="origin_not_allowed")

    def cors_origin(self, headers: Message) -> str | None:
        """The value of Access-Control-Allow-Origin for this request, or None (no CORS headers)."""
        origin = headers.get("Origin")
        if origin is None:
            return None
        if "*" in self.allowed_origins:
            return "*"
        return origin if origin.rstrip("/") in self.allowed_origins else None

    def check_key(self, authorization: str | None) -> None:
        """Constant-time comparison of `Authorization: Bearer KEY` with the server's key."""
        if self.api_key is None:
            return
        scheme, _, sent = (authorization or "").partition(" ")
        expected = self.api_key.encode("utf-8")
        # Header values arrive decoded as latin-1; encoding back gives the bytes the client sent.
        if scheme.lower() != "bearer" or not hmac.compare_digest(sent.strip().encode("latin-1"), expected):
            raise APIError("Incorrect or missing API key: send it as 'Authorization: Bearer KEY' (the key "
                           "the server was started with, --api-key or MINIGPT_API_KEY)", status=401,
                           code="invalid_api_key")


__all__ = ["AccessPolicy", "host_name", "is_loopback"]
