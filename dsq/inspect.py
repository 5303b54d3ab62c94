"""`dsq inspect`: what a checkpoint holds, read from its config and safetensors headers only."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dsq.checkpoint import DTYPES, Checkpoint, resolve, role
from dsq.config import Config


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


def describe(model: str, revision: str | None, console: Console) -> None:
    folder = resolve(model, revision)
    cfg = Config.from_file(Path(folder) / "config.json")
    hf = json.loads((Path(folder) / "config.json").read_text())
    attn = f"q_lora {cfg.q_lora_rank}" if cfg.q_lora_rank else "plain q_proj"
    console.print(f"[bold]{folder}[/]", highlight=False)
    console.print(
        f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads ({attn}, "
        f"kv_lora {cfg.kv_lora_rank}), {cfg.n_routed_experts} routed experts top-{cfg.num_experts_per_tok} "
        f"({cfg.topk_method}) + {cfg.n_shared_experts} shared, {cfg.first_k_dense_replace} dense layer(s), "
        f"vocab {cfg.vocab_size}, context {cfg.max_position_embeddings}")
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
    for r in ("attention", "dense", "shared", "experts", "router", "embed", "head", "norm", "other"):
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
