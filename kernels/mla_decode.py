"""Absorbed-MLA decode attention over the paged latent cache (dsq.latent: its layouts and this kernel's torch
reference, mla_decode_ref).

For each sequence b and head h, with the latent query q_lat[b, h] = q_nope W_UK (C values) and the roped
q_pe[b, h] (R values): score_t = (q_lat . c_t + q_pe . k_pe_t) * scale over the tokens t < seq_lens[b],
p = softmax(score) in fp32, o_lat[b, h] = sum_t p_t c_t. The caller applies W_UV and o_proj.

All heads share one latent per token (MQA-like), so a program takes a tile of heads and reads each
cache page once for all of them: grid (batch, head tiles, KV splits). Long contexts are split across
programs and merged by a log-sum-exp reduce. The grid depends only on host-side shapes (num_splits from
the batch bucket's capacity, never from seq_lens on the device), so one launch can be captured in a
CUDA graph per batch bucket. At 16 heads (V2-Lite) the kernel is bound by the cache read; at 128 (V2)
by the dots (424 FLOP per cache byte, bench/mla.py).

Default tile: 16 heads x 32 tokens, 8 warps, 2 stages, the largest that ptxas fits for sm_90 without
spills (214 registers fp8, 186 bf16; 4 warps spill). Chosen before any GPU timing: bench/mla.py times
the alternatives.

Under the Triton interpreter the dots run in fp32 (it computes bf16 on the bit patterns: Triton's debugging
guide, and triton-lang/triton#11584 for tl.dot); on the GPU
they take bf16 operands with fp32 accumulation, otherwise the code is the same.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsq.latent import LatentPool, group_size

from .common import dot_dtype, round_bf16, sm_count

_LOG2E = 1.4426950408889634
_MIN_SPLIT_TOKENS = 32  # one BLOCK_N tile (default_num_splits says why)


@triton.jit
def _decode_kernel(q_ptr, qpe_ptr, kv_ptr, scale_ptr, pe_ptr, pt_ptr, len_ptr, o_ptr, lse_ptr, qk_scale,
                   stride_qb, stride_qh, stride_pb, stride_ph, stride_pt, stride_ob, stride_oh, stride_os, H,
                   num_splits, C: tl.constexpr, R: tl.constexpr, GS: tl.constexpr, PAGE: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
                   FP8: tl.constexpr, OUT_BF16: tl.constexpr, DOT: tl.constexpr):
    """Online softmax over one KV split of one sequence for a tile of heads.

    Without SPLIT (num_splits == 1) it writes the normalised o_lat; with it, the split's normalised
    partial output (stride_os apart) and its log2-sum-exp, for _reduce_kernel. num_splits is a runtime
    value so that buckets of different sizes share one compiled kernel.
    """
    b = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    split = tl.program_id(2)
    seq_len = tl.load(len_ptr + b)
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    hmask = heads[:, None] < H
    offs_c = tl.arange(0, C)
    offs_r = tl.arange(0, R)
    G: tl.constexpr = C // GS  # fp8 scale groups
    offs_g = tl.arange(0, G)
    offs3 = offs_g[None, :, None] * GS + tl.arange(0, GS)[None, None, :]  # [1, G, GS]
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_c[None, :], mask=hmask, other=0.0)
    q = q.to(DOT)  # bf16 -> DOT is exact: a no-op on the GPU, the upcast the interpreter needs
    qpe = tl.load(qpe_ptr + b * stride_pb + heads[:, None] * stride_ph + offs_r[None, :], mask=hmask, other=0.0)
    qpe = qpe.to(DOT)

    m = tl.full([BLOCK_H], float("-inf"), tl.float32)  # running max of the log2-domain scores
    l_sum = tl.zeros([BLOCK_H], tl.float32)  # running sum of exp2(score - m)
    acc = tl.zeros([BLOCK_H, C], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        toks = n0 + tl.arange(0, BLOCK_N)
        valid = toks < end
        page = tl.load(pt_ptr + b * stride_pt + toks // PAGE, mask=valid, other=0)
        slot = page.to(tl.int64) * PAGE + toks % PAGE
        if FP8:  # dequantize once: the same tile is the key (scores) and the value (output)
            k3 = tl.load(kv_ptr + slot[:, None, None] * C + offs3, mask=valid[:, None, None], other=0.0)
            s = tl.load(scale_ptr + slot[:, None] * G + offs_g[None, :], mask=valid[:, None], other=0.0)
            k = tl.reshape(k3.to(tl.float32) * s[:, :, None], (BLOCK_N, C)).to(DOT)
        else:
            k = tl.load(kv_ptr + slot[:, None] * C + offs_c[None, :], mask=valid[:, None], other=0.0)
            k = k.to(DOT)
        pe = tl.load(pe_ptr + slot[:, None] * R + offs_r[None, :], mask=valid[:, None], other=0.0)
        pe = pe.to(DOT)

        qk = tl.dot(q, tl.trans(k)) + tl.dot(qpe, tl.trans(pe))
        qk = tl.where(valid[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(qk, axis=1))  # finite: every step has a valid token
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT), k)
        m = m_new

    out = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]  # an empty split (or sequence) gives 0, not NaN
    o_ptrs = (o_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + split * stride_os
              + offs_c[None, :])
    if OUT_BF16:
        tl.store(o_ptrs, round_bf16(out), mask=hmask)
    else:
        tl.store(o_ptrs, out, mask=hmask)
    if SPLIT:
        lse = m + tl.log2(tl.where(l_sum > 0, l_sum, 1.0))  # -inf for an empty split
        tl.store(lse_ptr + (b * H + heads) * num_splits + split, lse, mask=heads < H)


@triton.jit
def _reduce_kernel(mid_ptr, lse_ptr, o_ptr, stride_ob, stride_oh, H, num_splits, C: tl.constexpr,
                   BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, OUT_BF16: tl.constexpr):
    """Merge one head's split partial outputs [num_splits, BLOCK_C] (of mid [B, H, num_splits, C]) by their
    log2-sum-exp weights, BLOCK_S splits at a time, so any split count works.

    One program per (sequence, head, channel tile): at batch 1 the splits' partials (num_splits x 32 KB per 16
    heads) are read by H * C / BLOCK_C programs in parallel, not by one."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    row = (b * H + h).to(tl.int64) * num_splits
    m_vec = tl.full([BLOCK_S], float("-inf"), tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):  # the largest log2-sum-exp: -inf when every split is empty
        splits = s0 + tl.arange(0, BLOCK_S)
        m_vec = tl.maximum(m_vec, tl.load(lse_ptr + row + splits, mask=splits < num_splits, other=float("-inf")))
    m = tl.max(m_vec, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)  # all splits empty: weights 0, not NaN
    l_vec = tl.zeros([BLOCK_S], tl.float32)
    acc = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        splits = s0 + tl.arange(0, BLOCK_S)
        smask = splits < num_splits
        w = tl.exp2(tl.load(lse_ptr + row + splits, mask=smask, other=float("-inf")) - m)
        part = tl.load(mid_ptr + (row + splits)[:, None] * C + offs_c[None, :], mask=smask[:, None], other=0.0)
        acc += w[:, None] * part
        l_vec += w
    l_sum = tl.sum(l_vec, axis=0)
    out = tl.sum(acc, axis=0) / tl.where(l_sum > 0, l_sum, 1.0)
    o_ptrs = o_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + offs_c
    if OUT_BF16:
        tl.store(o_ptrs, round_bf16(out))
    else:
        tl.store(o_ptrs, out)


