"""INT4 W4A16 GEMM over the compressed-tensors `pack-quantized` layout, dequantized in registers.

out[m, n] = sum_k x[m, k] * (q[n, k] - zero[n, k // g]) * scale[n, k // g], with q stored as q + 8 in nibble
k % 8 of int32 word k // 8 (see dsq/quant.py). The weights are read straight from the disk layout, once,
and turned into small integers in registers (exact in bf16), so no repack is needed.

A K step (BK) never straddles a scale group, so the group scale and zero point are one value per weight
row inside a step: the kernel runs the dot on q, then subtracts the zero times the step's activation sum
and scales the [BM, BN] partial result - the [BK, BN] weight tile is never touched by scales or zeros.

Small M has too few output tiles to keep every SM streaming weights, so K is split across programs that
write fp32 partials, summed and cast by one small kernel (`pick_split_k`, `splitk_reduce`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import GemmConfig, cast_out, dot_dtype, pick_split_k, sm_count, splitk_reduce, tile_ids


# --- the INT4 K step, shared with the fused MoE kernel ---------------------------------------------------
@triton.jit
def _planes(a, KW: tl.constexpr):
    """a [BM, 8 KW] -> its 8 nibble planes [BM, KW]: plane j holds columns 8 w + j (w < KW)."""
    a = tl.reshape(a, [a.shape[0], KW, 2, 2, 2])  # column 8 w + 4 j2 + 2 j1 + j0 -> [m, w, j2, j1, j0]
    a0, a1 = tl.split(a)  # j0 = 0, 1
    a00, a01 = tl.split(a0)  # j1
    a10, a11 = tl.split(a1)
    p0, p4 = tl.split(a00)  # j2
    p2, p6 = tl.split(a01)
    p1, p5 = tl.split(a10)
    p3, p7 = tl.split(a11)
    return p0, p1, p2, p3, p4, p5, p6, p7


@triton.jit
def _signed(nib):
    """Stored nibbles (q + 8) -> q in fp32: 0x4B000000 | nib is the fp32 2^23 + nib, so one subtraction
    gives q without an int->float convert."""
    return (nib | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0


@triton.jit
def _plane_dot(acc, p, words, J: tl.constexpr, DOT: tl.constexpr):
    """acc + p [BM, KW] @ q of nibble J of words [KW, BN]: one nibble plane as a K = KW dot."""
    return tl.dot(p, _signed((words >> (4 * J)) & 0xF).to(DOT), acc)


@triton.jit
def int4_dot_step(
    a, wp_ptr, ws_ptr, wz_ptr, offs_n, n_mask, t, KW, GROUP, stride_wn, stride_sn, stride_zn,
    HAS_ZP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT: tl.constexpr,
):
    """a [BM, BK] (DOT) times weight rows offs_n, columns [t*BK, (t+1)*BK), dequantized: fp32 [BM, BN].

    The dot runs on q alone; the group's scale and zero apply to the [BM, BN] result,
    (a q - (sum_k a) z) * s, so the weight tile is a pure function of the loaded words.
    A step of 16 or more words per row (BK >= 128) is split into nibble planes instead of unpacking the
    words: plane j (nibble j of every word, K columns 8 w + j) times the activation columns 8 w + j, as
    eight dots of K = BK / 8 >= 16 (the MMA's K). The words are loaded as the dot's [K, N] operand and each
    plane is masked out of them elementwise, so on an mma.sync kernel (the decode tiles, BM < 64) Triton
    stages only the packed words in shared memory and dequantizes them in the MMA's register layout; the
    activation's planes are split in registers. A shorter step unpacks [BN, BK] and runs one dot."""
    offs_w = t * (BK // 8) + tl.arange(0, BK // 8)
    if BK >= 128:
        words = tl.load(  # [BK/8, BN]
            wp_ptr + offs_n[None, :] * stride_wn + offs_w[:, None],
            mask=n_mask[None, :] & (offs_w[:, None] < KW), other=0,
        )
        p0, p1, p2, p3, p4, p5, p6, p7 = _planes(a, BK // 8)
        acc = tl.zeros([a.shape[0], BN], dtype=tl.float32)
        acc = _plane_dot(acc, p0, words, 0, DOT)
        acc = _plane_dot(acc, p1, words, 1, DOT)
        acc = _plane_dot(acc, p2, words, 2, DOT)
        acc = _plane_dot(acc, p3, words, 3, DOT)
        acc = _plane_dot(acc, p4, words, 4, DOT)
        acc = _plane_dot(acc, p5, words, 5, DOT)
        acc = _plane_dot(acc, p6, words, 6, DOT)
        acc = _plane_dot(acc, p7, words, 7, DOT)
    else:
        words = tl.load(
            wp_ptr + offs_n[:, None] * stride_wn + offs_w[None, :],
            mask=n_mask[:, None] & (offs_w[None, :] < KW), other=0,
        )
        nib = (words[:, :, None] >> (tl.arange(0, 8) * 4)[None, None, :]) & 0xF  # [BN, BK/8, 8]
        nib = tl.reshape(nib, [BN, BK])  # column k = 8 * word + nibble, the packing order
        acc = tl.dot(a, tl.trans(_signed(nib).to(DOT)))
    g = (t * BK) // GROUP
    if HAS_ZP:  # stored zero + 8 in nibble n % 8 of word [n // 8, g]
        zw = tl.load(wz_ptr + (offs_n // 8) * stride_zn + g, mask=n_mask, other=0)
        zero = _signed((zw >> ((offs_n % 8) * 4)) & 0xF)
        acc -= tl.sum(a.to(tl.float32), axis=1)[:, None] * zero[None, :]
    s = tl.load(ws_ptr + offs_n * stride_sn + g, mask=n_mask, other=0.0).to(tl.float32)
    return acc * s[None, :]


@triton.jit
def _int4_gemm_kernel(
    x_ptr, wp_ptr, ws_ptr, wz_ptr, out_ptr, M, N, K, GROUP, SPLIT_K,
    stride_xm, stride_wn, stride_sn, stride_zn, stride_om,
    HAS_ZP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    DOT: tl.constexpr,
):
    """out[pid_k] = x rows x dequant(w)^T over this program's share of K (out is [M, N], or fp32 [SPLIT, M, N])."""
    pid_m, pid_n = tile_ids(tl.program_id(0), M, N, BM, BN, GROUP_M)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    m_mask = offs_m < M
    n_mask = offs_n < N
    k_tiles = tl.cdiv(K, BK)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    t0 = tl.program_id(1) * per_split
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for t in range(t0, tl.minimum(t0 + per_split, k_tiles)):
        offs_k = t * BK + tl.arange(0, BK)
        a = tl.load(
            x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
            mask=m_mask[:, None] & (offs_k[None, :] < K), other=0.0,
        )
        acc += int4_dot_step(
            a.to(tl.float32).to(DOT), wp_ptr, ws_ptr, wz_ptr, offs_n, n_mask, t, K // 8, GROUP,
            stride_wn, stride_sn, stride_zn, HAS_ZP, BN, BK, DOT,
        )
    out_ptr += tl.program_id(1).to(tl.int64) * M * N
    out = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out, cast_out(acc, out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def int4_step(group: int, k: int, cap: int = 128) -> int:
    """The longest K step (<= cap, >= 16) that stays inside one scale group."""
    if group >= k:  # one group per row: any step length works
        return cap
    bk = cap
    while bk > 16 and group % bk:
        bk //= 2
    return bk


def int4_config(m: int, n: int, k: int, group: int, x: torch.Tensor) -> GemmConfig:
    """Heuristic tiles, picked from sm_90 compiles (no register spills; ~128 registers at 8 warps) and not yet
    timed on an H200. Small M streams weights: long K steps, split K; larger M: wgmma-sized row tiles."""
    if m <= 16:
        bm, bn, bk, stages = 16, 64, int4_step(group, k, 128), 4
    elif m <= 128:
        bm, bn, bk, stages = min(triton.next_power_of_2(m), 64), 64, int4_step(group, k, 64), 4
    else:
        bm, bn, bk, stages = 128, 64, int4_step(group, k, 64), 3
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    split = pick_split_k(tiles, triton.cdiv(k, bk), sm_count(x))
    return GemmConfig(bm, bn, bk, split, 8, 8, stages)


def int4_gemm(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None = None,
    *,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """x [M, K] @ dequant(weight)^T -> [M, N] in x.dtype; fp32 accumulation.

    weight_packed int32 [N, K/8], weight_scale [N, K/g] (bf16), weight_zero_point int32 [ceil(N/8), K/g]."""
    assert x.dim() == 2 and x.stride(1) == 1, f"x must be row-major 2-D, got {tuple(x.shape)}"
    m, k = x.shape
    n = weight_packed.shape[0]
    assert weight_packed.dtype == torch.int32 and weight_packed.is_contiguous()
    assert weight_packed.shape == (n, k // 8) and k % 8 == 0, (tuple(weight_packed.shape), k)
    assert weight_scale.dim() == 2 and weight_scale.shape[0] == n and weight_scale.stride(1) == 1
    n_groups = weight_scale.shape[1]
    assert k % n_groups == 0, f"K={k} is not a whole number of {n_groups} groups"
    group = k // n_groups
    zp = weight_zero_point
    if zp is not None:
        assert zp.dtype == torch.int32 and zp.shape == ((n + 7) // 8, n_groups) and zp.stride(1) == 1
    cfg = config or int4_config(m, n, k, group, x)
    cfg.check()
    assert group % cfg.bk == 0 or n_groups == 1, f"a K step of {cfg.bk} straddles groups of {group}"
    if m == 0:
        return x.new_empty(0, n)
    split = cfg.split_k > 1
    out = x.new_empty(cfg.split_k, m, n, dtype=torch.float32) if split else x.new_empty(m, n)
    grid = (triton.cdiv(m, cfg.bm) * triton.cdiv(n, cfg.bn), cfg.split_k)
    _int4_gemm_kernel[grid](
        x, weight_packed, weight_scale, zp if zp is not None else weight_packed, out,
        m, n, k, group, cfg.split_k,
        x.stride(0), weight_packed.stride(0), weight_scale.stride(0), zp.stride(0) if zp is not None else 0,
        n, HAS_ZP=zp is not None, BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, GROUP_M=cfg.group_m,
        DOT=dot_dtype(x), num_warps=cfg.warps, num_stages=cfg.stages,
    )
    return splitk_reduce(out, x.dtype) if split else out

