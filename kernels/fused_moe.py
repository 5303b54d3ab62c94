"""Fused MoE over routed experts with INT4 (W4A16) or FP8 (W8A8) weights: one launch per projection for all
experts.

out[m] = sum_j topk_weights[m, j] * down_e(silu(gate_e x_m) * up_e x_m), e = topk_ids[m, j].

Work unit: a block of BM (token, slot) "pairs" that all go to one expert, times BN output columns.
1. gate+up launch: each program loads its pairs' token rows once and runs them against the gate and the up
   weights of its expert (two pointers, two accumulators; no [E, 2I, H] copy), then writes
   h[pair] = silu(gate) * up in x.dtype.
2. down launch: h[pair] against the expert's down weights, times the pair's router weight, written fp32 in
   slot-major order y[j, m] so that
3. the per-token sum over the k slots, plus `add` (the shared experts' output) if given, and the cast to
   x.dtype are one small launch (splitk_reduce): deterministic, and the caller's residual add is gone.
FP8 experts quantize their activations (x, then h) per token or per 1x128 group like fp8_gemm: inside the
kernel on the decode path, with act_quant (once per row) on the grouped path. INT4 experts run int4_dot
(dsq.kernels.int4_gemm), with its tiles (BN, BK and warps from int4_tile).

Two ways to form the blocks:
- grouped (prefill, larger batches): `moe_align` sorts the pairs by expert and pads every expert's run to a
  multiple of BM (as vLLM's moe_align_block_size does), so each expert's weights are read once per BN
  columns. It is sized for the worst case from (M, k, E, BM) alone: blocks past the used ones hold expert -1
  and exit at once.
- decode (M <= DECODE_MAX_TOKENS): block p is the single pair p, its expert read straight from topk_ids. No
  sorting, only the chosen experts' weights are touched, and the down launch takes one token per program
  instead: its k pairs against their experts in slot order, summed with `add` and cast in registers (the
  sum of step 3 in the same order, without its launch or the fp32 y). Its column tiles narrow (to 16)
  until M x tiles covers the SMs: V2-Lite's 2048 at batch 1 is 128 programs of 16 columns x 6 experts.
Neither path syncs with the host or has a data-dependent shape, so both can be captured in a CUDA graph.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from dsq.quant import BLOCK, FP8, FP8_MAX, fp8_linear, int4_dequantize, is_block_scale

from .act_quant import act_quant, group_scales, quantize_tile, token_scales
from .common import cast_out, dot_dtype, mma_warps, sm_count, splitk_reduce
from .fp8_gemm import fp8_dot_step
from .int4_gemm import int4_dot, int4_tile
from .moe_align import moe_align

DECODE_MAX_TOKENS = 8  # up to here one pair per block beats sorting (a guess until measured)


@triton.jit
def _expert_dot(
    a_rows, row_mask, as_rows, w_ptr, ws_ptr, wz_ptr, v_ptr, vs_ptr, vz_ptr, offs_n, n_mask, K, GROUP,
    stride_wn, stride_sn, stride_zn, GATED: tl.constexpr, FP8_W: tl.constexpr, BLOCK_SCALES: tl.constexpr,
    HAS_ZP: tl.constexpr, QUANT_A: tl.constexpr, FMAX: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BK: tl.constexpr, DOT: tl.constexpr):
    """(a w^T, a v^T) in fp32 [BM, BN], scales applied, for the rows a_rows of one expert (w, v and their
    scales already offset to it; v only if GATED): _fp8_dot, or int4_dot."""
    if FP8_W:
        acc, acc_up = _fp8_dot(a_rows, row_mask, as_rows, w_ptr, ws_ptr, v_ptr, vs_ptr, offs_n, n_mask, K,
                               stride_wn, stride_sn, GATED, BLOCK_SCALES, QUANT_A, FMAX, BM, BN, BK)
    else:
        acc, acc_up = int4_dot(a_rows, row_mask, w_ptr, ws_ptr, wz_ptr, v_ptr, vs_ptr, vz_ptr, offs_n, n_mask, 0, K,
                               GROUP, stride_wn, stride_sn, stride_zn, GATED, HAS_ZP, BN, BK, DOT)
    return acc, acc_up


@triton.jit
def _fp8_dot(
    a_rows, row_mask, as_rows, w_ptr, ws_ptr, v_ptr, vs_ptr, offs_n, n_mask, K, stride_wn, stride_sn,
    GATED: tl.constexpr, BLOCK_SCALES: tl.constexpr, QUANT_A: tl.constexpr, FMAX: tl.constexpr, BM: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr):
    """_expert_dot for FP8: a is fp8 with act_quant's scales at as_rows, or (QUANT_A) quantized here."""
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    acc_up = tl.zeros([BM, BN], dtype=tl.float32)
    if QUANT_A:  # noqa: SIM102 (constexpr branches stay statements for Triton's compiler)
        if not BLOCK_SCALES:
            a_s = token_scales(a_rows[:, None], row_mask, K, FMAX, BM, BK)
    for t in range(0, tl.cdiv(K, BK)):
        offs_k = t * BK + tl.arange(0, BK)
        a = tl.load(a_rows[:, None] + offs_k[None, :], mask=row_mask[:, None] & (offs_k[None, :] < K), other=0.0)
        if QUANT_A:
            x = a.to(tl.float32)
            if BLOCK_SCALES:
                a_s = group_scales(x, FMAX)
            a = quantize_tile(x, a_s, FMAX)
        elif BLOCK_SCALES:
            a_s = tl.load(as_rows + t, mask=row_mask, other=0.0)
        else:
            a_s = 1.0  # applied after the loop
        acc = fp8_dot_step(acc, a, a_s, w_ptr, ws_ptr, offs_n, n_mask, t, K, stride_wn, stride_sn, BLOCK_SCALES, BK)
        if GATED:
            acc_up = fp8_dot_step(acc_up, a, a_s, v_ptr, vs_ptr, offs_n, n_mask, t, K, stride_wn, stride_sn,
                                  BLOCK_SCALES, BK)
    if not BLOCK_SCALES:  # channel scales: token scale x channel scale, once
        if not QUANT_A:
            a_s = tl.load(as_rows, mask=row_mask, other=0.0)
        acc = acc * a_s[:, None] * tl.load(ws_ptr + offs_n * stride_sn, mask=n_mask, other=0.0)[None, :]
        if GATED:
            w_s = tl.load(vs_ptr + offs_n * stride_sn, mask=n_mask, other=0.0)
            acc_up = acc_up * a_s[:, None] * w_s[None, :]
    return acc, acc_up


