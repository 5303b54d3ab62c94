"""The paged MLA latent cache: its layout, allocation, the fused cache-write kernel and torch references.

Per layer the cache is a pool of fixed-size blocks of tokens. A sequence owns a row of the block table
[B, max_blocks] int32 (the ids of its blocks, in order) and a length in seq_lens [B] int32; token t of
sequence b lives in slot block_table[b, t // block_size] * block_size + t % block_size. Per token the
cache holds RMSNorm(c) [C] and the roped k_pe [R] (DeepSeek-V2 paper, arXiv 2405.04434, section 2.1),
in one of two layouts:

- "fp8" (FlashMLA's FP8 layout): the latent in float8_e4m3fn with one fp32 scale per token and 128-wide
  channel group (scale = amax / 448), the rope part in bf16: 512 + 16 + 128 = 656 B per token.
- "bf16": latent and rope part in bf16: 1,152 B per token.

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
block and aligned for vector loads, typed for torch (references, gathers), and the kernels need no
pointer casts; the bytes per token are the same.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .common import round_bf16, round_e4m3

GROUP = 128  # latent channels per fp8 scale (all of them when the latent is narrower, as in tiny test models)
FP8_MAX = 448.0  # largest finite float8_e4m3fn
_MIN_SCALE = 1e-30  # keeps an all-zero group finite (0 / scale)


class LatentPool(NamedTuple):
    """One layer's cache blocks. Slot s is row s of kv.view(-1, C), scale.view(-1, C // GROUP), pe.view(-1, R)."""

    kv: torch.Tensor  # [num_blocks, block_size, C] float8_e4m3fn ("fp8") or bfloat16 ("bf16")
    scale: torch.Tensor | None  # [num_blocks, block_size, C // GROUP] fp32 ("fp8"); None ("bf16")
    pe: torch.Tensor  # [num_blocks, block_size, R] bfloat16

    @property
    def kv_cache_dtype(self) -> str:
        """"fp8", "bf16", or "fp32" (the exact reference cache of the CPU runtime; the kernels refuse it)."""
        return "fp8" if self.scale is not None else "bf16" if self.kv.dtype == torch.bfloat16 else "fp32"

    @property
    def block_size(self) -> int:
        return self.kv.shape[1]


def group_size(kv_lora_rank: int) -> int:
    return min(GROUP, kv_lora_rank)


