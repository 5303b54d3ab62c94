"""The MLA latent cache, paged: per layer a pool of fixed-size token blocks, and a block table per sequence.

Per token and layer it holds RMSNorm(c) [kv_lora_rank] and the roped k_pe [rope dim], in one of the
layouts of dsq.kernels.mla_cache: "fp8" (FlashMLA's: e4m3 latent with a scale per 128 channels, bf16 rope
part, 656 B for V2), "bf16" (1,152 B), or "fp32" (the exact reference of the CPU runtime). Writing fuses
RMSNorm + rope + quantization; decode attends the latents themselves (`attend`), and a prefill chunk that
continues a cache expands them per head (`latents`)."""

from __future__ import annotations

import math
import os

import torch

from dsq.config import Config
from dsq.errors import DsqError
from dsq.kernels.mla_cache import (
    alloc_pool,
    cache_bytes_per_token,
    gather_latents,
    write_latent_cache,
    write_latent_cache_ref,
)

KV_CACHE_DTYPES = ("fp8", "bf16", "fp32")


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


class PagedCache:
    def __init__(self, cfg: Config, batch: int, max_len: int, kv_cache_dtype: str = "fp8",
                 device: torch.device | str = "cpu", backend: str = "torch", block_size: int = 64):
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise DsqError(f"kv_cache_dtype {kv_cache_dtype!r} is not one of {', '.join(KV_CACHE_DTYPES)}")
        self.kv_cache_dtype, self.backend, self.max_len, self.block_size = kv_cache_dtype, backend, max_len, block_size
        per_seq = math.ceil(max_len / block_size)
        if torch.device(device).type == "cpu":  # a GPU's cache is sized by the memory planner (dsq.memory)
            need, free = batch * per_seq * block_size * bytes_per_token(cfg, kv_cache_dtype), available_memory()
            if need > free:
                smaller = "" if kv_cache_dtype == "fp8" else ", or kv_cache_dtype='fp8' (the smallest)"
                raise DsqError(f"a {kv_cache_dtype} latent cache of {batch} x {max_len:,} tokens needs "
                               f"{need / 1e9:,.1f} GB, more than the {free / 1e9:,.1f} GB of memory available; "
                               f"give a shorter context (--context, max_seq_len) or fewer prompts{smaller}")
        self.block_table = torch.arange(batch * per_seq, dtype=torch.int32, device=device).view(batch, per_seq)
        self.pools = [alloc_pool(batch * per_seq, block_size, kv_cache_dtype, device, cfg.kv_lora_rank,
                                 cfg.qk_rope_head_dim) for _ in range(cfg.num_hidden_layers)]

    @property
    def kernels(self) -> bool:
        return self.backend == "triton" and self.kv_cache_dtype != "fp32"

    def _slots(self, pos: torch.Tensor) -> torch.Tensor:
        block = self.block_table.gather(1, pos // self.block_size).long()
        return (block * self.block_size + pos % self.block_size).flatten()

    def write(self, layer: int, pos: torch.Tensor, kv_a: torch.Tensor, norm_weight: torch.Tensor, eps: float,
              cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Store new tokens from the kv_a_proj_with_mqa output [B, T, C+R] at positions pos [B, T], RMSNorm'd
        and roped with cos/sin [B, T, R/2] on the way."""
        write = write_latent_cache if self.kernels else write_latent_cache_ref
        half = cos.shape[-1]
        write(self.pools[layer], kv_a.reshape(-1, kv_a.shape[-1]), norm_weight, eps,
              cos.reshape(-1, half).float().contiguous(), sin.reshape(-1, half).float().contiguous(), self._slots(pos))

    def latents(self, layer: int, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached latents [B, S, C] and rope keys [B, S, R] (fp32) of positions 0..max(pos), for queries at
        pos [B, T]; slots past a sequence's last position read as zeros."""
        rows = self.block_table[: pos.shape[0]]  # a graph bucket's cache may hold more rows than this batch
        return gather_latents(self.pools[layer], rows, (pos.amax(dim=1) + 1).int(), int(pos.max()) + 1)

    def attend(self, layer: int, q_lat: torch.Tensor, q_pe: torch.Tensor, pos: torch.Tensor,
               scale: float) -> torch.Tensor:
        """Absorbed attention: o_lat [B, T, H, C] (fp32) for latent queries q_lat [B, T, H, C] and roped
        q_pe [B, T, H, R] at positions pos [B, T]; each query sees the cached tokens at positions <= its own."""
        pool = self.pools[layer]
        if self.kernels and q_lat.shape[1] == 1:
            from dsq.kernels.mla_decode import mla_decode

            lens = (pos[:, 0] + 1).int()
            return mla_decode(q_lat[:, 0].contiguous(), q_pe[:, 0].contiguous(), pool, self.block_table, lens,
                              scale, max_seq_len=self.max_len)[:, None].float()
        lat, pe = self.latents(layer, pos)
        used = lat.shape[1]
        scores = torch.einsum("bthc,bsc->bhts", q_lat.float(), lat) + torch.einsum("bthr,bsr->bhts", q_pe.float(), pe)
        seen = torch.arange(used, device=pos.device) <= pos[:, None, :, None]
        probs = (scores * scale).masked_fill(~seen, float("-inf")).softmax(dim=-1)
        return torch.einsum("bhts,bsc->bthc", probs, lat)
