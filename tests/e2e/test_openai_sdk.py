"""The product as a user meets it: `electron-serve up` (real Ray, real workers running
SmolLM2, real router) driven by the official openai SDKs (Python and JavaScript)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.openai_schema import validate
from tests.support.serving import stop_process_group

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
PARIS_QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service():
    port = _free_port()
    data = tempfile.mkdtemp(prefix="electron-e2e-")
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1",
               ELECTRON_TENANCY__SQLITE_PATH=f"{data}/electron.db",
               ELECTRON_TENANCY__SPOOL_PATH=f"{data}/spool.jsonl")
    log_path = ROOT / ".pytest-electron-up.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "up", "--workers", "2", "--port", str(port),
         "--kv-cache-mb", "128", "--torch-threads", "1", "--dtype", "float32"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"electron-serve up exited: {log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{base}/ready?workers=1", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"not ready in time: {log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield base
    finally:
        stop_process_group(proc)
        log.close()


@pytest.fixture(scope="module")
def api_key(service) -> str:
    """The ready-made key `up` prints in its banner (auth is on by default)."""
    log_path = ROOT / ".pytest-electron-up.log"
    deadline = time.monotonic() + 30
    while not (found := re.search(r'api_key="(es-[^"]+)"', log_path.read_text())):
        assert time.monotonic() < deadline, "the banner printed no key"
        time.sleep(0.1)
    return found.group(1)


@pytest.fixture(scope="module")
def client(service, api_key):
    return openai.OpenAI(base_url=f"{service}/v1", api_key=api_key, max_retries=0)


def test_a_request_without_the_key_is_401(service):
    bare = openai.OpenAI(base_url=f"{service}/v1", api_key="es-not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bare.chat.completions.create(model="electron", messages=PARIS_QUESTION, max_tokens=4)


def test_answer_mentions_paris_and_response_validates(client):
    resp = client.chat.completions.with_raw_response.create(
        model="electron", messages=PARIS_QUESTION, temperature=0, max_tokens=32)
    assert resp.headers.get("x-request-id")
    body = json.loads(resp.text)
    validate(body, "CreateChatCompletionResponse")
    completion = resp.parse()
    assert "Paris" in completion.choices[0].message.content
    assert completion.usage.prompt_tokens_details.cached_tokens >= 0


def test_second_identical_request_reports_cached_tokens(client):
    messages = [{"role": "user", "content": "Name three colours of the rainbow, briefly."}]
    client.chat.completions.create(model="electron", messages=messages, max_tokens=8, temperature=0)
    second = client.chat.completions.create(model="electron", messages=messages, max_tokens=8,
                                            temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens > 0
    assert second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens


def test_streaming_with_include_usage(client):
    stream = client.chat.completions.create(
        model="electron", messages=PARIS_QUESTION, temperature=0, max_tokens=32, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    for chunk in chunks:
        validate(chunk.model_dump(exclude_unset=True), "CreateChatCompletionStreamResponse")
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert all(c.usage is None for c in chunks[:-1])


async def test_async_client(service, api_key):
    async with openai.AsyncOpenAI(base_url=f"{service}/v1", api_key=api_key) as aclient:
        completion = await aclient.chat.completions.create(
            model="electron", messages=PARIS_QUESTION, temperature=0, max_tokens=32)
    assert "Paris" in completion.choices[0].message.content


def test_waves_base_url_works(service, api_key):
    waves = openai.OpenAI(base_url=f"{service}/waves/v1", api_key=api_key)
    completion = waves.chat.completions.create(model="electron", messages=PARIS_QUESTION,
                                               temperature=0, max_tokens=16)
    assert completion.choices[0].message.content
    assert [m.id for m in waves.models.list().data] == ["electron"]


def test_n_2_returns_two_choices(client):
    completion = client.chat.completions.create(
        model="electron", messages=PARIS_QUESTION, n=2, temperature=1.0, seed=7, max_tokens=12)
    assert sorted(c.index for c in completion.choices) == [0, 1]
    assert all(c.message.content for c in completion.choices)


def test_logprobs_with_top_logprobs_3(client):
    completion = client.chat.completions.create(
        model="electron", messages=PARIS_QUESTION, max_tokens=6, temperature=0, logprobs=True,
        top_logprobs=3)
    content = completion.choices[0].logprobs.content
    assert len(content) == completion.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and isinstance(entry.bytes, list)
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_official_js_sdk_streaming_and_not(service, api_key):
    js_dir = ROOT / "tests" / "e2e" / "js"
    if not (js_dir / "node_modules" / "openai").is_dir():
        subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund"], cwd=js_dir,
                       check=True, timeout=300)
    out = subprocess.run(["node", "chat.mjs"], cwd=js_dir, capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, OPENAI_BASE_URL=f"{service}/v1",
                                               OPENAI_API_KEY=api_key))
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert "Paris" in result["content"]
    assert "Paris" in result["streamed"]
    assert result["stream_usage"]["completion_tokens"] > 0
    assert result["usage"]["prompt_tokens_details"]["cached_tokens"] >= 0
