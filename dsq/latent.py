"""The MLA latent cache's format and its plain-torch maths: what the CPU runtime runs and what the kernels of
kernels/mla_cache.py and kernels/mla_decode.py are tested against. Imports torch only, so the torch backend
runs without Triton.

Per layer the cache is a pool of fixed-size pages of token slots. A sequence owns a row of a page table
[B, max_pages] int32 (the ids of its pages, in order) and a length in seq_lens [B] int32; token t of
sequence b lives in slot page_table[b, t // page_size] * page_size + t % page_size. Per token the cache holds
RMSNorm(c) [C] and the roped k_pe [R] (DeepSeek-V2 paper, arXiv 2405.04434, section 2.1), in one of the
layouts of KV_CACHE_DTYPES:

- "fp8" (FlashMLA's FP8 layout): the latent in float8_e4m3fn with one fp32 scale per token and 128-wide
  channel group (scale = amax / 448), the rope part in bf16: 512 + 16 + 128 = 656 B per token.
- "bf16": latent and rope part in bf16: 1,152 B per token.
- "fp32": both in fp32, the exact reference cache of the CPU runtime (the kernels refuse it): 2,304 B.

Why per token and group: relative error of the attention output o_lat on random latents with
per-channel outliers, against the bf16 cache (tests/test_mla_kernels.py::test_scale_granularity):

    scales                         spread attention   peaked attention
    one per layer (vLLM)           1.1e-2             3.3e-2
    one per token                  9.1e-3             3.1e-2
    per token and 128-group        6.3e-3             2.1e-2
    same, power-of-two scales      1.2e-2             3.6e-2

Scales are therefore exact fp32 amax / 448 rather than powers of two: the group's largest element is
then stored exactly, which matters when an outlier channel dominates the group.

The three parts are separate tensors rather than one uint8 [..., 656] buffer: each is contiguous per
page and aligned for vector loads, typed for torch (references, gathers), and the kernels need no
pointer casts; the bytes per token are the same.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from dsq.quant import FP8, FP8_MAX

KV_CACHE_DTYPES = ("fp8", "bf16", "fp32")
GROUP = 128  # latent channels per fp8 scale (all of them when the latent is narrower, as in tiny test models)
MIN_SCALE = 1e-30  # keeps an all-zero group finite (0 / scale); tiny enough that a tiny group stays exact


class LatentPool(NamedTuple):
    """One layer's cache pages. Slot s is row s of kv.view(-1, C), scale.view(-1, C // GROUP), pe.view(-1, R)."""

    kv: torch.Tensor  # [num_pages, page_size, C] float8_e4m3fn ("fp8"), bfloat16 ("bf16") or float32 ("fp32")
    scale: torch.Tensor | None  # [num_pages, page_size, C // GROUP] fp32 ("fp8"); None otherwise
    pe: torch.Tensor  # [num_pages, page_size, R] bfloat16 (float32 for "fp32")

    @property
    def kv_cache_dtype(self) -> str:
        """One of KV_CACHE_DTYPES."""
        return "fp8" if self.scale is not None else "bf16" if self.kv.dtype == torch.bfloat16 else "fp32"

    @property
    def page_size(self) -> int:
        return self.kv.shape[1]


def group_size(kv_lora_rank: int) -> int:
    return min(GROUP, kv_lora_rank)


