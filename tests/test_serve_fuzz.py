"""Property: whatever JSON body and headers a client sends to any route, the server answers with a status
below 500 and a well-formed body; it never drops the connection. Bodies mix the API's own fields (with
plausible and absurd values: huge integers, lone surrogates, NaN-free extreme floats, wrong types) with
random JSON, so both the checks and the generation path are exercised."""

from __future__ import annotations

import http.client
import json

import pytest
from chat_model import shared_chat_model
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from minigpt.generate import GenerationConfig, TextGenerator
from minigpt.serve.access import AccessPolicy
from minigpt.serve.openai_api import RequestLimits
from minigpt.serve.server import ModelServer

MODEL = "tiny-chat"
KEY = "fuzz-key"
POSTS = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions")]
ROUTES = POSTS * 4 + [("GET", "/v1/models"),
          ("GET", "/v1/models/" + MODEL), ("GET", "/v1/models/other"), ("GET", "/health"), ("GET", "/"),
          ("OPTIONS", "/v1/chat/completions"), ("POST", "/v1/embeddings"), ("HEAD", "/health")]

NASTY_TEXT = st.sampled_from(["", "Hi", "你好", "\ud800", "a\udfffb", "\x00", "\u202e", "speak " * 40, "\n\r"])
NUMBERS = st.one_of(st.integers(), st.integers(min_value=-(2**300), max_value=2**300),
                    st.floats(allow_nan=False, allow_infinity=False),
                    st.sampled_from([0, 1, -1, 1e-300, 1e300]))
JSON = st.recursive(st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=20), NASTY_TEXT),
                    lambda inner: st.one_of(st.lists(inner, max_size=4),
                                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                    max_leaves=12)
ROLES = st.sampled_from(["user", "system", "assistant", "developer", "tool"])
MESSAGE = st.fixed_dictionaries({"role": st.one_of(ROLES, JSON),
                                 "content": st.one_of(NASTY_TEXT, JSON,
                                                      st.lists(st.fixed_dictionaries({"type": st.just("text"),
                                                                                      "text": NASTY_TEXT})))})
FIELDS = {
    "model": st.one_of(st.just(MODEL), JSON),
    "messages": st.one_of(st.lists(MESSAGE, min_size=1, max_size=3), JSON),
    "prompt": st.one_of(NASTY_TEXT, st.lists(NASTY_TEXT, max_size=6), st.lists(NUMBERS, max_size=5),
                        st.lists(st.lists(st.integers(0, 300), min_size=1, max_size=5), max_size=3), JSON),
    "n": st.one_of(st.integers(-2, 20), JSON), "max_tokens": st.one_of(st.integers(-2, 40), NUMBERS, JSON),
    "temperature": st.one_of(st.floats(0, 2.5), NUMBERS, JSON), "top_p": st.one_of(st.floats(0, 1.2), JSON),
    "top_k": st.one_of(st.integers(-1, 400), NUMBERS), "seed": st.one_of(NUMBERS, JSON),
    "repetition_penalty": st.one_of(st.floats(0, 3), NUMBERS, JSON),
    "stop": st.one_of(NASTY_TEXT, st.lists(NASTY_TEXT, max_size=6), JSON),
    "stream": st.one_of(st.booleans(), JSON),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), JSON),
    "presence_penalty": st.one_of(st.just(0), NUMBERS), "logprobs": JSON, "user": JSON,
}
VALID = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "prompt": "First Citizen:"}
# Mostly a valid request with some fields changed, so that many reach the model; sometimes anything.
FEW_FIELDS = st.lists(st.sampled_from(sorted(FIELDS)), max_size=2, unique=True).flatmap(
    lambda names: st.fixed_dictionaries({name: FIELDS[name] for name in names}))
BODY = st.one_of(FEW_FIELDS.map(lambda body: {**VALID, **body}),
                 st.fixed_dictionaries({}, optional=FIELDS).map(lambda body: {**VALID, **body}),
                 st.fixed_dictionaries({}, optional=FIELDS), JSON)
HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
                      max_size=30)
HEADERS = st.fixed_dictionaries({}, optional={
    "Host": st.one_of(st.sampled_from(["localhost", "127.0.0.1:1", "[::1]", "evil.example", ""]),
                      HEADER_TEXT),
    "Origin": st.one_of(st.sampled_from(["http://evil.example", "null", "http://app.example"]), HEADER_TEXT),
    "Authorization": st.one_of(st.sampled_from([f"Bearer {KEY}", "Bearer", "Basic x", "bearer  " + KEY]),
                               HEADER_TEXT),
    "Content-Type": st.one_of(st.just("text/plain"), HEADER_TEXT),
    "X-Anything": HEADER_TEXT,
})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    generator = TextGenerator.from_dir(shared_chat_model(tmp_path_factory))
    access = AccessPolicy.for_address("127.0.0.1", api_key=KEY, allowed_origins=("http://app.example",))
    server = ModelServer(generator, MODEL, GenerationConfig(max_new_tokens=8), port=0, quiet=True,
                         access=access, request_limits=RequestLimits(max_rows=4, max_tokens=48)).start()
    yield server
    server.close()


def exchange(server: ModelServer, method: str, path: str, body: bytes,
             headers: dict) -> tuple[int, bytes, dict]:
    connection = http.client.HTTPConnection(*server.httpd.server_address[:2], timeout=60)
    try:
        skip_host = "Host" in headers
        connection.putrequest(method, path, skip_host=skip_host, skip_accept_encoding=True)
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            connection.putheader(name, value.encode("latin-1"))
        connection.endheaders(body)
        reply = connection.getresponse()
        return reply.status, reply.read(), dict(reply.getheaders())
    finally:
        connection.close()


@settings(max_examples=120, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(route=st.sampled_from(ROUTES), body=BODY, headers=st.one_of(st.just({}), st.just({}), HEADERS),
       keyed=st.sampled_from([True, True, True, False]))
def test_no_body_or_header_gets_a_5xx_or_a_dropped_connection(server, route, body, headers, keyed):
    method, path = route
    if keyed:
        headers = {"Authorization": f"Bearer {KEY}", **headers}
    status, raw, reply_headers = exchange(server, method, path, json.dumps(body).encode(), headers)
    assert server.httpd.unexpected_errors == 0
    event(f"{method} {path}: {status}")  # shown by --hypothesis-show-statistics
    assert status < 500, raw[:300]
    if method == "HEAD" or status == 204:
        return
    if reply_headers.get("Content-Type", "").startswith("text/event-stream"):
        assert raw.endswith(b"data: [DONE]\n\n") and b'"error"' not in raw
    elif reply_headers.get("Content-Type", "").startswith("application/json"):
        reply = json.loads(raw)
        assert (status >= 400) == ("error" in reply)
        if status >= 400:
            assert reply["error"]["message"] and reply["error"]["type"]
    else:
        assert status == 200 and path == "/" and raw.startswith(b"<!doctype html>")
