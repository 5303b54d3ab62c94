"""The naive MLA path's queries and keys, roped and laid out for attention in one launch.

A prefill chunk of T queries attends S keys (the last T of them are its own tokens): per head h,
q[h, t] = [q_nope[t, h], rope(q_pe[t, h])] and k[h, s] = [k_nope[s, h], k_pe[s]] with k_pe shared by all heads
(DeepSeek-V2 paper, arXiv 2405.04434, section 2.1.3), roped here for a fresh chunk (S == T: its keys are its
queries' tokens) or already roped as the latent cache holds it. The torch path (dsq.rope.naive_qk_ref) builds
them from apply_rope, two concatenations and a broadcast (about 20 small kernels per layer); this writes both
[H, T|S, P+R] tensors contiguous, as scaled_dot_product_attention reads them. The rope is apply_rope's fp32
ops in its order with FMA contraction off, rounded to the model dtype once: bit-exact against it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import check_rope_tables, rope_rows


@triton.jit
def _rows(src_ptr, pe_ptr, cos_ptr, sin_ptr, out_ptr, offs, n, h, P, stride_t, stride_h, stride_pt, stride_ct,
          ROPE: tl.constexpr, R: tl.constexpr, BP: tl.constexpr, BR: tl.constexpr):
    """out[h, offs] = [src[offs, h, :P], rope?(pe[offs])] for the rows offs < n."""
    rows = offs.to(tl.int64)
    mask = offs < n
    p = tl.arange(0, BP)[None, :]
    out = out_ptr + h.to(tl.int64) * n * (P + R)
    m = mask[:, None] & (p < P)
    tl.store(out + rows[:, None] * (P + R) + p, tl.load(src_ptr + rows[:, None] * stride_t + h * stride_h + p, mask=m),
             mask=m)
    rope_rows(pe_ptr, cos_ptr, sin_ptr, out + P, rows, mask, stride_pt, stride_ct, P + R, R, BR, ROPE)


@triton.jit
def _naive_qk_kernel(q_ptr, kn_ptr, kpe_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, T, S, P, stride_qt, stride_qh,
                     stride_kt, stride_kh, stride_pt, stride_ct, ROPE_K: tl.constexpr, R: tl.constexpr,
                     BT: tl.constexpr, BP: tl.constexpr, BR: tl.constexpr):
    """One head, BT rows: of k (rows < S) and of q (rows < T; its rope dims at columns P.. of q)."""
    offs = tl.program_id(0) * BT + tl.arange(0, BT)
    h = tl.program_id(1)
    _rows(kn_ptr, kpe_ptr, cos_ptr, sin_ptr, ko_ptr, offs, S, h, P, stride_kt, stride_kh, stride_pt, stride_ct,
          ROPE_K, R, BP, BR)
    if tl.program_id(0) * BT < T:
        _rows(q_ptr, q_ptr + h * stride_qh + P, cos_ptr, sin_ptr, qo_ptr, offs, T, h, P, stride_qt, stride_qh,
              stride_qt, stride_ct, True, R, BP, BR)


def naive_qk(q: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             rope_k: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, H, P+R] (rope dims unroped), k_nope [S, H, P] and k_pe [S, R] (unroped when rope_k, which needs
    S == T), cos/sin [T, R/2] fp32 of the queries' positions -> (q [H, T, P+R], k [H, S, P+R]) contiguous, in
    q's dtype. Inputs may be row-strided views (kv_b's output split, kv_a's columns)."""
    t, h, d = q.shape
    s, p = k_nope.shape[0], k_nope.shape[2]
    r = d - p
    assert k_nope.shape[1] == h and k_pe.shape == (s, r) and r % 2 == 0, (q.shape, k_nope.shape, k_pe.shape)
    assert q.stride(2) == k_nope.stride(2) == k_pe.stride(1) == 1, "the last dims must be contiguous"
    assert q.dtype == k_nope.dtype == k_pe.dtype, (q.dtype, k_nope.dtype, k_pe.dtype)
    assert t <= s and (s == t or not rope_k), f"a fresh chunk's keys are its queries: S {s}, T {t}"
    check_rope_tables(cos, sin, t, r)
    qo = torch.empty(h, t, d, dtype=q.dtype, device=q.device)
    ko = torch.empty(h, s, d, dtype=q.dtype, device=q.device)
    if s == 0:
        return qo, ko
    bt = 32
    _naive_qk_kernel[(triton.cdiv(s, bt), h)](
        q, k_nope, k_pe, cos, sin, qo, ko, t, s, p, q.stride(0), q.stride(1), k_nope.stride(0), k_nope.stride(1),
        k_pe.stride(0), cos.stride(0), ROPE_K=rope_k, R=r, BT=bt, BP=triton.next_power_of_2(p),
        BR=triton.next_power_of_2(r // 2), enable_fp_fusion=False, num_warps=4)
    return qo, ko
