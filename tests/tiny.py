"""Tiny DeepSeek-V2 checkpoints made by transformers (the logits oracle), saved in the published form."""

from __future__ import annotations

import json
from pathlib import Path

import torch

LITE = dict(  # V2-Lite-like: plain q_proj, greedy routing, one dense layer
    vocab_size=1000, hidden_size=128, intermediate_size=344, moe_intermediate_size=128, num_hidden_layers=3,
    num_attention_heads=4, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16,
    v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2, first_k_dense_replace=1,
    topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False,
)
V2 = dict(  # V2-like: q_lora, group-limited routing, routed_scaling_factor != 1
    LITE, q_lora_rank=48, n_routed_experts=8, num_experts_per_tok=3, topk_method="group_limited_greedy",
    n_group=4, topk_group=2, routed_scaling_factor=2.5,
)
YARN = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
        "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}


def make_tiny(path: str | Path, kind: str = "lite", seed: int = 0, **overrides) -> Path:
    """Save a random `DeepseekV2ForCausalLM` (float32) and rewrite its config.json the way the published
    checkpoints spell it (`rope_scaling` + `rope_theta`, not transformers 5's `rope_parameters`)."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    fields = dict(LITE if kind == "lite" else V2, **overrides)
    cfg = DeepseekV2Config(**fields, max_position_embeddings=163840, bos_token_id=1, eos_token_id=2,
                           rope_parameters=dict(YARN, rope_type="yarn", rope_theta=10000.0))
    torch.manual_seed(seed)
    model = DeepseekV2ForCausalLM(cfg).eval()
    path = Path(path)
    model.save_pretrained(path)
    published = json.loads((path / "config.json").read_text())
    published.pop("rope_parameters")
    for derived in ("qk_head_dim", "head_dim"):
        published.pop(derived, None)
    published.update(rope_scaling=YARN, rope_theta=10000, scoring_func="softmax", moe_layer_freq=1)
    (path / "config.json").write_text(json.dumps(published, indent=2))
    return path


def hf_model(path: str | Path):
    """The transformers oracle for a folder made by make_tiny, in float32, eager attention."""
    from transformers import DeepseekV2ForCausalLM

    return DeepseekV2ForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def endless(src: str | Path, dst: str | Path) -> Path:
    """A copy of a model folder whose end-of-sequence id is outside the vocabulary, so that a reply can only
    end at its token budget (what an interrupt test needs: the reply is still running when Ctrl-C lands)."""
    import shutil

    dst = Path(shutil.copytree(src, dst))
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(dict(cfg, eos_token_id=cfg["vocab_size"]), indent=2))
    return dst


def decode_each(net, ids: torch.Tensor, cache, tables: list[list[int]]) -> torch.Tensor:
    """Logits [B, T, V] of every position of ids [B, T], run one token per sequence per step, so that every
    position after the first attends through the cache (the absorbed path); row b lives in pages tables[b]."""
    from dsq.cache import Attention

    b, t = ids.shape
    size, out = cache.page_size, []
    for p in range(t):
        seqs = [(i, 1, p + 1, tables[i]) for i in range(b)]
        slots = [tables[i][p // size] * size + p % size for i in range(b)]
        out.append(net(ids[:, p], torch.full((b,), p), Attention.build(cache, seqs, slots, "cpu")))
    return torch.stack(out, dim=1)


def rows_of(pages_per_row: int, rows: int) -> list[list[int]]:
    """Page tables that give row i the pages i * pages_per_row.. in order."""
    return [list(range(i * pages_per_row, (i + 1) * pages_per_row)) for i in range(rows)]
