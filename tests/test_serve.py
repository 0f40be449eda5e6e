"""The OpenAI-compatible server, spoken to by the official `openai` client over real HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest
from chat_model import shared_chat_model

from minigpt.generate import GenerationConfig, TextGenerator
from minigpt.serve.server import ModelServer
from minigpt.serve.worker import GenerationWorker

openai = pytest.importorskip("openai", reason="the openai client is a dev dependency (pip install -e '.[dev]')")

MODEL = "tiny-chat"


@pytest.fixture(scope="module")
def generator(tmp_path_factory) -> TextGenerator:
    return TextGenerator.from_dir(shared_chat_model(tmp_path_factory))


@pytest.fixture(scope="module")
def server(generator):
    server = ModelServer(generator, MODEL, GenerationConfig(max_new_tokens=40), port=0, quiet=True).start()
    yield server
    server.close()


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_models_lists_the_served_model(client):
    assert [model.id for model in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).owned_by == "minigpt"


def test_completion_continues_the_prompt_and_counts_tokens(client, generator):
    result = client.completions.create(model=MODEL, prompt="First Citizen:", max_tokens=40, temperature=0)
    (choice,) = result.choices
    assert choice.text == " Before we proceed any further, hear me speak."
    assert choice.finish_reason == "stop"  # the document's EOS
    prompt_ids = generator.encode_prompt("First Citizen:")
    (sequence,) = generator.generate_sequences([prompt_ids], GenerationConfig(max_new_tokens=40, do_sample=False))
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (len(prompt_ids), len(sequence.token_ids))


def test_chat_answers_with_the_whole_conversation(client):
    first = client.chat.completions.create(model=MODEL, messages=chat("Hi"), temperature=0)
    assert first.choices[0].message.content == "Hello there, how are you?"
    follow_up = chat("Hi") + [{"role": "assistant", "content": "Hello there, how are you?"}] + chat("All")
    assert client.chat.completions.create(model=MODEL, messages=follow_up, temperature=0).choices[0] \
        .message.content == "Speak, speak."
    alone = client.chat.completions.create(model=MODEL, messages=chat("All"), temperature=0)
    assert alone.choices[0].message.content == "We are accounted poor citizens."


def test_streamed_chat_arrives_in_whole_characters_and_joins_to_the_answer(client):
    whole = client.chat.completions.create(model=MODEL, messages=chat("你好"), temperature=0)
    stream = client.chat.completions.create(model=MODEL, messages=chat("你好"), temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len(pieces) > 5 and all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == whole.choices[0].message.content == "你好，世界。天下大势，分久必合。"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_n_choices_seed_and_stop(client):
    def sample(seed: int, n: int = 3) -> list[str]:
        result = client.completions.create(model=MODEL, prompt="The", max_tokens=12, temperature=1.5, seed=seed,
                                           n=n)
        assert [c.index for c in result.choices] == list(range(n))
        return [c.text for c in result.choices]

    assert sample(seed=1) == sample(seed=1)
    assert sample(seed=1) != sample(seed=2)
    assert len(set(sample(seed=3))) > 1  # the choices are separate samples
    stopped = client.completions.create(model=MODEL, prompt="First Citizen:", max_tokens=30, temperature=0,
                                        stop=["proceed"])
    assert stopped.choices[0].text == " Before we " and stopped.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("request_fields, message", [
    ({"model": "gpt-4"}, "the model 'gpt-4' does not exist"),
    ({"messages": chat("speak " * 200)}, "the model's context is 96 tokens"),
    ({"temperature": 5}, "'temperature' must be 0 (greedy) or between 0.001 and 2"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role must be"),
    ({"n": 0}, "'n' must be between 1 and"),
])
def test_bad_requests_are_refused_with_a_message(client, request_fields, message):
    fields = {"model": MODEL, "messages": chat("Hi"), **request_fields}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**fields)
    assert caught.value.status_code == 400 and message in caught.value.message


def post(url: str, data: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.load(reply)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def test_malformed_json_and_unknown_routes_get_openai_shaped_errors(server):
    status, body = post(server.url + "/v1/chat/completions", b'{"model": "tiny-chat", "messages": [')
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"].startswith("the request body is not valid JSON")
    status, body = post(server.url + "/v1/completions", b'["a list"]')
    assert status == 400 and "JSON object" in body["error"]["message"]
    status, body = post(server.url + "/v1/completions", b'{"prompt": "Hi"}')
    assert status == 400 and body["error"]["param"] == "model" and "'model' is required" in body["error"]["message"]
    status, body = post(server.url + "/v1/embeddings", b"{}")
    assert status == 404 and "no route POST /v1/embeddings" in body["error"]["message"]


def test_two_concurrent_streamed_chats_are_not_mixed_up(client):
    requests = {"hi": dict(messages=chat("Hi"), seed=11), "zh": dict(messages=chat("你好"), seed=22),
                "all": dict(messages=chat("All"), seed=33)}
    streamed: dict[str, str] = {}

    def run(key: str) -> None:
        pieces = []
        for event in client.chat.completions.create(model=MODEL, temperature=1.0, stream=True, **requests[key]):
            if event.choices and event.choices[0].delta.content:
                pieces.append(event.choices[0].delta.content)
        streamed[key] = "".join(pieces)

    threads = [threading.Thread(target=run, args=(key,)) for key in requests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    alone = {key: client.chat.completions.create(model=MODEL, temperature=1.0, **fields).choices[0].message.content
             for key, fields in requests.items()}
    assert streamed == alone
    assert alone["hi"].startswith("Hello") and alone["zh"].startswith("你好") and alone["all"].startswith("We")


def test_waiting_requests_with_the_same_settings_are_decoded_as_one_batch(generator):
    worker = GenerationWorker(generator)
    try:
        busy = worker.submit([generator.encode_prompt("The")],
                             GenerationConfig(max_new_tokens=60, do_sample=False, stop_token_ids=()), chat=False)
        first = next(busy.results())  # the worker is decoding `busy` while the next requests arrive
        greedy = GenerationConfig(max_new_tokens=30, do_sample=False)
        jobs = [worker.submit([generator.encode_prompt(text, chat=True)], greedy, chat=True)
                for text in ("Hi", "你好", "All")]
        answers = ["".join(d.text for deltas in job.results() for d in deltas) for job in jobs]
        assert sum(len(deltas) for deltas in busy.results()) + len(first) > 1
    finally:
        worker.stop()
    assert worker.batches_run == 2  # `busy` alone, then the three waiting requests together
    assert answers == ["Hello there, how are you?", "你好，世界。天下大势，分久必合。", "We are accounted poor citizens."]



def test_a_cancelled_request_stops_decoding_and_the_worker_serves_the_next(generator):
    worker = GenerationWorker(generator)
    try:
        endless = GenerationConfig(max_new_tokens=90, do_sample=False, stop_token_ids=())
        job = worker.submit([generator.encode_prompt("The")], endless, chat=False)
        next(job.results())
        job.cancel()  # what the server does when the client's connection breaks
        list(job.results())  # the worker ends the job
        assert worker.steps_run < 30  # it stopped decoding long before its 90 tokens
        after = worker.submit([generator.encode_prompt("Hi", chat=True)], GenerationConfig(do_sample=False), True)
        assert "".join(d.text for deltas in after.results() for d in deltas) == "Hello there, how are you?"
    finally:
        worker.stop()

@pytest.mark.parametrize("module, doc", [("minigpt.cli.serve", "docs/serving.md"),
                                         ("minigpt.cli.chat", "docs/generation.md")])
def test_docs_name_every_flag_of_the_command(module, doc):
    import importlib
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / doc).read_text()
    flags = [o for a in importlib.import_module(module).build_parser()._actions for o in a.option_strings
             if o.startswith("--") and o != "--help"]
    assert [flag for flag in flags if f"`{flag}`" not in text] == []
