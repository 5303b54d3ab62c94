"""Helpers shared by several kernels: launch configuration, split-K, tile order, and the fp32 -> e4m3 / bf16
roundings.

The roundings are integer ops rather than casts because Triton's interpreter casts fp32 -> fp8 wrongly (no
carry into the exponent, garbage for subnormals) and truncates fp32 -> bf16; doing them by hand lets the GPU
and the interpreter run the same code, bit-exact against torch's casts (tests/test_mla_kernels.py).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


# --- rounding -----------------------------------------------------------------------------------------------
@triton.jit
def round_e4m3(x):
    """fp32 -> float8_e4m3fn bit pattern (int32 0..255): round to nearest even, saturating at 448."""
    u = x.to(tl.int32, bitcast=True)
    a = u & 0x7FFFFFFF
    exp = a >> 23
    # normal (|x| >= 2^-6, fp32 exponent >= 121): keep 3 mantissa bits, rebias 127 -> 7 (960 = 120 << 3)
    normal = tl.minimum(((a + 0x7FFFF + ((a >> 20) & 1)) >> 20) - 960, 126)
    # subnormal: k * 2^-9 with k = the 24-bit significand shifted right by 141 - exp, rounded half to even
    shift = tl.minimum(141 - exp, 31)
    m = (a & 0x7FFFFF) | 0x800000
    sub = (m + ((1 << (shift - 1)) - 1) + ((m >> shift) & 1)) >> shift
    return tl.where(exp >= 121, normal, sub) | (((u >> 31) & 1) << 7)


@triton.jit
def round_bf16(x):
    """fp32 -> bfloat16 bit pattern (int16): round to nearest even."""
    u = x.to(tl.int32, bitcast=True)
    a = u & 0x7FFFFFFF
    r = (a + 0x7FFF + ((a >> 16) & 1)) >> 16
    return (r | (((u >> 31) & 1) << 15)).to(tl.int16)


# --- launching ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GemmConfig:
    """Tile sizes and launch options; `split_k` > 1 splits K over programs (fp32 partials, then a sum)."""

    bm: int
    bn: int
    bk: int
    split_k: int = 1
    group_m: int = 8
    warps: int = 4
    stages: int = 3

    def check(self) -> None:
        # the GPU compiler rejects dot tiles under 16 (the interpreter does not, so assert here)
        assert min(self.bm, self.bn, self.bk) >= 16, f"tl.dot tiles must be >= 16: {self}"
        assert self.split_k >= 1


def mma_warps(bm: int, bn: int, most: int) -> int:
    """Warps for a [bm, bn] dot tile: at most one per 16 x 8 block of mma.sync, as Triton lays any more
    over the same output (warps repeating each other's work; tests/test_compile.py checks)."""
    return max(1, min(most, (bm // 16) * (bn // 8)))


def interpreted(t: torch.Tensor) -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1 on CPU tensors)."""
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    assert interp or t.is_cuda, "Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors"
    return interp or not t.is_cuda


@functools.cache
def _device_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(t: torch.Tensor) -> int:
    """SMs of t's GPU; 4 under the interpreter so that small test shapes still exercise split-K."""
    return _device_sms(t.device.index or 0) if t.is_cuda else 4


@triton.jit
def cast_out(v, dtype: tl.constexpr):
    """fp32 -> the output type, rounding to nearest even (bf16 through `round_bf16`, see above)."""
    if dtype == tl.bfloat16:
        return round_bf16(v).to(tl.bfloat16, bitcast=True)
    return v.to(dtype)


@triton.jit
def rope_rows(src_ptr, cos_ptr, sin_ptr, dst_ptr, rows, mask, stride_src, stride_cs, stride_dst, R: tl.constexpr,
              BR: tl.constexpr, ROPE: tl.constexpr):
    """dst[row, :R] = src[row, :R] with its consecutive pairs (x[2j], x[2j+1]) rotated by cos/sin[row, j]
    (ROPE; else copied) for the int64 rows [BT] where mask: dsq.rope.apply_rope's fp32 ops in its order, rounded
    once to dst's dtype, so the launch must turn FMA contraction off (enable_fp_fusion=False) to match it."""
    j = tl.arange(0, BR)[None, :]
    pair = mask[:, None] & (j < R // 2)
    src = src_ptr + rows[:, None] * stride_src + 2 * j
    dst = dst_ptr + rows[:, None] * stride_dst + 2 * j
    x0 = tl.load(src, mask=pair, other=0.0)
    x1 = tl.load(src + 1, mask=pair, other=0.0)
    if ROPE:
        cos = tl.load(cos_ptr + rows[:, None] * stride_cs + j, mask=pair, other=0.0)
        sin = tl.load(sin_ptr + rows[:, None] * stride_cs + j, mask=pair, other=0.0)
        a, b = x0.to(tl.float32), x1.to(tl.float32)
        x0 = cast_out(a * cos - b * sin, dst_ptr.dtype.element_ty)
        x1 = cast_out(a * sin + b * cos, dst_ptr.dtype.element_ty)
    tl.store(dst, x0, mask=pair)
    tl.store(dst + 1, x1, mask=pair)


def check_rope_tables(cos: torch.Tensor, sin: torch.Tensor, rows: int, rope_dim: int) -> None:
    """cos and sin as rope_rows reads them: [rows, R/2] fp32, unit column stride, one row stride."""
    for t in (cos, sin):
        assert t.shape == (rows, rope_dim // 2) and t.dtype == torch.float32 and t.stride(1) == 1, \
            f"cos/sin must be [{rows}, {rope_dim // 2}] fp32, got {tuple(t.shape)} {t.dtype}"
    assert cos.stride(0) == sin.stride(0), (cos.stride(), sin.stride())


def pick_split_k(tiles: int, k_tiles: int, sms: int) -> int:
    """1 when the output tiles already cover half the SMs (a second launch costs more than it saves at
    decode sizes); else split K until about one wave of programs covers the SMs, no split left empty."""
    if 2 * tiles >= sms:
        return 1
    split = min(k_tiles, triton.cdiv(sms, tiles))
    return triton.cdiv(k_tiles, triton.cdiv(k_tiles, split))


@triton.jit
def _splitk_reduce_kernel(ws_ptr, add_ptr, out_ptr, MN, SPLIT, ADD: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for _ in range(SPLIT):
        acc += tl.load(ws_ptr + offs, mask=mask, other=0.0)
        ws_ptr += MN
    if ADD:
        acc += tl.load(add_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, cast_out(acc, out_ptr.dtype.element_ty), mask=mask)


def splitk_reduce(ws: torch.Tensor, dtype: torch.dtype, add: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 partials [split, M, N] (+ add [M, N], in fp32 before the one rounding) -> their sum [M, N] in
    dtype, in one launch (no zero-fill, no atomics: deterministic)."""
    split, m, n = ws.shape
    assert add is None or (add.shape == (m, n) and add.is_contiguous()), None if add is None else add.shape
    out = torch.empty(m, n, dtype=dtype, device=ws.device)
    block = 1024
    _splitk_reduce_kernel[(triton.cdiv(m * n, block),)](
        ws, ws if add is None else add, out, m * n, split, ADD=add is not None, BLOCK=block, num_warps=4
    )
    return out


def dot_dtype(x: torch.Tensor, dtype: torch.dtype | None = None) -> tl.dtype:
    """The type of a kernel's tl.dot operands: `dtype` (default x's) where it is 16-bit, on x's GPU; fp32 for an
    fp32 dtype, and whenever interpreted (the interpreter computes bf16 dots on the bit patterns)."""
    if interpreted(x):
        return tl.float32
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}.get(dtype or x.dtype, tl.float32)


@triton.jit
def tile_ids(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id -> (row tile, column tile), GROUP_M row tiles at a time so their weights stay in L2."""
    n_m = tl.cdiv(M, BM)
    n_n = tl.cdiv(N, BN)
    per_group = GROUP_M * n_n
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(n_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % rows, (pid % per_group) // rows
