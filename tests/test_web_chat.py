"""The web chat page in headless Chromium, served by `launch/serve.py`: type, see the streamed answer, keep
the conversation. A screenshot is left in tests/artifacts/ (ignored by git) for a person to look at."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from chat_model import shared_chat_model
from ports import free_port
from webdriver import Browser, chromium_binaries

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "tests" / "artifacts"

pytestmark = pytest.mark.integration


def wait_until_serving(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as reply:
                if json.load(reply)["status"] == "ok":
                    return
        except OSError:
            pass
        if process.poll() is not None:
            raise RuntimeError(f"launch/serve.py exited: {process.stderr.read().decode()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"launch/serve.py did not answer at {url} in {timeout}s")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def served_url(tmp_path_factory):
    model_dir = shared_chat_model(tmp_path_factory)
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "launch/serve.py", "--model", str(model_dir), "--port", str(port),
                                "--model-name", "tiny-chat", "--greedy", "--max-new-tokens", "40", "--quiet"],
                               cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, process)
        yield url, model_dir
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_launch_serve_answers_on_its_port_and_refuses_a_port_in_use(served_url):
    url, model_dir = served_url
    with urllib.request.urlopen(url + "/v1/models", timeout=30) as reply:
        assert [m["id"] for m in json.load(reply)["data"]] == ["tiny-chat"]
    port = url.rsplit(":", 1)[1]
    result = subprocess.run([sys.executable, "launch/serve.py", "--model", str(model_dir), "--port", port],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: --host 127.0.0.1 --port {port}: cannot listen there")


def test_web_chat_streams_answers_into_the_page_and_keeps_the_conversation(served_url):
    url, _ = served_url
    binaries = chromium_binaries()
    if binaries is None:
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    browser = Browser(*binaries, port=free_port())
    try:
        browser.open(url + "/")
        assert browser.wait_for("document.getElementById('model').textContent === 'tiny-chat'")

        def ask(text: str, answers_before: int) -> dict:
            browser.type("#input", text)
            browser.click("#send")
            browser.wait_for(f"document.querySelectorAll('.message.assistant[data-state=done]').length === "
                             f"{answers_before + 1}")
            return browser.script("const last = [...document.querySelectorAll('.message.assistant')].pop();"
                                  "return {text: last.textContent, chunks: Number(last.dataset.chunks)};")

        first = ask("Hi", 0)
        assert first["text"] == "Hello there, how are you?"
        assert first["chunks"] > 1  # written into the page piece by piece as the events arrived
        # The page sends the whole conversation: "All" after the greeting has its own learned answer.
        assert ask("All", 1)["text"] == "Speak, speak."
        assert browser.script("return document.querySelectorAll('.message.user').length") == 2
        assert browser.screenshot(ARTIFACTS / "web_chat.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        browser.click("#new-chat")
        answer = ask("你好", 0)
        assert answer["text"] == "你好，世界。天下大势，分久必合。" and answer["chunks"] > 5
        browser.screenshot(ARTIFACTS / "web_chat_chinese.png")  # glyphs need a CJK font on the machine
        assert not browser.script("return document.querySelector('.message.error')")
        browser.type("#input", "speak " * 100)  # the server's 400 is shown, and the chat goes on
        browser.click("#send")
        error = browser.wait_for("document.querySelector('.message.error')?.textContent")
        assert "the model's context is 96 tokens" in error
        assert browser.script("return document.querySelectorAll('.message.user').length") == 1
        assert browser.script("return document.getElementById('input').value") == ("speak " * 100).strip()
    finally:
        browser.close()


@pytest.mark.parametrize("language,lang,send,placeholder", [
    ("zh-CN", "zh-CN", "发送", "输入消息（Enter 发送，Shift+Enter 换行）"),
    ("en-US", "en", "Send", "Message (Enter to send, Shift+Enter for a new line)")])
def test_web_chat_speaks_the_browsers_language(served_url, language, lang, send, placeholder):
    url, _ = served_url
    binaries = chromium_binaries()
    if binaries is None:
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    browser = Browser(*binaries, port=free_port(), language=language)
    try:
        browser.open(url + "/")
        assert browser.wait_for("document.getElementById('model').textContent === 'tiny-chat'")
        assert browser.script("return document.documentElement.lang") == lang
        assert browser.script("return document.getElementById('send').textContent") == send
        assert browser.script("return document.getElementById('input').placeholder") == placeholder
    finally:
        browser.close()


def test_web_chat_asks_for_the_key_of_a_server_started_with_one(tmp_path_factory):
    binaries = chromium_binaries()
    if binaries is None:
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    model_dir = shared_chat_model(tmp_path_factory)
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "OMP_NUM_THREADS": "1",
           "MINIGPT_API_KEY": "page-key"}
    process = subprocess.Popen([sys.executable, "launch/serve.py", "--model", str(model_dir),
                                "--port", str(port), "--model-name", "tiny-chat", "--greedy", "--quiet"],
                               cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    browser = None
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_serving(url, process)
        browser = Browser(*binaries, port=free_port())
        browser.open(url + "/")
        assert "needs an API key" in browser.wait_for("document.querySelector('.message.error')?.textContent")
        browser.type("#api-key", "page-key\ue007")  # Enter commits the field
        assert browser.wait_for("document.getElementById('model').textContent === 'tiny-chat'")
        browser.type("#input", "Hi")
        browser.click("#send")
        browser.wait_for("document.querySelector('.message.assistant[data-state=done]')")
        assert browser.script("return document.querySelector('.message.assistant').textContent") == \
            "Hello there, how are you?"
    finally:
        if browser is not None:
            browser.close()
        process.terminate()
        process.wait(timeout=30)
