"""Dynamic FP8 (e4m3fn) activation quantization, per token or per token and 1xG group; and the SwiGLU product
silu(gate) * up quantized the same way in one launch (what a down_proj GEMM reads).

Matches `dsq.quant.fp8_quantize_act` bit for bit: scale = max(amax, 1e-12) / 448 and q = rne(x / scale),
both with IEEE division. The fp32 -> fp8 rounding is `common.round_e4m3`
(integer ops: the interpreter's cast is wrong).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsq.quant import FP8, FP8_MAX

from .common import cast_out, round_e4m3


@triton.jit
def token_scales(a_rows, m_mask, K, FMAX: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    """Per-token scales [BM] of unquantized rows (pointers a_rows [BM, 1]): a pass over the whole row."""
    amax = tl.zeros([BM], dtype=tl.float32)
    for t in range(0, tl.cdiv(K, BK)):
        offs_k = t * BK + tl.arange(0, BK)
        x = tl.load(a_rows + offs_k[None, :], mask=m_mask[:, None] & (offs_k[None, :] < K), other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
    return tl.math.div_rn(tl.maximum(amax, 1e-12), FMAX)


@triton.jit
def group_scales(x, FMAX: tl.constexpr):
    """Per-row scales [BM] of an fp32 tile [BM, 128] that is one 1x128 activation group."""
    return tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=1), 1e-12), FMAX)


@triton.jit
def quantize_tile(x, scale, FMAX: tl.constexpr):
    """fp32 [BM, BK] / scale [BM] -> fp8 e4m3 [BM, BK], exactly as act_quant rounds."""
    v = tl.minimum(tl.maximum(tl.math.div_rn(x, scale[:, None]), -FMAX), FMAX)
    return round_e4m3(v).to(tl.uint8).to(tl.float8e4nv, bitcast=True)


@triton.jit
def _row(x_ptr, u_ptr, offs, mask, SWIGLU: tl.constexpr, DTYPE: tl.constexpr):
    """A slice of the row to quantize: x itself, or with SWIGLU silu(x) * u as torch computes it on 16-bit
    tensors (silu in fp32 rounded to DTYPE, then the product, exact in fp32, rounded again)."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if SWIGLU:
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = cast_out(tl.math.div_rn(x, 1.0 + tl.exp(-x)), DTYPE).to(tl.float32)
        x = cast_out(s * u, DTYPE).to(tl.float32)
    return x


@triton.jit
def _act_quant_kernel(
    x_ptr, u_ptr, q_ptr, s_ptr, K, GROUP, stride_xm, stride_qm, stride_sm,
    SWIGLU: tl.constexpr, DTYPE: tl.constexpr, FMAX: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program per (token, group): amax pass, then a quantize pass over the same (cached) slice; with
    SWIGLU the product is computed in both passes (cheaper than storing it)."""
    m = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    start = g * GROUP
    end = tl.minimum(start + GROUP, K)
    x_ptr += m * stride_xm
    u_ptr += m * stride_xm
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(start, end, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        amax = tl.maximum(amax, tl.abs(_row(x_ptr, u_ptr, offs, offs < end, SWIGLU, DTYPE)))
    scale = tl.math.div_rn(tl.maximum(tl.max(amax, axis=0), 1e-12), FMAX)
    tl.store(s_ptr + m * stride_sm + g, scale)
    for k0 in range(start, end, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        v = tl.math.div_rn(_row(x_ptr, u_ptr, offs, offs < end, SWIGLU, DTYPE), scale)
        v = tl.minimum(tl.maximum(v, -FMAX), FMAX)
        tl.store(q_ptr + m * stride_qm + offs, round_e4m3(v).to(tl.uint8), mask=offs < end)


def act_quant(x: torch.Tensor, group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (bf16/fp16/fp32) -> (q fp8_e4m3fn [M, K], scale fp32 [M, 1] or [M, ceil(K / group)]).

    `group=None` scales per token (channel-scaled FP8 weights); `group=128` per 1x128 slice (block scales)."""
    assert x.dim() == 2 and x.stride(1) == 1, f"act_quant wants a row-major 2-D tensor, got {tuple(x.shape)}"
    return _launch(x, None, group)


def silu_mul_quant(
    gate: torch.Tensor, up: torch.Tensor, group: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """act_quant(silu(gate) * up, group) for gate, up [M, K] of one dtype, as act_quant returns it: one launch
    instead of three (silu, mul, quantize) and no [M, K] product in memory. gate and up may be the two halves
    of one joined GEMM's output (row views with a common stride)."""
    assert gate.shape == up.shape and gate.dim() == 2 and gate.dtype == up.dtype, (gate.shape, up.shape)
    assert gate.stride() == up.stride() and gate.stride(1) == 1, "gate and up must be row-major with one stride"
    return _launch(gate, up, group)


def _launch(x: torch.Tensor, up: torch.Tensor | None, group: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    assert x.dtype in (torch.bfloat16, torch.float16, torch.float32), x.dtype
    m, k = x.shape
    g = k if group is None else group
    assert g > 0 and k > 0, (group, k)
    n_groups = triton.cdiv(k, g)
    q = torch.empty(m, k, dtype=FP8, device=x.device)
    scale = torch.empty(m, n_groups, dtype=torch.float32, device=x.device)
    if m == 0:
        return q, scale
    block = min(triton.next_power_of_2(g), 2048)
    dtype = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[x.dtype]
    _act_quant_kernel[(m, n_groups)](
        x, x if up is None else up, q.view(torch.uint8), scale, k, g, x.stride(0), q.stride(0), scale.stride(0),
        SWIGLU=up is not None, DTYPE=dtype, FMAX=FP8_MAX, BLOCK=block, num_warps=4 if block <= 1024 else 8,
    )
    return q, scale
