"""The checkpoint's tokenizer (`tokenizer.json` through `tokenizers`) and chat template.

A chat template is untrusted input (it comes with a downloaded checkpoint), so it is rendered in jinja2's
immutable sandbox; checkpoints without one get the DeepSeek-V2 Chat template shipped with dsq."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from dsq.errors import DsqError


def _content(token: Any) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def _raise(message: str) -> None:
    raise TemplateError(message)


class Tokenizer:
    def __init__(self, folder: str | Path):
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.exists():
            raise DsqError(f"{path}: not found; pass token ids (--ids) or use a folder with a tokenizer")
        self.tk = HFTokenizer.from_file(str(path))
        cfg_path = folder / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        self.bos_token = _content(cfg.get("bos_token")) or "<｜begin▁of▁sentence｜>"
        self.eos_token = _content(cfg.get("eos_token")) or "<｜end▁of▁sentence｜>"
        self.bos_id, self.eos_id = self.tk.token_to_id(self.bos_token), self.tk.token_to_id(self.eos_token)
        self.add_bos = bool(cfg.get("add_bos_token", True)) and self.bos_id is not None
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None and (folder / "chat_template.jinja").exists():
            template = (folder / "chat_template.jinja").read_text()
        if template is None:
            template = resources.files("dsq").joinpath("chat_template.jinja").read_text()
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.globals["raise_exception"] = _raise
        try:
            self.template = env.from_string(template)
        except TemplateError as e:
            raise DsqError(f"{cfg_path}: the chat template does not parse ({e})") from None

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size()

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = self.tk.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if bos and self.add_bos else ids

    def decode(self, ids: list[int]) -> str:
        return self.tk.decode(ids, skip_special_tokens=True)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        try:
            return self.template.render(messages=messages, bos_token=self.bos_token, eos_token=self.eos_token,
                                        add_generation_prompt=add_generation_prompt)
        except TemplateError as e:
            raise DsqError(f"chat template: {e}") from None

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
