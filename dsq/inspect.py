"""`dsq inspect`: what a checkpoint holds, read from its config and safetensors headers only."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from dsq.checkpoint import DTYPES, ROLES, Checkpoint, resolve, role
from dsq.config import PRESETS, Config
from dsq.errors import DsqError
from dsq.loader import read_config

ROWS = (*(r for r, _ in ROLES), "other")  # the tables' rows: every role, then the tensors no role matches
GPUS = (24, 48, 80, 141)  # GB: consumer, L40S / A6000, A100 / H100, H200


def by_role(ckpt: Checkpoint) -> dict[str, dict[str, int | set[str]]]:
    """Per role: stored bytes, parameters (INT4 packed words count 8), and the dtypes met."""
    rows: dict[str, dict] = defaultdict(lambda: {"params": 0, "bytes": 0, "dtypes": set()})
    for name in ckpt.files:
        n = math.prod(ckpt.shape(name))
        dtype = ckpt.dtype(name)
        row = rows[role(name)]
        row["bytes"] += n * DTYPES[dtype].itemsize
        if name.endswith(".weight_packed"):
            row["params"] += 8 * n
            row["dtypes"].add("INT4")
        elif name.endswith(".weight"):
            row["params"] += n
            row["dtypes"].add(dtype)
    return rows


def shape(cfg: Config) -> str:
    attn = f"q_lora {cfg.q_lora_rank}" if cfg.q_lora_rank else "plain q_proj"
    return (f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads ({attn}, "
            f"kv_lora {cfg.kv_lora_rank}), {cfg.n_routed_experts} routed experts top-{cfg.num_experts_per_tok} "
            f"({cfg.topk_method}) + {cfg.n_shared_experts} shared, {cfg.first_k_dense_replace} dense layer(s), "
            f"vocab {cfg.vocab_size}, context {cfg.max_position_embeddings}")


def describe(model: str, revision: str | None, console: Console) -> None:
    if "/" not in model and not Path(model).expanduser().exists():  # neither a folder nor a repo id: a preset?
        raise DsqError(f"{model}: no such folder, not a Hub repo id (owner/name), and not a preset "
                       f"({', '.join(PRESETS)})")
    folder = resolve(model, revision)
    cfg, _ = read_config(folder)  # one line for a missing, invalid or unfinished one
    hf = json.loads((Path(folder) / "config.json").read_text())
    console.print(f"[bold]{folder}[/]", highlight=False)
    console.print(shape(cfg))
    q = hf.get("quantization_config")
    if q:
        for name, group in q.get("config_groups", {}).items():
            w = group.get("weights") or {}
            detail = f"group {w.get('group_size')}" if w.get("strategy") == "group" else w.get("strategy")
            console.print(f"  {name}: {w.get('num_bits')}-bit {w.get('type')} ({detail}, "
                          f"{'symmetric' if w.get('symmetric', True) else 'asymmetric'}) "
                          f"-> {', '.join(group.get('targets', []))}", highlight=False)
        console.print(f"  kept unquantized: {', '.join(q.get('ignore', [])) or 'nothing'}", highlight=False)
    else:
        console.print("  unquantized")
    table = Table("role", "parameters", "bytes", "dtype", title="parameters and bytes by role")
    rows = by_role(Checkpoint(folder))
    total_p = total_b = 0
    for r in ROWS:
        if r in rows:
            row = rows[r]
            total_p, total_b = total_p + row["params"], total_b + row["bytes"]
            table.add_row(r, f"{row['params'] / 1e6:,.2f} M", size(row["bytes"]), ", ".join(sorted(row["dtypes"])))
    table.add_row("total", f"{total_p / 1e6:,.2f} M", size(total_b), "", style="bold")
    console.print(table)


def size(n: float) -> str:
    """Bytes for people: 3 significant digits in B, KB, MB, GB or TB (powers of 1000)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:,.3g} TB"


def scheme_bytes(cfg: Config) -> dict[str, dict[str, int]]:
    """Weight bytes by role of each scheme, from the model the loader would build (on the meta device)."""
    from dsq.formats import SCHEMES, Scheme
    from dsq.memory import weight_bytes

    schemes = {name: Scheme.by_role(roles, name) for name, roles in SCHEMES.items()} | {"bf16": Scheme(None)}
    return {name: weight_bytes(cfg, scheme, torch.bfloat16) for name, scheme in schemes.items()}


def describe_preset(name: str, console: Console) -> None:
    """A published model's shape, bytes by role in every scheme, and the context each GPU size holds, so a
    user can plan before downloading."""
    from dsq.cache import bytes_per_token
    from dsq.loader import hf_tensors
    from dsq.memory import PREFILL, memory_plan

    cfg = Config.preset(name)
    console.print(f"[bold]{name}[/] (preset: the published config, nothing downloaded)", highlight=False)
    console.print(shape(cfg))
    params: dict[str, int] = defaultdict(int)  # the checkpoint's tensors
    for tensor, dims in hf_tensors(cfg).items():
        params[role(tensor)] += math.prod(dims)
    by_scheme = scheme_bytes(cfg)  # what the runtime allocates (the router is kept in fp32)
    table = Table("role", "parameters", *by_scheme, title="parameters, and weight bytes by role and scheme")
    for r in ROWS:
        if r in by_scheme["bf16"]:
            table.add_row(r, f"{params[r] / 1e6:,.2f} M", *(size(b[r]) for b in by_scheme.values()))
    table.add_row("total", f"{sum(params.values()) / 1e6:,.2f} M",
                  *(size(sum(b.values())) for b in by_scheme.values()), style="bold")
    console.print(table)
    per_token = bytes_per_token(cfg, "fp8")
    table = Table("scheme", *(f"{g} GB" for g in GPUS), title=f"tokens of cache one GPU holds (90% of its "
                  f"memory, FP8 latent cache {size(per_token)} per token, {PREFILL}-token prefill)")
    for scheme, b in by_scheme.items():
        tokens = [memory_plan(cfg, sum(b.values()), int(gb * 1e9), int(gb * 1e9), need_tokens=0).cache_tokens
                  for gb in GPUS]
        table.add_row(scheme, *("does not fit" if t == 0 else f"{t:,}" for t in tokens))
    console.print(table)
    console.print(f"The cache is shared by all sequences; one sequence holds at most {cfg.max_position_embeddings:,} "
                  "tokens. More GPUs: --tp N splits weights and experts over N of them (docs/parallel.md).")
