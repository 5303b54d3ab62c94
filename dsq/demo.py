"""The built-in demo model: a tiny DeepSeek-V2-architecture checkpoint with random weights and a tokenizer,
made without downloads so every machine can run dsq end to end."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
CORPUS = """DeepSeek-V2 is a mixture-of-experts language model. Its attention compresses keys and values into a
small latent vector, so the cache holds 576 numbers per token and layer. Each token is sent to six of many routed
experts plus two shared ones. dsq stores the experts in four bits and the rest in eight-bit floating point, then
runs them with fused kernels. User: Hello! How are you today? Assistant: I am fine, thank you. What would you like
to talk about? The quick brown fox jumps over the lazy dog. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000."""


def write_tokenizer(folder: str | Path, vocab_size: int) -> None:
    """A small byte-level BPE (ids: 0 pad, 1 bos, 2 eos) with the DeepSeek-V2 Chat template, so that text
    prompts and chat work on a tiny model; any text encodes, as every byte is in the vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([CORPUS], trainer)
    folder = Path(folder)
    tk.save(str(folder / "tokenizer.json"))
    template = resources.files("dsq").joinpath("chat_template.jinja").read_text()
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "add_bos_token": True, "chat_template": template}, indent=2))
