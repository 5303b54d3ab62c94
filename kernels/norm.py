"""Fused residual add + RMSNorm (+ the FP8 activation quantization of the normed output), one program per token.

Replaces the ~8 torch ops of `x = x + residual; rms_norm(x)` (and act_quant after it) with one launch, computing
what dsq.model.RMSNorm computes: the sum rounded to x's dtype, h = x * rsqrt(mean(x^2) + eps) in fp32 rounded to
x's dtype, then weight * h rounded again. The mean is a different fp32 summation order than torch's (so h may
differ by one rounding of x's dtype); the add and the quantization are exact: with `quant`, (q, scale) are
bit for bit `act_quant(out, group)` of this kernel's own output, so they feed fp8_gemm_q directly.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from dsq.quant import FP8, FP8_MAX

from .common import cast_out, round_e4m3


class Normed(NamedTuple):
    """x: the residual stream (x + residual); out: its RMSNorm; q, scale: act_quant(out) when asked, else None."""

    x: torch.Tensor
    out: torch.Tensor
    q: torch.Tensor | None
    scale: torch.Tensor | None


@triton.jit
def _fp8_quantize_row(y, q_ptr, s_ptr, offs, K, FMAX: tl.constexpr, GROUP: tl.constexpr, BLOCK: tl.constexpr):
    """Store the fp8 row of y [BLOCK] and its scales: one per row (GROUP == 0) or one per GROUP-wide slice."""
    if GROUP == 0:
        scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(y), axis=0), 1e-12), FMAX)
        tl.store(s_ptr, scale)
        v = tl.math.div_rn(y, scale)
    else:
        groups = tl.reshape(y, (BLOCK // GROUP, GROUP))
        scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(groups), axis=1), 1e-12), FMAX)
        g = tl.arange(0, BLOCK // GROUP)
        tl.store(s_ptr + g, scale, mask=g * GROUP < K)
        v = tl.reshape(tl.math.div_rn(groups, scale[:, None]), (BLOCK,))
    v = tl.minimum(tl.maximum(v, -FMAX), FMAX)
    tl.store(q_ptr + offs, round_e4m3(v).to(tl.uint8), mask=offs < K)


@triton.jit
def _add_rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, sum_ptr, out_ptr, q_ptr, s_ptr, K, eps,
    stride_x, stride_r, stride_sum, stride_out, stride_q, stride_s,
    HAS_RESIDUAL: tl.constexpr, QUANT: tl.constexpr, GROUP: tl.constexpr, FMAX: tl.constexpr, BLOCK: tl.constexpr,
):
    m = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < K
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + m * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:  # the sum rounded to the stream's dtype, as torch's x + residual
        x = cast_out(x + tl.load(r_ptr + m * stride_r + offs, mask=mask, other=0.0).to(tl.float32), dtype)
        tl.store(sum_ptr + m * stride_sum + offs, x, mask=mask)
        x = x.to(tl.float32)
    h = x * tl.math.rsqrt(tl.sum(x * x, axis=0) / K + eps)
    h = cast_out(h, dtype).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = cast_out(w * h, dtype)  # the product of two 16-bit floats is exact in fp32: one rounding, as torch's
    tl.store(out_ptr + m * stride_out + offs, y, mask=mask)
    if QUANT:
        _fp8_quantize_row(y.to(tl.float32), q_ptr + m * stride_q, s_ptr + m * stride_s, offs, K, FMAX, GROUP, BLOCK)


def add_rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None, *,
    quant: bool = False, group: int | None = None,
) -> Normed:
    """RMSNorm of x (+ residual) [..., K] with weight [K]; `quant`: also act_quant(out, group) (None: per token).

    Returns Normed(x + residual (x itself without a residual), out, q [M, K] fp8, scale [M, 1 or ceil(K/group)])."""
    k = x.shape[-1]
    assert weight.shape == (k,) and weight.dtype == x.dtype, (tuple(weight.shape), weight.dtype, x.dtype)
    assert x.dtype in (torch.bfloat16, torch.float16, torch.float32), x.dtype
    flat = x.reshape(-1, k).contiguous()
    m = flat.shape[0]
    res = None if residual is None else residual.reshape(-1, k).contiguous()
    assert res is None or (res.shape == flat.shape and res.dtype == x.dtype), "residual must match x"
    total = flat if res is None else torch.empty_like(flat)
    out = torch.empty_like(flat)
    g = group or 0
    assert g & (g - 1) == 0, f"the quantization group must be a power of two, got {group}"
    block = max(triton.next_power_of_2(k), triton.next_power_of_2(g))
    q = torch.empty(m, k, dtype=FP8, device=x.device) if quant else None
    scale = torch.empty(m, triton.cdiv(k, g) if g else 1, dtype=torch.float32, device=x.device) if quant else None
    if m:
        _add_rms_norm_kernel[(m,)](
            flat, flat if res is None else res, weight, total, out,
            out if q is None else q.view(torch.uint8), out if scale is None else scale, k, eps,
            flat.stride(0), 0 if res is None else res.stride(0), total.stride(0), out.stride(0),
            0 if q is None else q.stride(0), 0 if scale is None else scale.stride(0),
            HAS_RESIDUAL=res is not None, QUANT=quant, GROUP=g, FMAX=FP8_MAX, BLOCK=block,
            num_warps=min(16, max(4, block // 512)),
        )
    shape = x.shape
    return Normed(total.view(shape), out.view(shape), q, scale)