def cache_bytes_per_token(kv_cache_dtype: str, kv_lora_rank: int = 512, rope_dim: int = 64) -> int:
    """Cache bytes per token per layer: 656 ("fp8"), 1,152 ("bf16") or 2,304 ("fp32") for DeepSeek-V2."""
    if kv_cache_dtype == "fp8":
        return kv_lora_rank + 4 * (kv_lora_rank // group_size(kv_lora_rank)) + 2 * rope_dim
    if kv_cache_dtype in KV_CACHE_DTYPES:
        return (2 if kv_cache_dtype == "bf16" else 4) * (kv_lora_rank + rope_dim)
    raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, not {kv_cache_dtype!r}")


def alloc_pool(num_pages: int, page_size: int, kv_cache_dtype: str, device: torch.device | str,
               kv_lora_rank: int = 512, rope_dim: int = 64) -> LatentPool:
    """A zeroed pool (so a stray read of an unused slot gives 0, not NaN bytes)."""
    cache_bytes_per_token(kv_cache_dtype, kv_lora_rank, rope_dim)  # validates kv_cache_dtype
    gs = group_size(kv_lora_rank)
    assert kv_lora_rank % gs == 0, f"kv_lora_rank {kv_lora_rank} must be a multiple of {GROUP}"
    shape = (num_pages, page_size)
    dtype = torch.float32 if kv_cache_dtype == "fp32" else torch.bfloat16
    pe = torch.zeros(*shape, rope_dim, dtype=dtype, device=device)
    if kv_cache_dtype != "fp8":
        return LatentPool(torch.zeros(*shape, kv_lora_rank, dtype=dtype, device=device), None, pe)
    kv = torch.zeros(*shape, kv_lora_rank, dtype=FP8, device=device)
    scale = torch.zeros(*shape, kv_lora_rank // gs, dtype=torch.float32, device=device)
    return LatentPool(kv, scale, pe)


def as_fp32(v: float) -> float:
    """v rounded to fp32, the precision a float kernel argument has on the GPU."""
    return float(torch.tensor(v, dtype=torch.float32))


def check_write(pool: LatentPool, kv_a: torch.Tensor, norm_weight: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, slots: torch.Tensor) -> tuple[int, int]:
    """The inputs of a cache write, as both write_latent_cache and its reference take them -> (C, R)."""
    c, r = pool.kv.shape[2], pool.pe.shape[2]
    n = kv_a.shape[0]
    assert kv_a.dim() == 2 and kv_a.shape[1] == c + r and kv_a.stride(1) == 1, f"kv_a {tuple(kv_a.shape)}"
    assert norm_weight.shape == (c,) and norm_weight.is_contiguous()
    for t in (cos, sin):
        assert t.shape == (n, r // 2) and t.dtype == torch.float32 and t.is_contiguous(), "cos/sin [N, R/2] fp32"
    assert slots.shape == (n,) and slots.dtype in (torch.int32, torch.int64)
    return c, r


def write_latent_cache_ref(pool: LatentPool, kv_a: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                           cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor) -> None:
    """Store N new tokens: kv_a [N, C+R] (kv_a_proj_with_mqa output) -> their slots [N], the latent RMSNorm'd
    with kv_a_layernorm's weight [C] and eps, k_pe rotated by cos/sin [N, R/2] fp32. The fused kernel's ops
    in its order (fp64 mean of squares, fp32 otherwise), so the two are bit-exact."""
    c, r = check_write(pool, kv_a, norm_weight, cos, sin, slots)
    x = kv_a[:, :c].float()
    x64 = x.double()
    rms = (1.0 / torch.sqrt((x64 * x64).sum(-1, keepdim=True) / c + as_fp32(eps))).float()
    y = x * rms * norm_weight.float()
    slots = slots.long()
    if pool.kv_cache_dtype == "fp8":
        gs = group_size(c)
        g = y.view(-1, c // gs, gs)
        scale = (g.abs().amax(-1) / FP8_MAX).clamp_min(MIN_SCALE)
        q = (g / scale[..., None]).to(FP8)
        pool.kv.view(torch.uint8).view(-1, c)[slots] = q.view(torch.uint8).view(-1, c)
        pool.scale.view(-1, c // gs)[slots] = scale
    else:
        pool.kv.view(-1, c)[slots] = y.to(pool.kv.dtype)
    x0, x1 = kv_a[:, c::2].float(), kv_a[:, c + 1::2].float()
    pe = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    pool.pe.view(-1, r)[slots] = pe.to(pool.pe.dtype)


def gather_latents(pool: LatentPool, page_table: torch.Tensor, seq_lens: torch.Tensor,
                   max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's dequantized cache: latents [B, S, C] and rope keys [B, S, R], fp32, zero past seq_len.

    S = max_len, by default the page table's capacity (a host-side shape: no device sync). Prefill that
    continues a cached sequence reads its history through this.
    """
    ps, c, r = pool.page_size, pool.kv.shape[2], pool.pe.shape[2]
    s = page_table.shape[1] * ps if max_len is None else max_len
    assert s <= page_table.shape[1] * ps, f"max_len {s} exceeds the page table ({page_table.shape[1]} pages)"
    t = torch.arange(s, device=page_table.device)
    valid = t[None, :] < seq_lens[:, None]
    slots = torch.where(valid, page_table[:, t // ps].long() * ps + t % ps, 0)
    if pool.kv_cache_dtype == "fp8":
        g = pool.kv.view(torch.uint8).view(-1, c)[slots].view(FP8).float()
        gs = group_size(c)
        scale = pool.scale.view(-1, c // gs)[slots]
        lat = (g.view(*slots.shape, c // gs, gs) * scale[..., None]).view(*slots.shape, c)
    else:
        lat = pool.kv.view(-1, c)[slots].float()
    pe = pool.pe.view(-1, r)[slots].float()
    keep = valid[..., None]
    return torch.where(keep, lat, 0.0), torch.where(keep, pe, 0.0)


def mla_decode_ref(q_lat: torch.Tensor, q_pe: torch.Tensor, pool: LatentPool, page_table: torch.Tensor,
                   seq_lens: torch.Tensor, scale: float, max_len: int | None = None) -> torch.Tensor:
    """Absorbed decode attention (kernels/mla_decode.py's maths): gather and dequantize the pages, matmul,
    fp32 softmax; o_lat [B, H, C] fp32 for q_lat [B, H, C] and roped q_pe [B, H, R].

    Batched over sequences. max_len (>= every seq_len) defaults to max(seq_lens), a device sync that the
    CPU path does not mind.
    """
    s = int(seq_lens.max()) if max_len is None else max_len
    lat, pe = gather_latents(pool, page_table, seq_lens, s)
    scores = (q_lat.float() @ lat.transpose(1, 2) + q_pe.float() @ pe.transpose(1, 2)) * scale
    valid = torch.arange(s, device=seq_lens.device)[None, :] < seq_lens[:, None]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # an empty sequence attends to nothing
    return p @ lat
