"""INT4 W4A16 GEMM over the compressed-tensors `pack-quantized` layout, dequantized in registers.

out[m, n] = sum_k x[m, k] * (q[n, k] - zero[n, k // g]) * scale[n, k // g], with q stored as q + 8 in nibble
k % 8 of int32 word k // 8 (see dsq/quant.py). The weights are read straight from the disk layout, once,
and turned into small integers in registers (exact in bf16), so no repack is needed.

A K step (or each 128-column slice of a sliced step, see int4_dot) never straddles a scale group, so the group
scale and zero point are one value per weight row inside it: the kernel runs the dot on q, then subtracts
the zero times the activation's sum and scales the [BM, BN] partial result - the weight operand is never
touched by scales or zeros.

Small M has too few output tiles to keep every SM streaming weights, so K is split across programs that
write fp32 partials, summed and cast by one small kernel (`pick_split_k`, `splitk_reduce`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import GemmConfig, cast_out, dot_dtype, pick_split_k, sm_count, splitk_reduce, tile_ids


# --- the INT4 K loop, shared with the fused MoE kernel ---------------------------------------------------
@triton.jit
def _planes(a, KW: tl.constexpr):
    """a [S, BM, 8 KW] -> its 8 nibble planes [S, BM, KW]: plane j holds columns 8 w + j (w < KW)."""
    a = tl.reshape(a, [a.shape[0], a.shape[1], KW, 2, 2, 2])  # column 8 w + 4 j2 + 2 j1 + j0
    a0, a1 = tl.split(a)  # j0 = 0, 1
    a00, a01 = tl.split(a0)  # j1
    a10, a11 = tl.split(a1)
    p0, p4 = tl.split(a00)  # j2
    p2, p6 = tl.split(a01)
    p1, p5 = tl.split(a10)
    p3, p7 = tl.split(a11)
    return p0, p1, p2, p3, p4, p5, p6, p7


@triton.jit
def _signed(field, E: tl.constexpr = 0):
    """q 2^E in fp32 from a stored nibble (q + 8) left in place at bit E (E <= 16): 0x4B000000 | field is the
    fp32 2^23 + (q + 8) 2^E, so one bitwise op and one subtraction give it, no shift or int->float convert."""
    return (field | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + 8.0 * 2.0**E)


@triton.jit
def _plane_dot(acc, p, field, E: tl.constexpr, DOT: tl.constexpr):
    """acc + (p 2^-E) @ (q 2^E) for a nibble plane left in place at bit E: scaling p by 2^-E is exact, so the
    products are exactly p q."""
    return tl.dot((p.to(tl.float32) * 2.0**-E).to(DOT), _signed(field, E).to(DOT), acc)


@triton.jit
def _plane_dots(planes, words, DOT: tl.constexpr):
    """sum_j planes[j] [S, BM, KW] @ q of nibble j of words [S, KW, BN]: eight K = KW dots, fp32 [S, BM, BN].
    Nibbles 0-4 are masked in place, 5-7 after one shift of the word by 12 (fp32 holds q 2^E up to E = 16)."""
    p0, p1, p2, p3, p4, p5, p6, p7 = planes
    acc = _plane_dot(tl.zeros([p0.shape[0], p0.shape[1], words.shape[2]], dtype=tl.float32), p0, words & 0xF, 0, DOT)
    acc = _plane_dot(acc, p1, words & 0xF0, 4, DOT)
    acc = _plane_dot(acc, p2, words & 0xF00, 8, DOT)
    acc = _plane_dot(acc, p3, words & 0xF000, 12, DOT)
    acc = _plane_dot(acc, p4, words & 0xF0000, 16, DOT)
    high = words >> 12
    acc = _plane_dot(acc, p5, high & 0xF00, 8, DOT)
    acc = _plane_dot(acc, p6, high & 0xF000, 12, DOT)
    return _plane_dot(acc, p7, high & 0xF0000, 16, DOT)


@triton.jit
def _unpack(words, BN: tl.constexpr, BK: tl.constexpr, DOT: tl.constexpr):
    """words [BN, BK/8] -> q as the dot's [BK, BN] operand (column k = 8 * word + nibble, the packing order)."""
    nib = (words[:, :, None] >> (tl.arange(0, 8) * 4)[None, None, :]) & 0xF
    return tl.trans(_signed(tl.reshape(nib, [BN, BK])).to(DOT))


