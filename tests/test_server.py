"""The OpenAI-compatible server, queried with the real `openai` client over real HTTP on 127.0.0.1, in front of
an engine over the fake runner (helpers_engine.py) and a small byte-level tokenizer."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from helpers_engine import FakeRunner

from dsq.demo import write_tokenizer
from dsq.engine import Engine
from dsq.server import StopStrings, create_app
from dsq.tokenizer import Tokenizer

VOCAB, NAME, CONTEXT = 1000, "tiny", 512
HELLO = [{"role": "user", "content": "Hello there, how are you?"}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok")
    write_tokenizer(path, VOCAB)
    return path


def wait_for(condition, what: str, limit: float = 60.0) -> None:
    """Wait on something observable; the limit is only a safety net against a hang."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.01)


@contextlib.contextmanager
def server(folder: Path, api_key: str | None = None, queue_limit: int = 64):
    """A real uvicorn server in a thread, on a socket bound to a free port; yields (engine, base url)."""
    engine = Engine(FakeRunner(vocab=VOCAB), max_batch_tokens=256)
    app = create_app(engine, Tokenizer(folder), NAME, api_key, CONTEXT, queue_limit)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]})
    thread.start()
    try:
        wait_for(lambda: srv.started, "the server to start")
        yield engine, f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        engine.runner.running.set()
        srv.should_exit = True
        thread.join()
        sock.close()


@pytest.fixture(scope="module")
def served(folder):
    with server(folder) as (engine, url):
        yield engine, openai.OpenAI(base_url=url, api_key="none", max_retries=0)


def chat(client, stream: bool = False, **kw):
    kw = {"model": NAME, "messages": HELLO, "max_tokens": 24, "temperature": 0, **kw}
    return client.chat.completions.create(stream=stream, **kw)


def test_models_lists_the_served_model(served):
    assert [m.id for m in served[1].models.list().data] == [NAME]


def test_chat_and_text_completions_stream_the_same_answer(served, folder):
    client = served[1]
    whole = chat(client)
    assert whole.choices[0].finish_reason in ("stop", "length") and whole.choices[0].message.content
    chunks = list(chat(client, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert whole.usage.prompt_tokens == len(Tokenizer(folder).encode_chat(HELLO))  # the chat template's tokens
    text = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=20, temperature=0)
    streamed = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=20, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text.choices[0].text
    assert text.usage.total_tokens == text.usage.prompt_tokens + text.usage.completion_tokens


def test_usage_counts_the_prompt_and_the_tokens(served, folder):
    client = served[1]
    prompt = Tokenizer(folder).encode("Once upon a time")
    out = client.completions.create(model=NAME, prompt=prompt, max_tokens=7, temperature=0)
    assert out.usage.prompt_tokens == len(prompt)
    assert out.usage.completion_tokens == 7 or out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=7,
                                                            temperature=0).choices[0].text


def test_eight_concurrent_greedy_requests_equal_one_at_a_time(served):
    client = served[1]
    asks = [[{"role": "user", "content": f"Question number {i}: what is {i} + {i}?"}] for i in range(8)]
    one_by_one = [chat(client, messages=m).choices[0].message.content for m in asks]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda m: chat(client, messages=m).choices[0].message.content, asks))
    assert together == one_by_one


def test_stop_strings_are_cut_also_across_streamed_pieces(served):
    client = served[1]
    full = chat(client, max_tokens=40).choices[0].message.content
    assert len(full) >= 10, "the fake model's answer is long enough to cut in its middle"
    stop = full[len(full) // 2:len(full) // 2 + 3]
    expected = full[:full.index(stop)]
    cut = chat(client, max_tokens=40, stop=[stop, "never appears"])
    assert cut.choices[0].message.content == expected and cut.choices[0].finish_reason == "stop"
    pieces = [c.choices[0].delta.content or "" for c in chat(client, stream=True, max_tokens=40, stop=stop)]
    assert "".join(pieces) == expected


def test_stop_strings_spanning_pieces():
    stops = StopStrings(["<end>"])
    out = [stops.push(p) for p in ["abc<", "en", "d>zzz"]]
    assert out == [("abc", False), ("", False), ("", True)]
    assert StopStrings(["xy"]).push("axbxy") == ("axb", True)


def test_null_fields_mean_their_defaults(served):
    client = served[1]
    body = {"model": NAME, "messages": HELLO, "max_tokens": 24, "temperature": 0, "n": None, "top_p": None}
    answer = httpx.post(f"{client.base_url}chat/completions", json=body).json()
    assert answer["choices"][0]["message"]["content"] == chat(client).choices[0].message.content


def test_a_seed_reproduces_a_sampled_answer(served):
    client = served[1]
    a, b = (chat(client, temperature=1.0, seed=5).choices[0].message.content for _ in range(2))
    assert a == b


LONG = " ".join(f"word{i}" for i in range(CONTEXT))  # more tokens than the context holds


@pytest.mark.parametrize(("body", "param"), [
    ({"max_tokens": -1}, "max_tokens"), ({"max_tokens": CONTEXT}, "max_tokens"),
    ({"messages": [{"role": "user", "content": LONG}]}, "messages"), ({"temperature": "hot"}, "temperature"),
    ({"n": 2}, "n"), ({"top_p": 0}, "top_p"), ({"extra_body": {"top_k": -1}}, "top_k"),
    ({"messages": "hello"}, "messages"),
    ({"presence_penalty": 0.5}, "presence_penalty"), ({"logprobs": True}, "logprobs"),
    ({"response_format": {"type": "json_object"}}, "response_format"), ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages.0.content"), ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
                             "messages.0.content"),
])
def test_bad_requests_get_400_with_the_openai_error_body(served, body, param):
    with pytest.raises(openai.BadRequestError) as e:
        chat(served[1], **body)
    assert e.value.status_code == 400 and set(e.value.body) == {"message", "type", "param", "code"}
    assert e.value.body["param"] == param, e.value.body["message"]


