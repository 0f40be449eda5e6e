"""Load check of the OpenAI-compatible server: N concurrent streamed chats, tokens/s and p50/p95 latency,
and proof that no request was lost or mixed up.

    python bench/serve_load.py --model checkpoints/sft_tiny/final --clients 8 --requests 32
    python bench/serve_load.py --url http://127.0.0.1:8000 --model-name sft_tiny   # a running server

Every request is a different chat prompt. `--sampling seeded` gives each request its own seed (the
server decodes a seeded request alone); `--sampling greedy` sends identical settings, so requests that
wait together are decoded as one batch. Afterwards each request is sent again alone and not streamed:
its streamed answer under load must be exactly that answer (nothing lost, nothing from another request).
Latency is from sending the request to the last event; time to first token is reported beside it.
Standard library only (urllib), so it measures the server, not a client library.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minigpt.fsutil import atomic_write_text  # noqa: E402

PROMPTS = ["Hello, who are you?", "Tell me about the king.", "What is the weather like?", "Write a short poem.",
           "你好，请介绍一下你自己。", "Why is the sky blue?", "Name three fruits.", "学而时习之是什么意思？",
           "How do I bake bread?", "What did the citizen say?", "Count from one to five.", "Say something kind."]


def request_body(index: int, model: str, sampling: str, max_tokens: int, stream: bool) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": f"{PROMPTS[index % len(PROMPTS)]} (#{index})"}],
            "max_tokens": max_tokens, "stream": stream}
    if sampling == "seeded":
        body.update(temperature=0.8, top_p=0.95, seed=1000 + index)
    else:
        body.update(temperature=0)
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def post(url: str, body: dict, timeout: float) -> urllib.request.addinfourl:
    """POST a chat request, with the server's key when MINIGPT_API_KEY holds one (a server run with it)."""
    headers = {"Content-Type": "application/json"}
    if os.environ.get("MINIGPT_API_KEY"):
        headers["Authorization"] = "Bearer " + os.environ["MINIGPT_API_KEY"]
    request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers=headers)
    return urllib.request.urlopen(request, timeout=timeout)


def streamed_chat(url: str, body: dict, timeout: float) -> dict:
    """Send one streamed chat; the answer text, token count, finish reason and timings."""
    start = time.perf_counter()
    first = None
    pieces: list[str] = []
    finish, tokens, done = None, 0, False
    with post(url, body, timeout) as reply:
        for raw in reply:
            line = raw.decode("utf-8").strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            for choice in event["choices"]:
                if choice["delta"].get("content"):
                    first = first or time.perf_counter()
                    pieces.append(choice["delta"]["content"])
                finish = choice["finish_reason"] or finish
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    end = time.perf_counter()
    return {"text": "".join(pieces), "tokens": tokens, "finish_reason": finish, "done": done,
            "latency_s": end - start, "ttft_s": (first or end) - start}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_load(url: str, model: str, clients: int, requests: int, sampling: str, max_tokens: int,
             timeout: float) -> dict:
    results: dict[int, dict] = {}
    errors: dict[int, str] = {}
    next_index = iter(range(requests))
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                index = next(next_index, None)
            if index is None:
                return
            try:
                results[index] = streamed_chat(url, request_body(index, model, sampling, max_tokens, True), timeout)
            except Exception as err:  # noqa: BLE001  (counted as a lost request)
                errors[index] = repr(err)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start

    mixed = []
    for index, result in sorted(results.items()):
        with post(url, request_body(index, model, sampling, max_tokens, False), timeout) as reply:
            alone = json.load(reply)["choices"][0]["message"]["content"]
        if alone != result["text"]:
            mixed.append({"request": index, "under_load": result["text"], "alone": alone})
    lost = sorted(set(range(requests)) - {i for i, r in results.items() if r["done"] and r["finish_reason"]})
    latencies = [r["latency_s"] for r in results.values()]
    ttfts = [r["ttft_s"] for r in results.values()]
    tokens = sum(r["tokens"] for r in results.values())
    return {"clients": clients, "requests": requests, "sampling": sampling, "max_tokens": max_tokens,
            "wall_s": round(wall, 3), "completion_tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
            "latency_p50_s": round(percentile(latencies, 0.5), 3) if latencies else None,
            "latency_p95_s": round(percentile(latencies, 0.95), 3) if latencies else None,
            "ttft_p50_s": round(percentile(ttfts, 0.5), 3) if ttfts else None,
            "ttft_p95_s": round(percentile(ttfts, 0.95), 3) if ttfts else None,
            "lost": lost, "errors": errors, "mixed_up": mixed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="bench/serve_load.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="consolidated model directory to serve in this process")
    parser.add_argument("--url", default="", help="an already running server instead of --model")
    parser.add_argument("--model-name", default="bench", help="the model id to request")
    parser.add_argument("--device", default="", help="device of the in-process server (default: cuda if available)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent streaming clients")
    parser.add_argument("--requests", type=int, default=32, help="requests in all, shared among the clients")
    parser.add_argument("--sampling", choices=["seeded", "greedy", "both"], default="both")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request")
    parser.add_argument("--timeout", type=float, default=600, help="seconds one request may take")
    parser.add_argument("--out", default="", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if bool(args.model) == bool(args.url):
        parser.error("give exactly one of --model and --url")

    server = None
    url = args.url.rstrip("/")
    if args.model:
        from minigpt.cli.generate import resolve_device
        from minigpt.generate import GenerationConfig, TextGenerator
        from minigpt.serve.server import ModelServer

        generator = TextGenerator.from_dir(args.model, device=resolve_device(args.device))
        server = ModelServer(generator, args.model_name, GenerationConfig(max_new_tokens=args.max_tokens),
                             port=0, quiet=True).start()
        url = server.url
    modes = ["seeded", "greedy"] if args.sampling == "both" else [args.sampling]
    try:
        runs = [run_load(url, args.model_name, args.clients, args.requests, mode, args.max_tokens, args.timeout)
                for mode in modes]
    finally:
        if server is not None:
            server.close()
    print(f"{'sampling':>8} {'clients':>7} {'requests':>8} {'tokens':>7} {'tok/s':>8} {'p50 s':>7} {'p95 s':>7} "
          f"{'ttft p50':>8} {'ttft p95':>8} {'lost':>4} {'mixed':>5}")
    for run in runs:
        # Latencies are None when no request was answered (every one lost): printed as "-".
        cell = {key: "-" if run[key] is None else run[key]
                for key in ("latency_p50_s", "latency_p95_s", "ttft_p50_s", "ttft_p95_s")}
        print(f"{run['sampling']:>8} {run['clients']:>7} {run['requests']:>8} {run['completion_tokens']:>7} "
              f"{run['tokens_per_s']:>8} {cell['latency_p50_s']:>7} {cell['latency_p95_s']:>7} "
              f"{cell['ttft_p50_s']:>8} {cell['ttft_p95_s']:>8} {len(run['lost']):>4} {len(run['mixed_up']):>5}")
    if args.out:
        atomic_write_text(args.out, json.dumps({"url": url, "model": args.model or args.model_name, "runs": runs},
                                               indent=2, ensure_ascii=False) + "\n")
    failed = any(run["lost"] or run["mixed_up"] for run in runs)
    for run in runs:
        for item in run["mixed_up"][:3]:
            print(f"MIXED UP ({run['sampling']}): request {item['request']}: {item['under_load']!r} under load, "
                  f"{item['alone']!r} alone", file=sys.stderr)
        if run["errors"]:
            print(f"LOST ({run['sampling']}): {run['errors']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