@triton.jit
def _moe_kernel(
    a_ptr, as_ptr, out_ptr, w_ptr, ws_ptr, wz_ptr, v_ptr, vs_ptr, vz_ptr,
    pair_ids_ptr, expert_ids_ptr, topk_w_ptr, add_ptr,
    N, K, T, ROW_DIV, OUT_DIV, OUT_MUL, GROUP,
    stride_am, stride_asm, stride_om, stride_we, stride_wn, stride_se, stride_sn, stride_ze, stride_zn,
    GATED: tl.constexpr, FP8_W: tl.constexpr, BLOCK_SCALES: tl.constexpr, HAS_ZP: tl.constexpr,
    QUANT_A: tl.constexpr, DECODE: tl.constexpr, SLOTS: tl.constexpr, HAS_ADD: tl.constexpr, FMAX: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT: tl.constexpr,
):
    """Pairs of one block x BN columns of their expert; pairs >= T are padding.

    GATED: a rows are tokens (pair // ROW_DIV), w = gate and v = up, out[pair] = silu(a w^T) * (a v^T).
    SLOTS > 0 (the decode path's down launch): program m is token m; its SLOTS pairs (rows of a = h) run
    against their experts' down weights in slot order, each times its router weight, summed in fp32 with
    add[m] (HAS_ADD) and written once in out's dtype: the per-token sum needs no launch of its own.
    Otherwise: a rows are pairs (h), w = down, out row (pair % OUT_DIV) * OUT_MUL + pair // OUT_DIV (the
    slot-major [k, M] order the per-token sum wants) = (a w^T) * the pair's router weight."""
    pid_m = tl.program_id(0)
    offs = tl.arange(0, BM)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    n_mask = offs_n < N
    if SLOTS > 0:
        total = tl.zeros([BM, BN], dtype=tl.float32)
        for j in range(SLOTS):
            pair = pid_m * SLOTS + j
            pairs = tl.where(offs == 0, pair, T)
            row_mask = pairs < T
            expert = tl.load(expert_ids_ptr + pair).to(tl.int64)
            acc, _ = _expert_dot(
                a_ptr + pairs.to(tl.int64) * stride_am, row_mask, as_ptr + pairs * stride_asm,
                w_ptr + expert * stride_we, ws_ptr + expert * stride_se, wz_ptr + expert * stride_ze, w_ptr, ws_ptr,
                wz_ptr, offs_n, n_mask, K, GROUP, stride_wn, stride_sn, stride_zn, False, FP8_W, BLOCK_SCALES,
                HAS_ZP, QUANT_A, FMAX, BM, BN, BK, DOT)
            total += acc * tl.load(topk_w_ptr + pairs, mask=row_mask, other=0.0)[:, None]
        mask = (offs == 0)[:, None] & n_mask[None, :]
        rows = (pid_m + offs * 0).to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        if HAS_ADD:
            total += tl.load(add_ptr + rows, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, cast_out(total, out_ptr.dtype.element_ty), mask=mask)
        return
    if DECODE:  # noqa: SIM108 (as above)
        pairs = tl.where(offs == 0, pid_m, T)
    else:
        pairs = tl.load(pair_ids_ptr + pid_m * BM + offs)
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    if expert < 0:  # a block past the used ones (grouped path)
        return
    row_mask = pairs < T
    rows = (pairs // ROW_DIV).to(tl.int64)
    acc, acc_up = _expert_dot(
        a_ptr + rows * stride_am, row_mask, as_ptr + rows * stride_asm,
        w_ptr + expert * stride_we, ws_ptr + expert * stride_se, wz_ptr + expert * stride_ze,
        v_ptr + expert * stride_we, vs_ptr + expert * stride_se, vz_ptr + expert * stride_ze, offs_n, n_mask, K,
        GROUP, stride_wn, stride_sn, stride_zn, GATED, FP8_W, BLOCK_SCALES, HAS_ZP, QUANT_A, FMAX, BM, BN, BK, DOT)
    if GATED:
        out = acc * tl.sigmoid(acc) * acc_up
    else:
        out = acc * tl.load(topk_w_ptr + pairs, mask=row_mask, other=0.0)[:, None]
    out_rows = (pairs % OUT_DIV) * OUT_MUL + pairs // OUT_DIV
    tl.store(out_ptr + out_rows.to(tl.int64)[:, None] * stride_om + offs_n[None, :],
             cast_out(out, out_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


class _Experts(NamedTuple):
    """One projection's stacked expert weights, validated: FP8 (weight, scale) or INT4 (packed, scale, zero)."""

    fp8: bool
    w: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    group: int  # INT4 scale group along K
    block: bool  # FP8 128x128 block scales


def _experts(d: dict[str, torch.Tensor], e: int, n: int, k: int) -> _Experts:
    """Check one projection's dict against [E, N, K] and read its format from its keys."""
    s = d["weight_scale"]
    assert s.dim() == 3 and s.is_contiguous(), tuple(s.shape)
    if "weight" in d:
        w = d["weight"]
        assert w.dtype == FP8 and w.shape == (e, n, k) and w.is_contiguous(), (w.dtype, tuple(w.shape))
        assert s.dtype == torch.float32, s.dtype
        block = is_block_scale(w, s)
        expect = (e, triton.cdiv(n, BLOCK), triton.cdiv(k, BLOCK)) if block else (e, n, 1)
        assert s.shape == expect, (tuple(s.shape), expect)
        return _Experts(True, w, s, None, k, block)
    w = d["weight_packed"]
    assert w.dtype == torch.int32 and w.shape == (e, n, k // 8) and k % 8 == 0 and w.is_contiguous()
    assert s.shape[:2] == (e, n) and k % s.shape[2] == 0, (tuple(s.shape), (e, n, k))
    group = k // s.shape[2]
    z = d.get("weight_zero_point")
    if z is not None:
        assert z.dtype == torch.int32 and z.shape == (e, (n + 7) // 8, s.shape[2]) and z.is_contiguous()
    return _Experts(False, w, s, z, group, False)


def _launch(
    a: torch.Tensor, out: torch.Tensor, w: _Experts, v: _Experts | None,
    blocks: tuple[torch.Tensor, torch.Tensor, bool], topk_w: torch.Tensor, row_div: int,
    out_order: tuple[int, int], bm: int, add: torch.Tensor | None = None,
) -> None:
    """Run one projection (two when v is given: gate and up) over every block of pairs; the decode path's
    down launch (v None) sums each token's slots, plus add, into out [M, N]."""
    n, k = w.w.shape[1], a.shape[1]
    pair_ids, expert_ids, decode = blocks
    a_s = a  # placeholder pointer: INT4 has no activation scales, QUANT_A computes them in the kernel
    if w.fp8 and not decode:  # grouped: quantize each row once, not once per column tile
        a, a_s = act_quant(a, BLOCK if w.block else None)
    bn, bk, warps = (64, BLOCK, 8) if w.fp8 else int4_tile(w.group, k, bm)
    assert w.fp8 or w.group % min(bk, 128) == 0 or w.group == k, f"INT4 group {w.group} must be a multiple of 16"
    gated = v is not None
    slots = topk_w.shape[1] if decode and not gated else 0
    programs = topk_w.shape[0] if slots else expert_ids.numel()  # slots: one per token
    if slots:  # narrower column tiles until the grid covers the SMs
        bn = next((b for b in (64, 32) if b <= bn and programs * triton.cdiv(n, b) >= sm_count(a)), 16)
    warps = warps if bk > 128 else mma_warps(bm, bn, warps)  # INT4 slices: one warp per slice
    v = v if gated else w
    z, vz = (w.zero, v.zero) if w.zero is not None else (w.w, v.w)
    _moe_kernel[(programs, triton.cdiv(n, bn))](
        a, a_s, out, w.w, w.scale, z, v.w, v.scale, vz, pair_ids, expert_ids, topk_w, out if add is None else add,
        n, k, topk_w.numel(), row_div, *out_order, w.group,
        a.stride(0), a_s.stride(0), out.stride(-2), w.w.stride(0), w.w.stride(1), w.scale.stride(0),
        w.scale.stride(1), z.stride(0), z.stride(1),
        GATED=gated, FP8_W=w.fp8, BLOCK_SCALES=w.block, HAS_ZP=w.zero is not None,
        QUANT_A=w.fp8 and decode, DECODE=decode, SLOTS=slots, HAS_ADD=add is not None, FMAX=FP8_MAX, BM=bm,
        BN=bn, BK=bk, DOT=dot_dtype(a), num_warps=warps, num_stages=3,
    )


def fused_moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w1: dict[str, torch.Tensor],
              w2: dict[str, torch.Tensor], w3: dict[str, torch.Tensor],
              add: torch.Tensor | None = None) -> torch.Tensor:
    """Routed experts for x [M, H]: w1 gate [E, I, H], w3 up [E, I, H], w2 down [E, H, I] -> [M, H] in x.dtype,
    plus add [M, H] (summed in fp32 before the one rounding to x.dtype).

    Each dict holds compressed-tensors tensors stacked on a leading expert dim (format read from its keys)."""
    assert x.dim() == 2 and x.is_contiguous(), f"x must be contiguous 2-D, got {tuple(x.shape)}"
    m, hidden = x.shape
    assert topk_ids.dim() == 2 and topk_ids.shape[0] == m and topk_ids.is_contiguous(), tuple(topk_ids.shape)
    assert topk_ids.dtype in (torch.int32, torch.int64), topk_ids.dtype
    assert topk_weights.shape == topk_ids.shape and topk_weights.dtype == torch.float32
    assert topk_weights.is_contiguous()
    assert add is None or (add.shape == x.shape and add.is_contiguous()), None if add is None else add.shape
    top_k = topk_ids.shape[1]
    e, inter = (w1["weight"] if "weight" in w1 else w1["weight_packed"]).shape[:2]
    gate, up, down = _experts(w1, e, inter, hidden), _experts(w3, e, inter, hidden), _experts(w2, e, hidden, inter)
    assert gate.fp8 == up.fp8 == down.fp8 and gate.block == up.block and gate.group == up.group
    assert (gate.zero is None) == (up.zero is None)
    pairs = m * top_k
    if pairs == 0:
        return torch.zeros_like(x) if add is None else add.to(x.dtype, copy=True)
    if m <= DECODE_MAX_TOKENS:
        bm = 16
        blocks = (topk_ids, topk_ids.view(-1), True)  # pair_ids unused; expert of block p = topk_ids.flat[p]
    else:
        per_expert = pairs / e
        bm = 16 if per_expert <= 24 else 32 if per_expert <= 48 else 64
        pair_ids, expert_ids = moe_align(topk_ids, e, bm)
        blocks = (pair_ids, expert_ids, False)
    h = torch.empty(pairs, inter, dtype=x.dtype, device=x.device)
    _launch(x, h, gate, up, blocks, topk_weights, top_k, (1, 0), bm)
    if blocks[2]:  # decode: the down launch sums the slots, adds and casts
        out = torch.empty_like(x)
        _launch(h, out, down, None, blocks, topk_weights, 1, (1, 0), bm, add)
        return out
    y = torch.empty(top_k, m, hidden, dtype=torch.float32, device=x.device)  # slot-major: pair m*k+j -> [j, m]
    _launch(h, y, down, None, blocks, topk_weights, 1, (top_k, m), bm)
    return splitk_reduce(y, x.dtype, add)  # the per-token sum over the k slots, the add and the cast


def _expert_linear(x: torch.Tensor, d: dict[str, torch.Tensor], e: int) -> torch.Tensor:
    """fp32 x @ W_e^T through the dsq.quant references (W8A8 simulation for FP8 experts)."""
    if "weight" in d:
        return fp8_linear(x, d["weight"][e], d["weight_scale"][e])
    z = d.get("weight_zero_point")
    return x @ int4_dequantize(d["weight_packed"][e], d["weight_scale"][e], None if z is None else z[e]).t()


def fused_moe_ref(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w1: dict[str, torch.Tensor],
                  w2: dict[str, torch.Tensor], w3: dict[str, torch.Tensor],
                  add: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-torch reference of fused_moe: a loop over experts in fp32 (h rounded to x.dtype like the
    kernel's intermediate), plus add, cast to x.dtype at the end."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    if add is not None:
        out += add
    for e in range((w1["weight"] if "weight" in w1 else w1["weight_packed"]).shape[0]):
        tok, slot = (topk_ids == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        xe = x[tok].float()
        h = F.silu(_expert_linear(xe, w1, e)) * _expert_linear(xe, w3, e)
        h = h.to(x.dtype).float()  # the kernel stores h in x.dtype between its two launches
        out.index_add_(0, tok, _expert_linear(h, w2, e) * topk_weights[tok, slot, None])
    return out.to(x.dtype)
