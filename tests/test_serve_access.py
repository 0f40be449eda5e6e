"""Who may use the server: the API key (as the official `openai` client sends it), the browser-origin rule
and the Host check against DNS rebinding, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import http.client
import json

import pytest
from chat_model import shared_chat_model

from minigpt.cli.serve import build_parser, server_options
from minigpt.generate import GenerationConfig, TextGenerator
from minigpt.serve.access import AccessPolicy, host_name, is_loopback
from minigpt.serve.server import ModelServer

openai = pytest.importorskip("openai",
                             reason="the openai client is a dev dependency (pip install -e '.[dev]')")

MODEL = "tiny-chat"
KEY = "sk-local-0123456789abcdef"
HI = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "temperature": 0}


@pytest.fixture(scope="module")
def generator(tmp_path_factory) -> TextGenerator:
    return TextGenerator.from_dir(shared_chat_model(tmp_path_factory))


@pytest.fixture(scope="module")
def keyed_server(generator):
    access = AccessPolicy.for_address("127.0.0.1", api_key=KEY, allowed_origins=("http://app.example:3000",),
                                      allowed_hosts=("minigpt.lan",))
    server = ModelServer(generator, MODEL, GenerationConfig(max_new_tokens=40), port=0, quiet=True,
                         access=access).start()
    yield server
    server.close()


def call(server: ModelServer, method: str, path: str, headers: dict, body: dict | None = None):
    """(status, JSON body or None, headers) of one request, with exactly the headers given (and Host)."""
    connection = http.client.HTTPConnection(*server.httpd.server_address[:2], timeout=60)
    try:
        data = json.dumps(body).encode() if body is not None else None
        connection.request(method, path, body=data, headers=headers)
        reply = connection.getresponse()
        raw = reply.read()
        return reply.status, json.loads(raw) if raw.startswith(b"{") else None, dict(reply.getheaders())
    finally:
        connection.close()


def test_the_openai_client_with_the_key_is_served_and_without_it_gets_a_401(keyed_server):
    client = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    assert client.chat.completions.create(**HI).choices[0].message.content == "Hello there, how are you?"
    for wrong in ("unused", KEY + "x", KEY[:-1]):
        stranger = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key=wrong, max_retries=0, timeout=60)
        with pytest.raises(openai.AuthenticationError) as caught:
            stranger.models.list()
        assert caught.value.status_code == 401 and caught.value.body["code"] == "invalid_api_key"
    status, body, headers = call(keyed_server, "POST", "/v1/chat/completions", {}, HI)
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
    assert "--api-key" in body["error"]["message"]


def test_the_page_and_health_need_no_key(keyed_server):
    assert call(keyed_server, "GET", "/health", {})[0] == 200
    status, _, headers = call(keyed_server, "GET", "/", {})
    assert status == 200 and headers["Content-Type"].startswith("text/html")


def test_web_pages_on_other_origins_are_refused_unless_allowed(keyed_server):
    port = keyed_server.httpd.server_address[1]
    auth = {"Authorization": f"Bearer {KEY}"}
    status, body, headers = call(keyed_server, "POST", "/v1/chat/completions",
                                 {**auth, "Origin": "http://evil.example"}, HI)
    assert status == 403 and body["error"]["code"] == "origin_not_allowed"
    assert "Access-Control-Allow-Origin" not in headers
    assert call(keyed_server, "OPTIONS", "/v1/chat/completions", {"Origin": "http://evil.example"})[0] == 403
    # the server's own page (same host and port) and the allowed origin
    status, _, headers = call(keyed_server, "POST", "/v1/chat/completions",
                              {**auth, "Origin": f"http://127.0.0.1:{port}"}, HI)
    assert status == 200 and "Access-Control-Allow-Origin" not in headers
    status, _, headers = call(keyed_server, "OPTIONS", "/v1/chat/completions",
                              {"Origin": "http://app.example:3000", "Access-Control-Request-Method": "POST",
                               "Access-Control-Request-Headers": "authorization, x-stainless-os"})
    assert status == 204 and headers["Access-Control-Allow-Origin"] == "http://app.example:3000"
    assert headers["Access-Control-Allow-Headers"] == "authorization, x-stainless-os"
    status, _, headers = call(keyed_server, "POST", "/v1/chat/completions",
                              {**auth, "Origin": "http://app.example:3000"}, HI)
    assert status == 200 and headers["Access-Control-Allow-Origin"] == "http://app.example:3000"


@pytest.mark.parametrize("host, allowed", [
    ("127.0.0.1:{port}", True), ("localhost:{port}", True), ("[::1]:{port}", True), ("127.3.4.5", True),
    ("minigpt.lan:{port}", True), ("evil.example:{port}", False), ("192.168.1.20:{port}", False),
    ("localhost.evil.example", False),
])
def test_only_loopback_and_allowed_host_names_are_answered_on_loopback(keyed_server, host, allowed):
    headers = {"Host": host.format(port=keyed_server.httpd.server_address[1]), "Authorization": "Bearer x"}
    status, body, _ = call(keyed_server, "GET", "/v1/models", headers)
    if allowed:
        assert status == 401  # past the Host check, stopped by the key
    else:
        assert status == 403 and body["error"]["code"] == "host_not_allowed"


def test_host_names_and_loopback_addresses():
    assert [host_name(h) for h in ("[::1]:80", "Example.ORG:8000", "::1", "a.b")] == ["::1", "example.org",
                                                                                       "::1", "a.b"]
    loopback = ("127.0.0.1", "127.8.0.1", "::1", "[::1]", "localhost", "app.localhost")
    assert all(is_loopback(h) for h in loopback)
    elsewhere = ("0.0.0.0", "10.0.0.1", "::", "example.org", "localhost.example.org")
    assert not any(is_loopback(h) for h in elsewhere)
    assert AccessPolicy.for_address("0.0.0.0").check_host is False  # any Host: protect it with --api-key
    assert AccessPolicy.for_address("0.0.0.0", allowed_hosts=("box",)).check_host is True


def test_the_key_comes_from_the_environment_when_the_flag_is_not_given(monkeypatch):
    args = build_parser().parse_args(["--model", "m", "--allow-origin", "http://a.example", "--allow-origin",
                                      "http://b.example/", "--max-queue", "5"])
    monkeypatch.delenv("MINIGPT_API_KEY", raising=False)
    assert server_options(args)["access"].api_key is None
    monkeypatch.setenv("MINIGPT_API_KEY", "from-env")
    options = server_options(args)
    assert options["access"].api_key == "from-env" and options["max_queue"] == 5
    assert options["access"].allowed_origins == ("http://a.example", "http://b.example")
    flag = build_parser().parse_args(["--model", "m", "--api-key", "from-flag"])
    assert server_options(flag)["access"].api_key == "from-flag"
