"""The paged MLA latent cache's fused write: RMSNorm of the latent, rope of k_pe, quantization and store, one
program per new token. The layouts, the pool and the torch references are dsq.latent's.

Bit-exact against dsq.latent.write_latent_cache_ref on the interpreter and on the GPU, because every step is
an op both sides round identically: the mean of squares is summed in fp64 (squares of fp32 inputs are exact
there, so the reduction order cannot show in the fp32 result), fp64 sqrt/div and fp32 div_rn are IEEE, FMA
contraction is switched off for the rope, and the fp32 -> fp8 / bf16 roundings are integer ops (the
interpreter's own float casts round differently from the GPU's: triton-lang/triton#8322), compared against
torch's casts.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsq.latent import MIN_SCALE, LatentPool, as_fp32, check_write, group_size
from dsq.quant import FP8_MAX

from .common import round_bf16, round_e4m3


@triton.jit
def _cache_write_kernel(x_ptr, stride_x, w_ptr, cos_ptr, sin_ptr, slot_ptr, kv_ptr, scale_ptr, pe_ptr, eps,
                        C: tl.constexpr, R: tl.constexpr, GS: tl.constexpr, FP8: tl.constexpr,
                        FMAX: tl.constexpr, MIN_SCALE: tl.constexpr):
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
        scale = tl.maximum(tl.math.div_rn(tl.max(tl.abs(y), axis=1), FMAX), MIN_SCALE)
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


def write_latent_cache(pool: LatentPool, kv_a: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                       cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor) -> None:
    """Store N new tokens: kv_a [N, C+R] (kv_a_proj_with_mqa output, any float dtype) -> their slots [N].

    The latent is RMSNorm'd with kv_a_layernorm's weight [C] and eps, k_pe rotated by cos/sin [N, R/2]
    fp32 (the tables the model already computed for q_pe at the same positions, YaRN mscale included).
    slot = page * page_size + offset, from the caller's page table (dsq.latent).
    """
    c, r = check_write(pool, kv_a, norm_weight, cos, sin, slots)
    assert c & (c - 1) == 0 and r & (r - 1) == 0 and r >= 2, "C and R must be powers of two"
    assert pool.kv_cache_dtype != "fp32", "the fp32 reference cache is written by dsq.latent.write_latent_cache_ref"
    if kv_a.shape[0] == 0:
        return
    fp8 = pool.kv_cache_dtype == "fp8"
    kv = pool.kv.view(torch.uint8 if fp8 else torch.int16)
    _cache_write_kernel[(kv_a.shape[0],)](
        kv_a, kv_a.stride(0), norm_weight, cos, sin, slots, kv, pool.scale if fp8 else kv,
        pool.pe.view(torch.int16), as_fp32(eps), C=c, R=r, GS=group_size(c), FP8=fp8, FMAX=FP8_MAX,
        MIN_SCALE=MIN_SCALE, enable_fp_fusion=False)