@triton.jit
def _grouped(d, a_sum, ws_ptr, wz_ptr, offs_n, g, mask, stride_sn, stride_zn, HAS_ZP: tl.constexpr):
    """(d - a_sum z) s: d a partial sum over one scale group g of weight rows offs_n (offs_n, g and mask shaped
    to broadcast against d), its zero point and scale applied. The zero is stored + 8 in nibble n % 8 of word
    [n // 8, g]."""
    if HAS_ZP:
        zw = tl.load(wz_ptr + (offs_n // 8) * stride_zn + g, mask=mask, other=0)
        d -= a_sum * _signed((zw >> ((offs_n % 8) * 4)) & 0xF)
    return d * tl.load(ws_ptr + offs_n * stride_sn + g, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _slices(acc, planes, a_sum, w_ptr, ws_ptr, wz_ptr, offs_n, kw, w_mask, g, g_mask, stride_wn, stride_sn,
            stride_zn, HAS_ZP: tl.constexpr, DOT: tl.constexpr):
    """acc [S, BM, BN] + one step of S slices against one weight (words at columns kw [S, 16, 1])."""
    words = tl.load(w_ptr + offs_n[None, None, :] * stride_wn + kw, mask=w_mask, other=0)
    return acc + _grouped(_plane_dots(planes, words, DOT), a_sum, ws_ptr, wz_ptr, offs_n[None, None, :], g, g_mask,
                          stride_sn, stride_zn, HAS_ZP)


@triton.jit
def _unpacked(acc, a, a_sum, w_ptr, ws_ptr, wz_ptr, offs_n, kw, w_mask, g, n_mask, stride_wn, stride_sn, stride_zn,
              HAS_ZP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT: tl.constexpr):
    """acc [BM, BN] + one step of BK columns (words at columns kw [BK/8]) against one weight."""
    words = tl.load(w_ptr + offs_n[:, None] * stride_wn + kw[None, :], mask=w_mask, other=0)
    return acc + _grouped(tl.dot(a, _unpack(words, BN, BK, DOT)), a_sum, ws_ptr, wz_ptr, offs_n[None, :], g,
                          n_mask[None, :], stride_sn, stride_zn, HAS_ZP)


@triton.jit
def int4_dot(
    a_rows, row_mask, w_ptr, ws_ptr, wz_ptr, v_ptr, vs_ptr, vz_ptr, offs_n, n_mask, k0, k1, GROUP,
    stride_wn, stride_sn, stride_zn, GATED: tl.constexpr, HAS_ZP: tl.constexpr, BN: tl.constexpr,
    BK: tl.constexpr, DOT: tl.constexpr,
):
    """(a w^T, a v^T) over columns [k0, k1), fp32 [BM, BN]: rows a_rows (BM row pointers) times weight rows
    offs_n, dequantized; v only if GATED (gate and up then read each activation tile once).

    The dots run on q alone and each group's zero and scale apply to its [BM, BN] partial sum,
    (a q - (sum_k a) z) s, so the weight operand is a pure function of the loaded words. Two ways to run:
    - BK = 128 S (the decode tiles; needs scale groups that are a multiple of 128 or the whole row): a step
      is S slices of 128 columns, the batch of 3-D dots, so that with S warps each warp runs its own slice
      and reads only its share of the activation (a 2-D tile would give every warp the whole [BM, BK]
      operand). A slice is split into nibble planes instead of unpacking its words: plane j (nibble j of
      every word: columns 8 w + j) times the activation's columns 8 w + j, eight K = 16 dots. The words
      are the dots' [K, N] operand and each plane is masked out of them elementwise, so Triton stages only
      the packed words in shared memory and dequantizes them in the MMA's register layout (the sm_90
      compile test checks that no 16-bit weight tile is moved there). The slices' sums stay apart in an
      [S, BM, BN] accumulator, added once at the end.
    - BK < 128 (prefill tiles, groups of 32 or 64): each step unpacks a [BN, BK] tile for one dot."""
    BM: tl.constexpr = a_rows.shape[0]
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    acc_up = tl.zeros([BM, BN], dtype=tl.float32)
    if BK >= 128:
        S: tl.constexpr = BK // 128
        sl = tl.arange(0, S)
        acc3 = tl.zeros([S, BM, BN], dtype=tl.float32)
        acc3_up = tl.zeros([S, BM, BN], dtype=tl.float32)
        for k in range(k0, k1, BK):
            cols = k + sl[:, None, None] * 128 + tl.arange(0, 128)[None, None, :]  # [S, 1, 128]
            a = tl.load(a_rows[None, :, None] + cols, mask=row_mask[None, :, None] & (cols < k1), other=0.0)
            a = a.to(tl.float32).to(DOT)  # [S, BM, 128]
            planes = _planes(a, 16)
            a_sum = tl.sum(a.to(tl.float32), axis=2)[:, :, None]
            kw = k // 8 + sl[:, None, None] * 16 + tl.arange(0, 16)[None, :, None]  # [S, 16, 1] word columns
            w_mask = (kw < k1 // 8) & n_mask[None, None, :]
            g = ((k + sl * 128) // GROUP)[:, None, None]  # each slice's group, its scales [S, 1, BN]
            g_mask = (k + sl * 128 < k1)[:, None, None] & n_mask[None, None, :]
            acc3 = _slices(acc3, planes, a_sum, w_ptr, ws_ptr, wz_ptr, offs_n, kw, w_mask, g, g_mask, stride_wn,
                           stride_sn, stride_zn, HAS_ZP, DOT)
            if GATED:
                acc3_up = _slices(acc3_up, planes, a_sum, v_ptr, vs_ptr, vz_ptr, offs_n, kw, w_mask, g, g_mask,
                                  stride_wn, stride_sn, stride_zn, HAS_ZP, DOT)
        acc = tl.sum(acc3, axis=0)
        if GATED:
            acc_up = tl.sum(acc3_up, axis=0)
    else:
        for k in range(k0, k1, BK):
            cols = k + tl.arange(0, BK)
            a = tl.load(a_rows[:, None] + cols[None, :], mask=row_mask[:, None] & (cols[None, :] < k1), other=0.0)
            a = a.to(tl.float32).to(DOT)
            a_sum = tl.sum(a.to(tl.float32), axis=1)[:, None]
            kw = k // 8 + tl.arange(0, BK // 8)
            w_mask = n_mask[:, None] & (kw[None, :] < k1 // 8)
            acc = _unpacked(acc, a, a_sum, w_ptr, ws_ptr, wz_ptr, offs_n, kw, w_mask, k // GROUP, n_mask, stride_wn,
                            stride_sn, stride_zn, HAS_ZP, BN, BK, DOT)
            if GATED:
                acc_up = _unpacked(acc_up, a, a_sum, v_ptr, vs_ptr, vz_ptr, offs_n, kw, w_mask, k // GROUP, n_mask,
                                   stride_wn, stride_sn, stride_zn, HAS_ZP, BN, BK, DOT)
    return acc, acc_up


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
    per_split = tl.cdiv(tl.cdiv(K, BK), SPLIT_K) * BK
    k0 = tl.program_id(1) * per_split
    acc, _ = int4_dot(x_ptr + offs_m.to(tl.int64) * stride_xm, m_mask, wp_ptr, ws_ptr, wz_ptr, wp_ptr, ws_ptr,
                      wz_ptr, offs_n, n_mask, k0, tl.minimum(k0 + per_split, K), GROUP, stride_wn, stride_sn,
                      stride_zn, False, HAS_ZP, BN, BK, DOT)
    out_ptr += tl.program_id(1).to(tl.int64) * M * N
    out = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out, cast_out(acc, out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def int4_step(group: int, k: int, cap: int = 64) -> int:
    """The longest K step (<= cap, >= 16) that stays inside one scale group."""
    if group >= k:  # one group per row: any step length works
        return cap
    bk = cap
    while bk > 16 and group % bk:
        bk //= 2
    return bk


def int4_tile(group: int, k: int, bm: int) -> tuple[int, int, int]:
    """(BN, BK, warps) of an INT4 tile of bm rows (int4_dot). The decode tiles (bm = 16: mma.sync, whose
    weight operand can stay in registers) with groups that are a multiple of 128 or the whole row: S <= 4
    slices of 128 columns, one warp each (Triton lays a 3-D dot's warps along its batch, so more warps would
    repeat a slice), 32 columns (at 64 the gated tiles spill). Otherwise 64 columns, steps inside one group
    (<= 64), 8 warps."""
    if bm == 16 and (group % 128 == 0 or group >= k):
        s = min(4, triton.next_power_of_2(triton.cdiv(k, 128)))
        return 32, 128 * s, s
    return 64, int4_step(group, k), 8


def int4_config(m: int, n: int, k: int, group: int, x: torch.Tensor) -> GemmConfig:
    """Heuristic tiles, picked from sm_90 compiles (no register spills) and not yet timed on an H200. Small M
    streams weights: long K steps, split K; larger M: wgmma-sized row tiles."""
    bm = 16 if m <= 16 else min(triton.next_power_of_2(m), 64) if m <= 128 else 128
    bn, bk, warps = int4_tile(group, k, bm)
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    split = pick_split_k(tiles, triton.cdiv(k, bk), sm_count(x))
    return GemmConfig(bm, bn, bk, split, 8, warps, 3 if bm == 128 or bk > 128 else 4)


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
    step = 128 if cfg.bk >= 128 else cfg.bk  # int4_dot: a step of 128 S is S slices of 128
    assert cfg.bk <= 128 or cfg.bk in (256, 512), f"a K step of {cfg.bk} is not 128 x 1, 2 or 4"
    assert group % step == 0 or n_groups == 1, f"a K step of {cfg.bk} straddles groups of {group}"
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

