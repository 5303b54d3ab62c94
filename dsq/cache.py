"""The MLA latent cache, paged: per layer a pool of fixed-size pages of token slots, allocated once, and the
attention metadata of one forward step (where its new tokens go, what each sequence attends).

Per token and layer it holds RMSNorm(c) [kv_lora_rank] and the roped k_pe [rope dim], in one of the
layouts of dsq.latent: "fp8" (FlashMLA's: e4m3 latent with a scale per 128 channels, bf16 rope
part, 656 B for V2), "bf16" (1,152 B), or "fp32" (the exact reference of the CPU runtime). Writing fuses
RMSNorm + rope + quantization. A decode (one new token after a cached context) attends the latents
themselves through its page table (`Attention.decode`); a prefill chunk that continues a cached prefix
expands them per head (`Attention.latents`). Which pages a sequence owns is the engine's business
(dsq/engine/pages.py); the cache only stores and reads slots."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from dsq.config import Config
from dsq.errors import DsqError
from dsq.latent import (
    KV_CACHE_DTYPES,
    alloc_pool,
    cache_bytes_per_token,
    gather_latents,
    mla_decode_ref,
    write_latent_cache_ref,
)

# tokens per page: the unit the engine hands out and shares (a prefix block is one full page: dsq/engine/pages.py);
# the kernels take any page size (mla_decode reads a page table in tiles of its own block_n, 32 tokens)
PAGE_SIZE = 64


def is_decode(length: int, context: int) -> bool:
    """A sequence's slice of a step is a decode, attending the latents through its page table (the absorbed
    path), when it is one new token after a cached context; anything else runs the naive path."""
    return length == 1 and context > 1


def bytes_per_token(cfg: Config, kv_cache_dtype: str) -> int:
    """Cache bytes per token, all layers."""
    return cfg.num_hidden_layers * cache_bytes_per_token(kv_cache_dtype, cfg.kv_lora_rank, cfg.qk_rope_head_dim)


def available_memory() -> int:
    """Bytes of memory this machine can give without swapping: MemAvailable of /proc/meminfo on Linux, else
    the free physical pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class LatentCache:
    """The page pools of every layer: `num_pages` pages of `page_size` slots; slot = page * page_size + offset."""

    def __init__(self, cfg: Config, num_pages: int, page_size: int = PAGE_SIZE, kv_cache_dtype: str = "fp8",
                 device: torch.device | str = "cpu", backend: str = "torch"):
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise DsqError(f"kv_cache_dtype {kv_cache_dtype!r} is not one of {', '.join(KV_CACHE_DTYPES)}")
        self.kv_cache_dtype, self.backend = kv_cache_dtype, backend
        self.num_pages, self.page_size = num_pages, page_size
        if torch.device(device).type == "cpu":  # a GPU's cache is sized by the memory planner (dsq.memory)
            need, free = num_pages * page_size * bytes_per_token(cfg, kv_cache_dtype), available_memory()
            if need > free:
                smaller = "" if kv_cache_dtype == "fp8" else ", or kv_cache_dtype='fp8' (the smallest)"
                raise DsqError(f"a {kv_cache_dtype} latent cache of {num_pages * page_size:,} tokens needs "
                               f"{need / 1e9:,.1f} GB, more than the {free / 1e9:,.1f} GB of memory available; "
                               f"give a shorter context (--context, max_seq_len) or fewer sequences{smaller}")
        self.pools = [alloc_pool(num_pages, page_size, kv_cache_dtype, device, cfg.kv_lora_rank,
                                 cfg.qk_rope_head_dim) for _ in range(cfg.num_hidden_layers)]

    @property
    def kernels(self) -> bool:
        return self.backend == "triton" and self.kv_cache_dtype != "fp32"

    def write(self, layer: int, slots: torch.Tensor, kv_a: torch.Tensor, norm_weight: torch.Tensor, eps: float,
              cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Store new tokens from the kv_a_proj_with_mqa output [N, C+R] at slots [N], RMSNorm'd and roped with
        cos/sin [N, R/2] on the way."""
        cos, sin = cos.float().contiguous(), sin.float().contiguous()
        if self.kernels:
            from dsq.kernels import write_latent_cache

            write_latent_cache(self.pools[layer], kv_a, norm_weight, eps, cos, sin, slots)
        else:
            write_latent_cache_ref(self.pools[layer], kv_a, norm_weight, eps, cos, sin, slots)


@dataclass(frozen=True)
class Prefill:
    """A prefill chunk: new tokens [start, start + length) of the step, the last `length` of `context`
    positions; `pages` [1, max_pages] int32 is its page table."""

    start: int
    length: int
    context: int
    pages: torch.Tensor

    @property
    def fresh(self) -> bool:
        """Nothing cached before it: it attends its own exact latents, not the cache's rounded ones."""
        return self.context == self.length


@dataclass(frozen=True)
class Attention:
    """Where a step's tokens are cached and what they attend. `slots` [N]: each new token's slot. Decodes:
    their rows [Bd] in the step, page tables [Bd, max_pages] int32 and context lengths [Bd] int32 (a CUDA
    graph replays them with new contents); `max_context` bounds the lengths (host-side, for the kernel's
    split count). Prefill chunks are listed one by one."""

    cache: LatentCache
    slots: torch.Tensor
    decode_rows: torch.Tensor
    decode_pages: torch.Tensor
    decode_lens: torch.Tensor
    max_context: int
    prefills: tuple[Prefill, ...] = ()

    @classmethod
    def build(cls, cache: LatentCache, seqs: list[tuple[int, int, int, list[int]]], slots: list[int],
              device: torch.device | str) -> Attention:
        """From host-side lists: per sequence (start, length, context, pages), and every new token's slot."""
        as_int = lambda rows: torch.tensor(rows, dtype=torch.int32, device=device)
        width = max((len(p) for *_, p in seqs), default=1)
        decodes = [s for s in seqs if is_decode(s[1], s[2])]
        prefills = tuple(Prefill(start, n, ctx, as_int([pages])) for start, n, ctx, pages in seqs
                         if not is_decode(n, ctx))
        return cls(cache, torch.tensor(slots, dtype=torch.long, device=device),
                   torch.tensor([s[0] for s in decodes], dtype=torch.long, device=device),
                   as_int([p + [0] * (width - len(p)) for *_, p in decodes]).view(len(decodes), width),
                   as_int([s[2] for s in decodes]), max((s[2] for s in decodes), default=1), prefills)

    def latents(self, layer: int, seq: Prefill) -> tuple[torch.Tensor, torch.Tensor]:
        """A sequence's cached latents [S, C] and rope keys [S, R] (fp32) of positions 0..context-1."""
        lens = torch.full((1,), seq.context, dtype=torch.int32, device=seq.pages.device)
        kv, pe = gather_latents(self.cache.pools[layer], seq.pages, lens, seq.context)
        return kv[0], pe[0]

    def decode(self, layer: int, q_lat: torch.Tensor, q_pe: torch.Tensor, scale: float) -> torch.Tensor:
        """Absorbed attention of the decodes: o_lat [Bd, H, C] (fp32) for latent queries q_lat [Bd, H, C] and
        roped q_pe [Bd, H, R]; each sees its whole context, its new token included."""
        pool = self.cache.pools[layer]
        if self.cache.kernels:
            from dsq.kernels import mla_decode

            return mla_decode(q_lat.contiguous(), q_pe.contiguous(), pool, self.decode_pages, self.decode_lens,
                              scale, max_seq_len=self.max_context).float()
        return mla_decode_ref(q_lat, q_pe, pool, self.decode_pages, self.decode_lens, scale, self.max_context)