def cache_bytes_per_token(kv_cache_dtype: str, kv_lora_rank: int = 512, rope_dim: int = 64) -> int:
    """Cache bytes per token per layer: 656 ("fp8"), 1,152 ("bf16") or 2,304 ("fp32") for DeepSeek-V2."""
    if kv_cache_dtype == "fp8":
        return kv_lora_rank + 4 * (kv_lora_rank // group_size(kv_lora_rank)) + 2 * rope_dim
    if kv_cache_dtype in ("bf16", "fp32"):
        return (2 if kv_cache_dtype == "bf16" else 4) * (kv_lora_rank + rope_dim)
    raise ValueError(f"kv_cache_dtype must be 'fp8', 'bf16' or 'fp32', not {kv_cache_dtype!r}")


def alloc_pool(num_blocks: int, block_size: int, kv_cache_dtype: str, device: torch.device | str,
               kv_lora_rank: int = 512, rope_dim: int = 64) -> LatentPool:
    """A zeroed pool (so a stray read of an unused slot gives 0, not NaN bytes)."""
    cache_bytes_per_token(kv_cache_dtype, kv_lora_rank, rope_dim)  # validates kv_cache_dtype
    gs = group_size(kv_lora_rank)
    assert kv_lora_rank % gs == 0, f"kv_lora_rank {kv_lora_rank} must be a multiple of {GROUP}"
    shape = (num_blocks, block_size)
    dtype = torch.float32 if kv_cache_dtype == "fp32" else torch.bfloat16
    pe = torch.zeros(*shape, rope_dim, dtype=dtype, device=device)
    if kv_cache_dtype != "fp8":
        return LatentPool(torch.zeros(*shape, kv_lora_rank, dtype=dtype, device=device), None, pe)
    kv = torch.zeros(*shape, kv_lora_rank, dtype=torch.float8_e4m3fn, device=device)
    scale = torch.zeros(*shape, kv_lora_rank // gs, dtype=torch.float32, device=device)
    return LatentPool(kv, scale, pe)


# ---------------------------------------------------------------------------------------------------------
# Cache write: RMSNorm of the latent, rope of k_pe, quantize, store; one program per new token.
#
# Bit-exact against write_latent_cache_ref on the interpreter and on the GPU, because every step is an
# op both sides round identically: the mean of squares is summed in fp64 (squares of fp32 inputs are exact
# there, so the reduction order cannot show in the fp32 result), fp64 sqrt/div and fp32 div_rn are IEEE,
# FMA contraction is switched off for the rope, and the fp32 -> fp8 / bf16 roundings are integer ops
# (the interpreter's own float casts round differently from the GPU's: triton-lang/triton#8322), compared
# against torch's casts.
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _cache_write_kernel(x_ptr, stride_x, w_ptr, cos_ptr, sin_ptr, slot_ptr, kv_ptr, scale_ptr, pe_ptr, eps,
                        C: tl.constexpr, R: tl.constexpr, GS: tl.constexpr, FP8: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + i).to(tl.int64)
    G: tl.constexpr = C // GS
    offs = tl.arange(0, G)[:, None] * GS + tl.arange(0, GS)[None, :]  # [G, GS]: the scale groups
    row = x_ptr + i * stride_x
    x = tl.load(row + offs).to(tl.float32)
    x64 = x.to(tl.float64)
    ms = tl.sum(tl.sum(x64 * x64, axis=1), axis=0) / C
    r = (1.0 / tl.sqrt(ms + eps)).to(tl.float32)  # eps: fp32 on the GPU, promoted
    y = x * r * tl.load(w_ptr + offs).to(tl.float32)
    if FP8:
        scale = tl.maximum(tl.math.div_rn(tl.max(tl.abs(y), axis=1), 448.0), 1e-30)
        q = tl.math.div_rn(y, scale[:, None])
        tl.store(kv_ptr + slot * C + offs, round_e4m3(q).to(tl.uint8))
        tl.store(scale_ptr + slot * G + tl.arange(0, G), scale)
    else:
        tl.store(kv_ptr + slot * C + offs, round_bf16(y))
    j = tl.arange(0, R // 2)
    x0 = tl.load(row + C + 2 * j).to(tl.float32)
    x1 = tl.load(row + C + 2 * j + 1).to(tl.float32)
    cos = tl.load(cos_ptr + i * (R // 2) + j)
    sin = tl.load(sin_ptr + i * (R // 2) + j)
    tl.store(pe_ptr + slot * R + 2 * j, round_bf16(x0 * cos - x1 * sin))
    tl.store(pe_ptr + slot * R + 2 * j + 1, round_bf16(x0 * sin + x1 * cos))


def _fp32(v: float) -> float:
    """v rounded to fp32, the precision a float kernel argument has on the GPU."""
    return float(torch.tensor(v, dtype=torch.float32))


def _check_write(pool: LatentPool, kv_a: torch.Tensor, norm_weight: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, slots: torch.Tensor) -> tuple[int, int]:
    c, r = pool.kv.shape[2], pool.pe.shape[2]
    n = kv_a.shape[0]
    assert kv_a.dim() == 2 and kv_a.shape[1] == c + r and kv_a.stride(1) == 1, f"kv_a {tuple(kv_a.shape)}"
    assert norm_weight.shape == (c,) and norm_weight.is_contiguous()
    for t in (cos, sin):
        assert t.shape == (n, r // 2) and t.dtype == torch.float32 and t.is_contiguous(), "cos/sin [N, R/2] fp32"
    assert slots.shape == (n,) and slots.dtype in (torch.int32, torch.int64)
    return c, r


def write_latent_cache(pool: LatentPool, kv_a: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                       cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor) -> None:
    """Store N new tokens: kv_a [N, C+R] (kv_a_proj_with_mqa output, any float dtype) -> their slots [N].

    The latent is RMSNorm'd with kv_a_layernorm's weight [C] and eps, k_pe rotated by cos/sin [N, R/2]
    fp32 (the tables the model already computed for q_pe at the same positions, YaRN mscale included).
    slot = block_id * block_size + offset, from the caller's block table.
    """
    c, r = _check_write(pool, kv_a, norm_weight, cos, sin, slots)
    assert c & (c - 1) == 0 and r & (r - 1) == 0 and r >= 2, "C and R must be powers of two"
    assert pool.kv_cache_dtype != "fp32", "the fp32 reference cache is written by write_latent_cache_ref"
    if kv_a.shape[0] == 0:
        return
    fp8 = pool.kv_cache_dtype == "fp8"
    kv = pool.kv.view(torch.uint8 if fp8 else torch.int16)
    _cache_write_kernel[(kv_a.shape[0],)](
        kv_a, kv_a.stride(0), norm_weight, cos, sin, slots, kv, pool.scale if fp8 else kv,
        pool.pe.view(torch.int16), _fp32(eps), C=c, R=r, GS=group_size(c), FP8=fp8, enable_fp_fusion=False)


def write_latent_cache_ref(pool: LatentPool, kv_a: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                           cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor) -> None:
    """write_latent_cache in torch, the same fp32/fp64 ops in the same order; also the CPU path."""
    c, r = _check_write(pool, kv_a, norm_weight, cos, sin, slots)
    x = kv_a[:, :c].float()
    x64 = x.double()
    rms = (1.0 / torch.sqrt((x64 * x64).sum(-1, keepdim=True) / c + _fp32(eps))).float()
    y = x * rms * norm_weight.float()
    slots = slots.long()
    if pool.kv_cache_dtype == "fp8":
        gs = group_size(c)
        g = y.view(-1, c // gs, gs)
        scale = (g.abs().amax(-1) / FP8_MAX).clamp_min(_MIN_SCALE)
        q = (g / scale[..., None]).to(torch.float8_e4m3fn)
        pool.kv.view(torch.uint8).view(-1, c)[slots] = q.view(torch.uint8).view(-1, c)
        pool.scale.view(-1, c // gs)[slots] = scale
    else:
        pool.kv.view(-1, c)[slots] = y.to(pool.kv.dtype)
    x0, x1 = kv_a[:, c::2].float(), kv_a[:, c + 1::2].float()
    pe = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    pool.pe.view(-1, r)[slots] = pe.to(pool.pe.dtype)


def gather_latents(pool: LatentPool, block_table: torch.Tensor, seq_lens: torch.Tensor,
                   max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's dequantized cache: latents [B, S, C] and rope keys [B, S, R], fp32, zero past seq_len.

    S = max_len, by default the block table's capacity (a host-side shape: no device sync). Prefill that
    continues a cached sequence reads its history through this.
    """
    bs, c, r = pool.block_size, pool.kv.shape[2], pool.pe.shape[2]
    s = block_table.shape[1] * bs if max_len is None else max_len
    assert s <= block_table.shape[1] * bs, f"max_len {s} exceeds the block table ({block_table.shape[1]} blocks)"
    t = torch.arange(s, device=block_table.device)
    valid = t[None, :] < seq_lens[:, None]
    slots = torch.where(valid, block_table[:, t // bs].long() * bs + t % bs, 0)
    if pool.kv_cache_dtype == "fp8":
        g = pool.kv.view(torch.uint8).view(-1, c)[slots].view(torch.float8_e4m3fn).float()
        gs = group_size(c)
        scale = pool.scale.view(-1, c // gs)[slots]
        lat = (g.view(*slots.shape, c // gs, gs) * scale[..., None]).view(*slots.shape, c)
    else:
        lat = pool.kv.view(-1, c)[slots].float()
    pe = pool.pe.view(-1, r)[slots].float()
    keep = valid[..., None]
    return torch.where(keep, lat, 0.0), torch.where(keep, pe, 0.0)
