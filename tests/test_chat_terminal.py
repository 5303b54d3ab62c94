"""`dsq chat` driven the way a person drives it, in a pseudo-terminal with readline: commands, history recall
that keeps the prompt, a pasted block as one message, the context counter; and the session's turn-level rules."""

from __future__ import annotations

import io
import os
import re
import sys

import pytest
from tiny import make_tiny

import dsq
from dsq.chat import ChatSession
from dsq.demo import write_tokenizer
from dsq.engine import SamplingParams
from dsq.errors import DsqError

# TERM=xterm: readline enables bracketed paste only on a capable terminal; rich's colours are then matched
# around with ANSI-tolerant patterns, and screen() replays what the line shows.
TERMINAL = {**os.environ, "TERM": "xterm"}
SGR = r"(?:\x1b\[[0-9;]*m)*"


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    path = make_tiny(tmp_path_factory.mktemp("chat"), "lite")
    write_tokenizer(path, 1000)
    return path


def screen(output: str) -> str:
    """The last line of a terminal after `output`: carriage return, backspace, cursor moves, erase and delete
    replayed; colours and modes dropped."""
    line: list[str] = []
    col = 0
    for m in re.finditer(r"\x1b\[([?\d;]*)([A-Za-z@])|[\x01\x02\x07]|(\r)|(\x08)|(\n)|(.)", output, re.S):
        n = int(m[1]) if m[1] and m[1].isdigit() else None
        if m[2] == "K":
            del line[0 if n == 2 else col:]
        elif m[2] == "P":
            del line[col:col + (n or 1)]
        elif m[2] in ("C", "D"):
            col = max(0, col + (n or 1) * (1 if m[2] == "C" else -1))
        elif m[3]:
            col = 0
        elif m[4]:
            col = max(0, col - 1)
        elif m[5]:
            line, col = [], 0
        elif m[6]:
            line += [" "] * (col + 1 - len(line))
            line[col] = m[6]
            col += 1
    return "".join(line).rstrip()


def spawn(model, *args: str):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, ["-m", "dsq.cli.main", "chat", str(model), "--temperature", "0", *args],
                          timeout=180, encoding="utf-8", dimensions=(40, 200), env=TERMINAL)
    child.logfile_read = io.StringIO()  # all the terminal was sent, for screen()
    return child


def counter(child, tokens: int) -> int:
    child.expect(rf"{tokens} tokens · [\d.]+ tok/s · context (\d+)/4096")
    return int(child.match[1])


def test_chat_in_a_terminal(chat_model):
    pexpect = pytest.importorskip("pexpect")
    child = spawn(chat_model, "--max-new-tokens", "6", "--context", "4096", "--system", "Be brief.")
    child.expect("/help for commands")
    child.expect(r"template: \S*tokenizer_config\.json")
    child.expect("system: Be brief.")
    child.expect("> ")
    child.sendline("Hello")
    child.expect(r"\(cut at 6 tokens")  # the reply reached --max-new-tokens, and says so
    first = counter(child, 6)
    child.expect("> ")
    child.sendline("Tell me more")
    second = counter(child, 6)
    assert second > first  # the conversation grew by a turn

    child.expect("> ")
    child.send("\x1b[A\x1b[A#")  # up twice, back past "Tell me more" to "Hello", then a key after the redraw
    child.expect("#")
    assert screen(child.logfile_read.getvalue()).endswith("> Hello#")  # readline redrew the line with its prompt
    child.send("\x15/clear\r")  # Ctrl-U empties the recalled line
    child.expect("conversation cleared")
    child.expect("> ")
    child.sendline("Hello")
    assert counter(child, 6) == first  # the counter counts what the conversation holds, not what was said before
    child.expect("> ")
    child.send("\x1b[200~first line\nsecond line\x1b[201~\r")  # a bracketed paste of two lines
    child.expect("tok/s")
    child.sendline("/nope")
    child.expect("unknown command")
    assert "tok/s" not in child.before  # one reply: the block was one message
    child.expect("> ")
    child.send("one line \\\r")
    child.expect(r"\n" + SGR + r"\. ")  # the continuation prompt
    child.send("and the next\r")
    child.expect("tok/s")
    child.sendline("/nope")
    child.expect("unknown command")
    assert "tok/s" not in child.before
    child.sendline("/help")
    child.expect("/system TEXT")
    child.expect("backslash")
    child.sendline("/system You are terse.")
    child.expect("system prompt set")
    child.expect("> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_counter_is_the_conversation(chat_model):
    model = dsq.load_quantized(chat_model)
    session = ChatSession(model, context=512, system="Be brief.")
    for text in ("Hello there", "And again"):
        "".join(session.reply(text, SamplingParams(max_tokens=5)))
        held = model.tokenizer.encode_chat([{"role": "system", "content": "Be brief."}, *session.messages],
                                           add_generation_prompt=False)
        assert session.used == len(held)
    assert session.stats["cut"] == (session.stats["tokens"] == 5)


def test_a_message_too_long_ends_the_turn_not_the_session(chat_model):
    model = dsq.load_quantized(chat_model)
    session = ChatSession(model, context=64)
    "".join(session.reply("Hi", SamplingParams(max_tokens=4)))
    before = list(session.messages)
    with pytest.raises(DsqError, match="do not fit the context of 64"):
        "".join(session.reply("word " * 200, SamplingParams(max_tokens=4)))
    assert session.messages == before  # the conversation is as it was
    "".join(session.reply("Hi again", SamplingParams(max_tokens=4)))
    assert session.messages[-2] == {"role": "user", "content": "Hi again"}


def test_context_above_the_model_maximum_is_refused(chat_model):
    model = dsq.load_quantized(chat_model, max_seq_len=256)
    with pytest.raises(DsqError, match="above the model's maximum of 256"):
        ChatSession(model, context=257)