def test_neutral_values_of_unimplemented_fields_and_unknown_fields_are_accepted(served):
    """What clients send by default (LangChain: penalties 0, logprobs false) changes nothing, so it is answered."""
    same = chat(served[1], presence_penalty=0, frequency_penalty=0.0, logprobs=False, user="me",
                response_format={"type": "text"}, extra_body={"best_of": 1, "some_new_field": 3})
    assert same.choices[0].message.content == chat(served[1]).choices[0].message.content


def test_content_as_text_parts_is_the_same_message(served):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello there, "}, {"type": "text",
                                                                                   "text": "how are you?"}]}]
    assert chat(served[1], messages=parts).choices[0].message.content == chat(served[1]).choices[0].message.content


def test_an_empty_prompt_and_a_body_that_is_not_json_name_what_is_wrong(served):
    with pytest.raises(openai.BadRequestError) as e:
        served[1].completions.create(model=NAME, prompt=[], max_tokens=2)
    assert e.value.body["param"] == "prompt" and "empty" in e.value.body["message"]
    r = httpx.post(str(served[1].base_url) + "chat/completions", content=b'{"messages": [}',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] is None, r.text
    assert "not valid JSON" in r.json()["error"]["message"] and "character" in r.json()["error"]["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_cut_by_shutdown_is_an_error_not_a_finished_answer(folder, stream):
    with server(folder) as (engine, url):
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
        engine.runner.running.clear()  # the request cannot finish before the engine stops

        def ask():
            if not stream:
                return chat(client, max_tokens=300)
            return "".join(c.choices[0].delta.content or "" for c in chat(client, stream=True, max_tokens=300))

        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(ask)
            wait_for(lambda: engine.requests, "the request to reach the engine")
            stopping = threading.Thread(target=engine.stop)
            stopping.start()
            wait_for(lambda: engine._stopping, "the engine to be told to stop")
            engine.runner.running.set()
            stopping.join()
            with pytest.raises(openai.APIError) as e:
                answer.result()
        assert "shut down before this request finished" in str(e.value)
        assert engine.pool.used == 0


def test_an_unknown_model_is_404(served):
    with pytest.raises(openai.NotFoundError):
        chat(served[1], model="gpt-4")


def test_the_api_key_is_required_when_set(folder):
    with server(folder, api_key="sesame") as (_, url):
        with pytest.raises(openai.AuthenticationError) as e:
            chat(openai.OpenAI(base_url=url, api_key="wrong", max_retries=0))
        assert e.value.status_code == 401
        assert chat(openai.OpenAI(base_url=url, api_key="sesame", max_retries=0)).choices[0].message.content
        assert httpx.get(url.removesuffix("/v1") + "/health").status_code == 200


def raw_post(url: str, path: str, body: str) -> socket.socket:
    """Send a request on a plain socket, to be closed without reading the answer (a client that goes away)."""
    host, port = url.removeprefix("http://").split("/")[0].split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(f"POST /v1/{path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
    return sock


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_disconnects_frees_its_pages(folder, stream):
    with server(folder) as (engine, url):
        engine.runner.running.clear()  # hold the engine in its first step: the request cannot finish by itself
        body = f'{{"model": "{NAME}", "prompt": "Hello", "max_tokens": 300, "stream": {str(stream).lower()}}}'
        sock = raw_post(url, "completions", body)
        wait_for(lambda: engine.requests, "the request to reach the engine")
        (req,) = engine.requests.values()
        sock.close()
        wait_for(lambda: req.cancel_requested, "the server to notice the disconnect")
        engine.runner.running.set()
        wait_for(lambda: req.done.is_set(), "the request to end")
        assert req.finish_reason == "cancelled" and len(req.output) < 300
        assert engine.pool.used == 0


def test_a_full_queue_answers_429(folder):
    with server(folder, queue_limit=1) as (engine, url):
        engine.runner.running.clear()
        sock = raw_post(url, "completions", f'{{"model": "{NAME}", "prompt": "Hi", "max_tokens": 5}}')
        wait_for(lambda: engine.requests, "the first request to reach the engine")
        with pytest.raises(openai.RateLimitError) as e:
            chat(openai.OpenAI(base_url=url, api_key="none", max_retries=0))
        assert e.value.status_code == 429
        engine.runner.running.set()
        sock.close()


SERVE = """
import sys
sys.path.insert(0, {tests!r})
from helpers_engine import FakeRunner
from dsq.engine import Engine
from dsq.server import serve
from dsq.tokenizer import Tokenizer
serve(Engine(FakeRunner(vocab={vocab})), Tokenizer({folder!r}), "tiny", port={port})
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_server_cleanly(folder, sig):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = SERVE.format(tests=str(Path(__file__).parent), vocab=VOCAB, folder=str(folder), port=port)
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def healthy() -> bool:
        assert proc.poll() is None, "the server exited early"
        with contextlib.suppress(httpx.TransportError):
            return httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
        return False

    try:
        wait_for(healthy, "the server to answer /health", limit=120)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        assert chat(client).choices[0].message.content
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()


def test_a_failing_engine_answers_500_and_health_503(folder):
    def broken(batch):
        raise RuntimeError("out of memory, say")

    with server(folder) as (engine, url):
        engine.runner.forward = broken
        with pytest.raises(openai.InternalServerError) as e:
            chat(openai.OpenAI(base_url=url, api_key="none", max_retries=0))
        assert e.value.status_code == 500 and engine.pool.used == 0
        assert httpx.get(url.removesuffix("/v1") + "/health").status_code == 503
