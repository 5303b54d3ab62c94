"""The memory planner: before anything is allocated on a GPU, weights + activations + cache against what is
free, so a model that does not fit gets a sentence saying what to change instead of an out-of-memory trace."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dsq.cache import bytes_per_token
from dsq.checkpoint import role
from dsq.config import Config
from dsq.errors import DsqError
from dsq.formats import Int4Group, Scheme
from dsq.loader import read_config, tensor_names, unstacked
from dsq.model import MLA, Transformer
from dsq.parallel import Dist, shard_plan

GB = 1e9
CONTEXT = 4096  # the default context (max_seq_len, dsq chat --context, dsq serve --max-model-len): the tokens
# one sequence may hold, which the planner must find room for
PREFILL = 4096  # the longest prefill forward the activations are planned for
# On CPU no planner sizes the cache: it holds this many sequences of the context. A Model's own engine (generate,
# chat) serves one caller's batch, whose extra prompts wait their turn; `dsq serve` serves many clients at once.
CPU_MODEL_SEQUENCES = 4
CPU_SERVE_SEQUENCES = 8


def weight_bytes(cfg: Config, scheme: Scheme | None = None, dtype: torch.dtype = torch.bfloat16, world: int = 1,
                 rank: int = 0, backend: str = "torch") -> dict[str, int]:
    """Bytes of weights by role (attention, dense, shared, experts, router, norm, embed, head) that `rank` of a
    `world`-rank job holds in `scheme`'s formats (None: unquantized, in `dtype`): the model the loader would
    fill, built on the meta device, so no arithmetic of its own can drift from what load_quantized allocates.
    Attention includes the absorbed path's W_UK / W_UV where `backend` lays them out from kv_b at load
    (dsq.model.MLA: not on the Triton backend with an FP8 kv_b, whose kernels read kv_b itself)."""
    with torch.device("meta"):
        model = Transformer(cfg, dtype, Dist(shard_plan(cfg, world, scheme), rank), scheme, backend)
    out: dict[str, int] = {}
    for name, expert, t in tensor_names(model):
        r = role(unstacked(name, expert))
        out[r] = out.get(r, 0) + t.numel() * t.element_size()
    prepared = [t for m in model.modules() if isinstance(m, MLA) for t in (m.w_uk, m.w_uv) if t is not None]
    out["attention"] = out.get("attention", 0) + sum(t.numel() * t.element_size() for t in prepared)
    return out


def activation_bytes(cfg: Config, tokens: int, dtype_bytes: int = 2, heads: int | None = None) -> int:
    """A bound on the transient memory of one forward over `tokens` tokens (prefill, naive attention):
    the residual stream and the widest MLP / MoE intermediate, expanded K/V and fp32 scores of one layer over
    `heads` (a rank's share; None: all), and fp32 logits of one row per sequence. Good to ~2x, which the
    headroom below absorbs."""
    h = cfg.num_attention_heads if heads is None else heads
    mlp = max(cfg.intermediate_size, cfg.moe_intermediate_size * (cfg.num_experts_per_tok + cfg.n_shared_experts))
    per_token = dtype_bytes * (4 * cfg.hidden_size + 3 * mlp + h * (2 * cfg.qk_head_dim + 2 * cfg.v_head_dim))
    scores = 4 * h * min(tokens, 8192) ** 2  # SDPA's math path materialises them; flash kernels do not
    return tokens * per_token + scores + 4 * cfg.vocab_size * 64


@dataclass(frozen=True)
class MemoryPlan:
    weights: int
    activations: int
    cache_per_token: int
    budget: int  # bytes dsq may use on the device
    cache_tokens: int  # what the cache can hold, all sequences together


def memory_plan(cfg: Config, weights: int, total: int, free: int, utilization: float = 0.9,
                kv_cache_dtype: str = "fp8", need_tokens: int = CONTEXT, prefill_tokens: int = PREFILL,
                dtype_bytes: int = 2, int4_experts: bool = True, heads: int | None = None) -> MemoryPlan:
    """Size the cache from what is left of `utilization` x the device's memory (minus what others hold) once
    weights and activations (over `heads`, a rank's share) are placed; refuse, saying what to change, if
    `need_tokens` do not fit."""
    if not 0 < utilization <= 1:
        raise DsqError(f"gpu_memory_utilization must be in (0, 1], got {utilization}")
    budget = int(total * utilization) - (total - free)
    act = activation_bytes(cfg, prefill_tokens, dtype_bytes, heads)
    per_token = bytes_per_token(cfg, kv_cache_dtype)
    tokens = max((budget - weights - act) // per_token, 0)
    if tokens < need_tokens:
        need = weights + act + need_tokens * per_token
        hints = [f"a shorter context (about {max(tokens, 0):,} tokens fit)" if tokens > 0 else None,
                 None if int4_experts else "INT4 routed experts (dsq quantize, the default scheme)",
                 "kv_cache_dtype='fp8'" if kv_cache_dtype != "fp8" else None,
                 "--tp N to spread the model over N GPUs", "a higher gpu_memory_utilization"]
        raise DsqError(f"the model does not fit: it needs {need / GB:.1f} GB (weights {weights / GB:.1f} GB, "
                       f"activations {act / GB:.1f} GB, cache for {need_tokens:,} tokens "
                       f"{need_tokens * per_token / GB:.1f} GB) but {budget / GB:.1f} GB are free for dsq "
                       f"({utilization:.0%} of {total / GB:.1f} GB, {(total - free) / GB:.1f} GB in use); "
                       f"try {', '.join(h for h in hints if h)}")
    return MemoryPlan(weights, act, per_token, budget, tokens)


def rank_plan(cfg: Config, scheme: Scheme, total: int, free: int, dtype: torch.dtype = torch.bfloat16,
              kv_cache_dtype: str = "fp8", utilization: float = 0.9, tokens: int = CONTEXT, rank: int = 0,
              world: int = 1, backend: str = "triton") -> MemoryPlan:
    """The plan of `rank` of a `world`-rank job on a device of `total` bytes, `free` of them free: its weights
    (its slices and experts, in `scheme`'s formats) and the activations of its heads, a cache of at least
    `tokens` tokens (the cache is replicated: what one rank holds is the job's capacity)."""
    weights = sum(weight_bytes(cfg, scheme, dtype, world, rank, backend).values())
    heads = shard_plan(cfg, world, scheme)[rank].heads
    return memory_plan(cfg, weights, total, free, utilization, kv_cache_dtype, need_tokens=tokens,
                       prefill_tokens=min(tokens, PREFILL), dtype_bytes=torch.empty(0, dtype=dtype).element_size(),
                       int4_experts=scheme.uses(Int4Group), heads=heads[1] - heads[0])


def check_fits(folder: Path, device: torch.device, dtype: torch.dtype, kv_cache_dtype: str, utilization: float,
               tokens: int, rank: int = 0, world: int = 1, scheme: Scheme | None = None,
               backend: str = "triton") -> MemoryPlan:
    """Run the memory planner against the device's free memory before anything is allocated."""
    cfg, declared = read_config(folder)
    free, total = torch.cuda.mem_get_info(device)
    return rank_plan(cfg, scheme or declared, total, free, dtype, kv_cache_dtype, utilization, tokens, rank, world,
                     backend)
