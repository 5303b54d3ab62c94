"""The checkpoint's tokenizer (`tokenizer.json` through `tokenizers`) and chat template.

A chat template is untrusted input (it comes with a downloaded checkpoint), so it is compiled and rendered
in a bounded sandbox (dsq/sandbox.py); checkpoints without one get the DeepSeek-V2 Chat template shipped
with dsq. Any template fault is one DsqError naming the file the template came from."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from jinja2 import Template, TemplateError
from tokenizers import Tokenizer as HFTokenizer

from dsq.errors import DsqError
from dsq.sandbox import MAX_TEMPLATE, ChatTemplateSandbox

SHIPPED = "the chat template shipped with dsq"


def _content(token: Any, field: str, where: Path) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or {"content": ...}."""
    value = token.get("content") if isinstance(token, dict) else token
    if value is not None and not isinstance(value, str):
        raise DsqError(f"{where}: {field} must be a string, got {type(value).__name__}")
    return value


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        cfg = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DsqError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise DsqError(f"{path}: must hold a JSON object, got {type(cfg).__name__}")
    return cfg


def _template_source(folder: Path, cfg: dict[str, Any], cfg_path: Path) -> tuple[str, str]:
    """The chat template's text and where it came from: tokenizer_config.json, chat_template.jinja or dsq's."""
    template = cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        if not all(isinstance(t, dict) for t in template):
            raise DsqError(f"{cfg_path}: chat_template as a list must hold {{'name', 'template'}} objects")
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if template is not None:
        return template, str(cfg_path)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(errors="surrogateescape"), str(folder / "chat_template.jinja")
    return resources.files("dsq").joinpath("chat_template.jinja").read_text(), SHIPPED


def _compile(env: ChatTemplateSandbox, source: Any, where: str) -> Template:
    if not isinstance(source, str):
        raise DsqError(f"{where}: the chat template must be a string, got {type(source).__name__}")
    if len(source) > MAX_TEMPLATE:
        raise DsqError(f"{where}: the chat template is {len(source):,} characters, more than {MAX_TEMPLATE:,}")
    try:
        source.encode()
    except UnicodeEncodeError:
        raise DsqError(f"{where}: the chat template is not valid text (a lone surrogate or undecodable byte)") from None
    try:
        return env.from_string(source)
    except (TemplateError, RecursionError, MemoryError, ValueError, TypeError, SyntaxError) as e:
        raise DsqError(f"{where}: the chat template does not compile ({_one_line(e)})") from None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())[:300]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class Tokenizer:
    def __init__(self, folder: str | Path, chat_template: Path | None = None):
        """chat_template: a template file used instead of the checkpoint's own."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise DsqError(f"{path}: not found; pass token ids (--ids) or use a folder with a tokenizer")
        try:
            self.tk = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception on a bad file
            raise DsqError(f"{path}: not a readable tokenizer ({_one_line(e)})") from None
        cfg_path = folder / "tokenizer_config.json"
        cfg = _read_json(cfg_path)
        self.bos_token = _content(cfg.get("bos_token"), "bos_token", cfg_path) or "<｜begin▁of▁sentence｜>"
        self.eos_token = _content(cfg.get("eos_token"), "eos_token", cfg_path) or "<｜end▁of▁sentence｜>"
        self.bos_id, self.eos_id = self.tk.token_to_id(self.bos_token), self.tk.token_to_id(self.eos_token)
        self.add_bos = bool(cfg.get("add_bos_token", True)) and self.bos_id is not None
        self.env = ChatTemplateSandbox()
        if chat_template is not None:
            source, self.template_source = chat_template.read_text(errors="surrogateescape"), str(chat_template)
        else:
            source, self.template_source = _template_source(folder, cfg, cfg_path)
        self.template = _compile(self.env, source, self.template_source)

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = self.tk.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if bos and self.add_bos else ids

    def decode(self, ids: list[int]) -> str:
        return self.tk.decode(ids, skip_special_tokens=True)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation as text in the chat template, rendered within the sandbox's budget."""
        try:
            text = self.env.render(self.template, messages=messages, bos_token=self.bos_token,
                                   eos_token=self.eos_token, add_generation_prompt=add_generation_prompt)
            text.encode()
        except (TemplateError, RecursionError, MemoryError, ArithmeticError, ValueError, TypeError, LookupError,
                AttributeError) as e:
            raise DsqError(f"{self.template_source}: the chat template failed to render ({_one_line(e)})") from None
        return text

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation; the template writes the bos token itself."""
        return self.encode(self.render(messages, add_generation_prompt), bos=False)


class TextStream:
    """Turns a growing list of token ids into new text pieces, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.ids, self.text = tokenizer, [], ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self.text = text[len(self.text):], text
        return piece
