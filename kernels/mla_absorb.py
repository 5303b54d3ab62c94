"""The absorbed MLA projections of a decode step, reading the FP8 kv_b_proj weight as stored.

kv_b_proj [H * (P + V), C] holds, per head h, W_UK in rows h(P+V) .. h(P+V)+P and W_UV in the V rows after
(DeepSeek-V2 paper, arXiv 2405.04434, section 2.1.2). The callers pass those halves as [H, P, C] and [H, V, C]
views of the stored tensors (dsq.model.MLA.uk_uv) with their scales, so each kernel is handed, and reads, only
its own half. Around the latent attention (kernels/mla_decode.py):
- absorb_q: q_lat[b, h] = q_nope[b, h] @ W_UK[h] [C] in fp32, and q_pe[b, h] roped, in one launch: the
  programs of the first latent tile also rotate the rope dims, exactly as dsq.rope.apply_rope does (fp32 ops
  in its order, FMA contraction off, rounded to q's dtype), so both outputs go to mla_decode as they are;
- absorb_o: o[b, h*V + v] = o_lat[b, h] . W_UV[h, v], in the model dtype, ready for o_proj.

Each program dequantizes a weight tile in registers (fp8 x its channel [N, 1] or 128x128 block scale, in
fp32) and multiplies it by a tile of up to 64 tokens, so the weight is read once per step and no BF16 copy of
it exists. Block scales must not straddle heads' halves (P and V multiples of 128, as in DeepSeek-V2 and -Lite).
On the GPU the dot operands are rounded to the 16-bit model dtype, as the torch backend's BF16 W_UK / W_UV
copies are, with fp32 accumulation; under the interpreter they stay fp32.

Not fused: the FP8 quantization of o for o_proj. Its per-token scale spans all heads, which different
programs write; one launch would need a grid-wide barrier or one program reading all of W_UV per token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsq.quant import BLOCK, FP8, fp8_dequantize_weight, is_block_scale
from dsq.rope import apply_rope

from .common import cast_out, check_rope_tables, dot_dtype, mma_warps, rope_rows

_MAX_TOKENS = 64  # tokens per program: a decode bucket's batch in one tile, each weight tile read once


@triton.jit
def _dequant_tile(w_ptr, s_ptr, rows, cols, mask, stride_w, stride_s0, stride_s1, SB: tl.constexpr):
    """fp32 tile [rows x cols] of one head's weight: fp8 times its scale, scale[row // SB, col // SB] (channel:
    SB = 1 with stride_s1 = 0; blocks: SB = 128)."""
    w = tl.load(w_ptr + rows.to(tl.int64) * stride_w + cols, mask=mask, other=0.0).to(tl.float32)
    return w * tl.load(s_ptr + (rows // SB) * stride_s0 + (cols // SB) * stride_s1, mask=mask, other=0.0)


@triton.jit
def _absorb_q_kernel(q_ptr, cos_ptr, sin_ptr, w_ptr, s_ptr, lat_ptr, pe_ptr, B, P, C,
                     stride_qb, stride_qh, stride_cb, stride_wh, stride_w, stride_sh, stride_s0, stride_s1,
                     H: tl.constexpr, R: tl.constexpr, SB: tl.constexpr, BB: tl.constexpr,
                     BP: tl.constexpr, BC: tl.constexpr, BR: tl.constexpr, DOT: tl.constexpr):
    """One head, BC latent channels, BB tokens: q_lat tile = q_nope @ W_UK tile; latent tile 0 also ropes."""
    h = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_b = tl.program_id(2) * BB + tl.arange(0, BB)
    offs_c = pid_c * BC + tl.arange(0, BC)
    b_mask, c_mask = offs_b < B, offs_c < C
    q_rows = q_ptr + offs_b.to(tl.int64)[:, None] * stride_qb + h * stride_qh
    w_ptr += h * stride_wh
    s_ptr += h * stride_sh
    acc = tl.zeros([BB, BC], tl.float32)
    for p0 in range(0, P, BP):
        offs_p = p0 + tl.arange(0, BP)
        p_mask = offs_p < P
        x = tl.load(q_rows + offs_p[None, :], mask=b_mask[:, None] & p_mask[None, :], other=0.0)
        w = _dequant_tile(w_ptr, s_ptr, offs_p[:, None], offs_c[None, :], p_mask[:, None] & c_mask[None, :],
                          stride_w, stride_s0, stride_s1, SB)
        acc = tl.dot(x.to(DOT), w.to(DOT), acc)
    lat = lat_ptr + (offs_b.to(tl.int64)[:, None] * H + h) * C + offs_c[None, :]
    tl.store(lat, acc, mask=b_mask[:, None] & c_mask[None, :])
    if pid_c == 0:  # the rope of q_pe, at columns P.. of the head
        rope_rows(q_ptr + h * stride_qh + P, cos_ptr, sin_ptr, pe_ptr + h * R, offs_b.to(tl.int64), b_mask,
                  stride_qb, stride_cb, H * R, R, BR, True)


@triton.jit
def _absorb_o_kernel(lat_ptr, w_ptr, s_ptr, o_ptr, B, V, C, stride_lb, stride_lh, stride_wh, stride_w, stride_sh,
                     stride_s0, stride_s1, H: tl.constexpr, SB: tl.constexpr, BB: tl.constexpr,
                     BV: tl.constexpr, BC: tl.constexpr, DOT: tl.constexpr):
    """One head, BV output dims, BB tokens: o tile = o_lat @ W_UV tile^T, over the latent in BC steps."""
    h = tl.program_id(0)
    offs_v = tl.program_id(1) * BV + tl.arange(0, BV)
    offs_b = tl.program_id(2) * BB + tl.arange(0, BB)
    b_mask, v_mask = offs_b < B, offs_v < V
    lat_rows = lat_ptr + offs_b.to(tl.int64)[:, None] * stride_lb + h * stride_lh
    w_ptr += h * stride_wh
    s_ptr += h * stride_sh
    acc = tl.zeros([BB, BV], tl.float32)
    for c0 in range(0, C, BC):
        offs_c = c0 + tl.arange(0, BC)
        c_mask = offs_c < C
        x = tl.load(lat_rows + offs_c[None, :], mask=b_mask[:, None] & c_mask[None, :], other=0.0)
        w = _dequant_tile(w_ptr, s_ptr, offs_v[None, :], offs_c[:, None], c_mask[:, None] & v_mask[None, :],
                          stride_w, stride_s0, stride_s1, SB)
        acc = tl.dot(x.to(DOT), w.to(DOT), acc)
    o = o_ptr + offs_b.to(tl.int64)[:, None] * (H * V) + h * V + offs_v[None, :]
    tl.store(o, cast_out(acc, o_ptr.dtype.element_ty), mask=b_mask[:, None] & v_mask[None, :])


def _weight(weight: torch.Tensor, scale: torch.Tensor) -> tuple[int, tuple[int, ...]]:
    """A head-major half of kv_b [H, N, C] (rows of a 2-D tensor, any head stride) and its scale [H, N, 1] or
    [H, N/128, C/128] -> (SB, (stride_wh, stride_w, stride_sh, stride_s0, stride_s1)) for _dequant_tile."""
    h, n, c = weight.shape
    assert weight.dtype == FP8 and weight.stride(2) == 1, (weight.dtype, weight.stride())
    assert scale.dtype == torch.float32 and scale.dim() == 3 and scale.shape[0] == h, (scale.dtype, scale.shape)
    if is_block_scale(weight, scale):
        assert scale.shape[1:] == (triton.cdiv(n, BLOCK), triton.cdiv(c, BLOCK)) and scale.stride(2) == 1, \
            f"block scales {tuple(scale.shape)} of a [{h}, {n}, {c}] half: one block row per 128 rows of a head"
        return BLOCK, (weight.stride(0), weight.stride(1), *scale.stride())
    return 1, (weight.stride(0), weight.stride(1), scale.stride(0), scale.stride(1), 0)


def _tokens(b: int) -> int:
    return min(max(triton.next_power_of_2(b), 16), _MAX_TOKENS)


def absorb_q(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, w_uk: torch.Tensor,
             uk_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, H, P+R] (q_proj's output, any row strides), cos/sin [B, R/2] fp32, W_UK [H, P, C] fp8 and its
    scale -> (q_lat [B, H, C] fp32, q_pe roped [B, H, R] in q's dtype), both contiguous."""
    b, h, pr = q.shape
    r = 2 * cos.shape[1]
    p, c = w_uk.shape[1:]
    sb, strides = _weight(w_uk, uk_scale)
    assert q.stride(2) == 1 and q.dtype in (torch.bfloat16, torch.float16, torch.float32), (q.stride(), q.dtype)
    assert w_uk.shape[0] == h and pr == p + r, (tuple(q.shape), tuple(w_uk.shape), r)
    check_rope_tables(cos, sin, b, r)
    q_lat = torch.empty(b, h, c, dtype=torch.float32, device=q.device)
    q_pe = torch.empty(b, h, r, dtype=q.dtype, device=q.device)
    if b == 0:
        return q_lat, q_pe
    bb, bc = _tokens(b), min(max(triton.next_power_of_2(c), 16), 64)
    _absorb_q_kernel[(h, triton.cdiv(c, bc), triton.cdiv(b, bb))](
        q, cos, sin, w_uk, uk_scale, q_lat, q_pe, b, p, c, q.stride(0), q.stride(1), cos.stride(0), *strides, H=h,
        R=r, SB=sb, BB=bb, BP=min(max(triton.next_power_of_2(p), 16), 64), BC=bc, BR=triton.next_power_of_2(r // 2),
        DOT=dot_dtype(q), enable_fp_fusion=False, num_warps=4)
    return q_lat, q_pe


def absorb_o(o_lat: torch.Tensor, w_uv: torch.Tensor, uv_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """o_lat [B, H, C] (mla_decode's fp32 output), W_UV [H, V, C] fp8 and its scale -> o [B, H*V] in dtype,
    the heads' outputs side by side as o_proj takes them."""
    b, h, c = o_lat.shape
    v = w_uv.shape[1]
    sb, strides = _weight(w_uv, uv_scale)
    assert w_uv.shape[::2] == (h, c) and o_lat.stride(2) == 1, (tuple(w_uv.shape), tuple(o_lat.shape))
    assert o_lat.dtype in (torch.float32, torch.bfloat16, torch.float16), o_lat.dtype
    o = torch.empty(b, h * v, dtype=dtype, device=o_lat.device)
    if b == 0:
        return o
    bb, bv = _tokens(b), 16  # 16 output dims per program: V2-Lite's 16 x 128 at batch 1 -> 128 programs
    _absorb_o_kernel[(h, triton.cdiv(v, bv), triton.cdiv(b, bb))](
        o_lat, w_uv, uv_scale, o, b, v, c, o_lat.stride(0), o_lat.stride(1), *strides, H=h, SB=sb, BB=bb,
        BV=bv, BC=min(max(triton.next_power_of_2(c), 16), 128), DOT=dot_dtype(o_lat, dtype),
        num_warps=mma_warps(bb, bv, 4))
    return o


def absorb_q_ref(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, w_uk: torch.Tensor,
                 uk_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """absorb_q in torch, fp32 products of the dequantized weight; the rope is dsq.rope.apply_rope."""
    q_nope, q_pe = q.split([w_uk.shape[1], q.shape[2] - w_uk.shape[1]], dim=-1)
    uk = fp8_dequantize_weight(w_uk, uk_scale)
    return torch.einsum("bhp,hpc->bhc", q_nope.float(), uk), apply_rope(q_pe, cos[:, None], sin[:, None])


def absorb_o_ref(o_lat: torch.Tensor, w_uv: torch.Tensor, uv_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """absorb_o in torch, fp32 products of the dequantized weight."""
    uv = fp8_dequantize_weight(w_uv, uv_scale)
    return torch.einsum("bhc,hvc->bhv", o_lat.float(), uv).flatten(1).to(dtype)