def default_num_splits(batch: int, num_heads: int, max_seq_len: int, num_sms: int, block_h: int = 16) -> int:
    """KV splits for a batch bucket: enough programs to give every SM one, each split >= 32 tokens.

    One program per SM is a full wave (an FP8-cache program, 174 registers x 256 threads, is the only one
    resident on its SM on sm_90), so at batch 1 and 16 heads a context of >= 132 x 32 = 4,224 tokens runs
    on all 132 SMs of an H200 (1K: 32 programs). The floor of 32 tokens is one BLOCK_N tile: a split's
    cache read (21 KB of FP8 latents) is then about the ~23 KB that one SM must keep in flight to saturate
    HBM, while its fp32 partial output (32 KB per 16 heads) stays in L2 for the reduce (132 of them: 4 MB
    of 50 MB). Below ~4K tokens the whole cache is < 3 MB, latency more than bandwidth, and more, emptier
    splits would only add partials to merge.
    """
    programs = batch * triton.cdiv(num_heads, block_h)
    want = triton.cdiv(num_sms, programs)
    return max(1, min(want, max_seq_len // _MIN_SPLIT_TOKENS))


def _pow2(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def mla_decode(q_lat: torch.Tensor, q_pe: torch.Tensor, pool: LatentPool, page_table: torch.Tensor,
               seq_lens: torch.Tensor, scale: float, *, num_splits: int | None = None,
               max_seq_len: int | None = None, out: torch.Tensor | None = None, block_h: int = 16,
               block_n: int = 32, num_warps: int = 8, num_stages: int = 2) -> torch.Tensor:
    """o_lat [B, H, C] (q_lat's dtype, fp32 or bf16; into `out` if given) from q_lat [B, H, C], q_pe [B, H, R].

    page_table [B, max_pages] int32, seq_lens [B] int32 (0 gives a zero output). num_splits defaults
    from max_seq_len, itself by default the page table's capacity: pass the batch bucket's values so the
    grid, and a captured CUDA graph, stay fixed while the sequences grow.
    """
    bsz, h, c = q_lat.shape
    r = q_pe.shape[2]
    assert q_pe.shape == (bsz, h, r) and pool.kv.shape[2] == c and pool.pe.shape[2] == r, "shape mismatch"
    assert _pow2(c) and _pow2(r), f"C={c} and R={r} must be powers of two >= 16"
    assert pool.kv_cache_dtype != "fp32", "the fp32 reference cache is read by dsq.latent.mla_decode_ref"
    assert _pow2(block_h) and _pow2(block_n), "block_h and block_n must be powers of two >= 16 (tl.dot)"
    assert q_lat.stride(2) == 1 and q_pe.stride(2) == 1, "q_lat / q_pe need a contiguous last dim"
    assert q_lat.dtype in (torch.float32, torch.bfloat16) and q_pe.dtype in (torch.float32, torch.bfloat16)
    assert page_table.dtype == torch.int32 and page_table.dim() == 2 and page_table.shape[0] == bsz
    assert seq_lens.dtype == torch.int32 and seq_lens.shape == (bsz,)
    assert page_table.stride(1) == 1 and seq_lens.is_contiguous()
    out = torch.empty(q_lat.shape, dtype=q_lat.dtype, device=q_lat.device) if out is None else out
    assert out.shape == (bsz, h, c) and out.stride(2) == 1 and out.dtype in (torch.float32, torch.bfloat16)
    if max_seq_len is None:
        max_seq_len = page_table.shape[1] * pool.page_size
    if num_splits is None:
        # interpreted, one split: the interpreter runs programs one after another, so more would only add the
        # reduce (the split path's tests pass num_splits)
        num_splits = default_num_splits(bsz, h, max_seq_len, sm_count(q_lat) if q_lat.is_cuda else 1, block_h)
    fp8 = pool.kv_cache_dtype == "fp8"
    out_bf16 = out.dtype == torch.bfloat16
    o_view = out.view(torch.int16) if out_bf16 else out
    tiles = triton.cdiv(h, block_h)
    if num_splits > 1:
        mid = torch.empty(bsz, h, num_splits, c, dtype=torch.float32, device=q_lat.device)
        lse = torch.empty(bsz, h, num_splits, dtype=torch.float32, device=q_lat.device)
        dst, dst_strides = mid, (mid.stride(0), mid.stride(1), mid.stride(2))
    else:
        lse = mid = None
        dst, dst_strides = o_view, (out.stride(0), out.stride(1), 0)
    _decode_kernel[(bsz, tiles, num_splits)](
        q_lat, q_pe, pool.kv, pool.scale if fp8 else pool.kv, pool.pe, page_table, seq_lens, dst,
        dst if lse is None else lse, scale * _LOG2E, q_lat.stride(0), q_lat.stride(1), q_pe.stride(0),
        q_pe.stride(1), page_table.stride(0), *dst_strides, h, num_splits, C=c, R=r, GS=group_size(c),
        PAGE=pool.page_size, BLOCK_H=block_h, BLOCK_N=block_n, SPLIT=num_splits > 1, FP8=fp8,
        OUT_BF16=out_bf16 and num_splits == 1, DOT=dot_dtype(q_lat, torch.bfloat16),
        num_warps=num_warps, num_stages=num_stages)
    if mid is not None:
        block_c = min(c, 128)
        _reduce_kernel[(bsz, h, c // block_c)](mid, lse, o_view, out.stride(0), out.stride(1), h, num_splits,
                                               C=c, BLOCK_S=16, BLOCK_C=block_c, OUT_BF16=out_bf16, num_warps=4)
    return out
