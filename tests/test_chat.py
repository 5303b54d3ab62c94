"""`dsq chat` driven the way a person drives it, in a pseudo-terminal; and the session's cache reuse."""

from __future__ import annotations

import os
import sys

import pytest
from tiny import endless, make_tiny

import dsq
from dsq.chat import ChatSession
from dsq.demo import write_tokenizer
from dsq.engine import SamplingParams

PLAIN = {**os.environ, "TERM": "dumb"}  # rich writes no escape codes to match around


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    path = make_tiny(tmp_path_factory.mktemp("chat"), "lite")
    write_tokenizer(path, 1000)
    return path


def test_continuing_the_cache_equals_recomputing(chat_model):
    model = dsq.load_quantized(chat_model, kv_cache_dtype="fp32")  # exact, so equal means equal
    session = ChatSession(model, context=512, system="Be brief.")
    hot = lambda seed: SamplingParams(temperature=1.0, seed=seed, max_tokens=10)
    first = "".join(session.reply("Hello there", hot(1)))
    used = session.used
    second = "".join(session.reply("Tell me more.", hot(2)))
    assert session.used > used  # the second turn added to the cache instead of starting over
    history = [{"role": "system", "content": "Be brief."}, *session.messages[:-1]]
    redo = model.generate(model.tokenizer.encode_chat(history), max_new_tokens=10, temperature=1.0, seed=2)
    assert second == model.tokenizer.decode(redo).rstrip("\ufffd")
    assert first and session.messages[1]["content"] == first.strip()


def test_context_full_drops_oldest_turns(chat_model):
    session = ChatSession(dsq.load_quantized(chat_model), context=96)
    for i in range(6):
        "".join(session.reply(f"message number {i} " * 3, SamplingParams(max_tokens=8)))
    assert session.dropped > 0
    assert session.messages[0]["content"] != "message number 0 " * 3
    assert session.used <= 96


@pytest.fixture(scope="module")
def endless_model(chat_model, tmp_path_factory):
    return endless(chat_model, tmp_path_factory.mktemp("endless") / "model")


def test_ctrl_c_stops_a_reply_and_keeps_the_session(endless_model):
    """Ctrl-C goes in once the reply is seen streaming, and the reply cannot end by itself (no end token, a
    budget near a large context), so only the interrupt can stop it, however long the machine takes."""
    pexpect = pytest.importorskip("pexpect")
    prompt = "Tell me a long story"
    child = pexpect.spawn(sys.executable, ["-m", "dsq.cli.main", "chat", str(endless_model), "--temperature", "1",
                                           "--max-new-tokens", "32000", "--context", "32768", "--seed", "0"],
                          timeout=300, encoding="utf-8", dimensions=(40, 200), env=PLAIN)
    child.expect("> ")
    child.sendline(prompt)
    child.expect_exact(f"{prompt}\r\n")  # the terminal's echo of the line; what follows is the reply
    child.expect(r"\S")  # the first streamed text
    child.sendintr()
    child.expect("reply stopped")
    child.expect(r"(\d+) tokens · [\d.]+ tok/s · context \d+/32768")
    assert int(child.match.group(1)) < 32000
    child.expect("> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
