"""The memory planner: before anything is allocated on a GPU, weights + activations + cache against what is
free, so a model that does not fit gets a sentence saying what to change instead of an out-of-memory trace."""

from __future__ import annotations

from dataclasses import dataclass, replace
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


def activation_bytes(cfg: Config, tokens: int, dtype_bytes: int = 2) -> int:
    """A bound on the transient memory of one forward over `tokens` tokens (prefill, naive attention):
    the residual stream and the widest MLP / MoE intermediate, expanded K/V and fp32 scores of one layer, and
    fp32 logits of one row per sequence. Good to ~2x, which the headroom below absorbs."""
    h = cfg.num_attention_heads
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

    def describe(self) -> str:
        return (f"weights {self.weights / GB:.2f} GB + activations {self.activations / GB:.2f} GB + cache "
                f"{self.cache_tokens:,} tokens x {self.cache_per_token / 1e3:.1f} KB = "
                f"{(self.weights + self.activations + self.cache_tokens * self.cache_per_token) / GB:.2f} GB "
                f"of {self.budget / GB:.2f} GB")


def memory_plan(cfg: Config, weights: int, total: int, free: int, utilization: float = 0.9,
                kv_cache_dtype: str = "fp8", need_tokens: int = 4096, prefill_tokens: int = 4096,
                dtype_bytes: int = 2, int4_experts: bool = True) -> MemoryPlan:
    """Size the cache from what is left of `utilization` x the device's memory (minus what others hold) once
    weights and activations are placed; refuse, saying what to change, if `need_tokens` do not fit."""
    if not 0 < utilization <= 1:
        raise DsqError(f"gpu_memory_utilization must be in (0, 1], got {utilization}")
    budget = int(total * utilization) - (total - free)
    act = activation_bytes(cfg, prefill_tokens, dtype_bytes)
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


def cache_tokens(cfg: Config, world: int, gpu_bytes: int, scheme: Scheme | None = None,
                 kv_cache_dtype: str = "fp8", prefill: int = 4096, overhead: int = 1 << 30) -> dict[str, int]:
    """The memory plan of one GPU of `gpu_bytes` in a `world`-GPU job: rank 0's weights (it holds the most),
    the activations of a `prefill`-token forward over its heads (`activation_bytes`), `overhead` for the CUDA
    context and NCCL buffers, and how many tokens of latent cache the rest holds. The cache is replicated,
    so that is the job's capacity too, shared by all sequences."""
    weights = sum(weight_bytes(cfg, scheme, world=world).values())
    heads = shard_plan(cfg, world, scheme)[0].heads
    act = activation_bytes(replace(cfg, num_attention_heads=heads[1] - heads[0]), prefill)
    free = gpu_bytes - weights - act - overhead
    per_token = bytes_per_token(cfg, kv_cache_dtype)
    return {"weights": weights, "activations": act, "overhead": overhead, "free": free, "per_token": per_token,
            "tokens": max(free, 0) // per_token}


def check_fits(folder: Path, device: torch.device, dtype: torch.dtype, kv_cache_dtype: str, utilization: float,
               tokens: int, rank: int = 0, world: int = 1, scheme: Scheme | None = None,
               backend: str = "triton") -> MemoryPlan:
    """Run the memory planner against the device's free memory before anything is allocated."""
    cfg, declared = read_config(folder)
    scheme = scheme or declared
    int4 = scheme.uses(Int4Group)
    free, total = torch.cuda.mem_get_info(device)
    weights = sum(weight_bytes(cfg, scheme, dtype, world, rank, backend).values())  # this rank's slices and experts
    return memory_plan(cfg, weights, total, free, utilization, kv_cache_dtype, need_tokens=tokens,
                       prefill_tokens=min(tokens, 4096), dtype_bytes=torch.empty(0, dtype=dtype).element_size(),
                       int4_experts=int4)
