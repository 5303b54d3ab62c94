"""FP8 W8A8 GEMM: per-token (or per 1x128 group) dynamic FP8 activations times FP8 weights.

out = (x_q @ w_q^T) * x_scale * w_scale with fp8 x fp8 dots accumulated in fp32, matching
`dsq.quant.fp8_linear`. Two weight-scale layouts (compressed-tensors `float-quantized`):
- channel [N, 1]: activations per token; both scales are applied once, after the K loop;
- block [ceil(N/128), ceil(K/128)]: activations per 1x128 group (DeepGEMM / DeepSeek-V3 convention); each
  K step is exactly one 128-wide block column, so its dot is scaled by the tokens' group scales and the
  blocks' scales before it is added.
K needs no alignment (V2-Lite's dense down_proj has K = 10944 = 85.5 x 128): loads are masked and the
last, partial group has its own scales.

act_quant writes the fp8 activations once (a program per token and group), then the GEMM reads them:
- small M (decode, M <= 16): narrow column tiles give enough programs to stream the weights, each with a
  deep pipeline (~24 KB of weights in flight, what one SM needs to keep HBM busy);
- larger M: wgmma tiles in L2-grouped order.
Either splits K over programs when the output tiles cannot fill half the GPU (common.pick_split_k).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsq.quant import BLOCK, FP8, is_block_scale

from .act_quant import act_quant
from .common import GemmConfig, cast_out, mma_warps, pick_split_k, sm_count, splitk_reduce, tile_ids

SMALL_M = 16  # up to here decode tiles: one 16-row tile, streaming the weights
# Little's law: 4.8 TB/s of HBM x ~650 ns of latency / 132 SMs ~ 23 KB that each SM must have in flight
DECODE_BYTES_IN_FLIGHT = 24 * 1024


@triton.jit
def fp8_dot_step(
    acc, a, a_s, w_ptr, ws_ptr, offs_n, n_mask, t, K, stride_wn, stride_sn,
    BLOCK_SCALES: tl.constexpr, BK: tl.constexpr,
):
    """acc [BM, BN] += a fp8 [BM, BK] times fp8 weight rows offs_n, columns [t*BK, (t+1)*BK).

    With block scales the step's dot is scaled by a_s [BM] (the tokens' scales for this 1x128 group) and the
    weight blocks' scales before it is added; with channel scales the dot accumulates into acc and the
    caller scales once after the loop."""
    offs_k = t * BK + tl.arange(0, BK)
    w = tl.load(
        w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None],
        mask=n_mask[None, :] & (offs_k[:, None] < K), other=0.0,
    )
    if BLOCK_SCALES:
        w_s = tl.load(ws_ptr + (offs_n // 128) * stride_sn + t, mask=n_mask, other=0.0)
        return acc + tl.dot(a, w) * a_s[:, None] * w_s[None, :]
    # Hopper's fp8 wgmma accumulates with ~14-bit precision (DeepSeek-V3 measured ~2% error at K = 4096):
    # promote to the fp32 accumulator every K step, as DeepGEMM does
    return tl.dot(a, w, acc, max_num_imprecise_acc=BK)


@triton.jit
def _fp8_gemm_kernel(
    a_ptr, as_ptr, w_ptr, ws_ptr, out_ptr, M, N, K, SPLIT_K,
    stride_am, stride_asm, stride_wn, stride_sn, stride_om,
    BLOCK_SCALES: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[pid_k] = a rows x w^T over this program's share of K (out is [M, N], or fp32 [SPLIT, M, N]);
    a is fp8 with act_quant's scales in as_ptr."""
    pid_m, pid_n = tile_ids(tl.program_id(0), M, N, BM, BN, GROUP_M)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    m_mask = offs_m < M
    n_mask = offs_n < N
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
    k_tiles = tl.cdiv(K, BK)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    t0 = tl.program_id(1) * per_split
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for t in range(t0, tl.minimum(t0 + per_split, k_tiles)):
        offs_k = t * BK + tl.arange(0, BK)
        a = tl.load(a_rows + offs_k[None, :], mask=m_mask[:, None] & (offs_k[None, :] < K), other=0.0)
        if BLOCK_SCALES:  # noqa: SIM108 (constexpr branches stay statements for Triton's compiler)
            a_s = tl.load(as_ptr + offs_m * stride_asm + t, mask=m_mask, other=0.0)
        else:
            a_s = 1.0  # applied after the loop
        acc = fp8_dot_step(acc, a, a_s, w_ptr, ws_ptr, offs_n, n_mask, t, K, stride_wn, stride_sn, BLOCK_SCALES, BK)
    if not BLOCK_SCALES:
        a_s = tl.load(as_ptr + offs_m * stride_asm, mask=m_mask, other=0.0)
        w_s = tl.load(ws_ptr + offs_n * stride_sn, mask=n_mask, other=0.0)
        acc = acc * a_s[:, None] * w_s[None, :]
    out_ptr += tl.program_id(1).to(tl.int64) * M * N
    out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out, cast_out(acc, out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def fp8_config(m: int, n: int, k: int, x: torch.Tensor) -> GemmConfig:
    """Heuristic tiles, picked from sm_90 compiles (no register spills) and not yet timed on an H200;
    BK = 128 = one block-scale column. Small M: narrow column tiles so that ~all SMs get a program, and
    stages enough for DECODE_BYTES_IN_FLIGHT of weights (16 wide: 13 stages, 49 KB of shared memory)."""
    sms = sm_count(x)
    if m <= SMALL_M:
        bn = 32 if triton.cdiv(n, 32) >= sms else 16
        bm, warps, stages = 16, mma_warps(16, bn, 4), 1 + DECODE_BYTES_IN_FLIGHT // (bn * BLOCK)
    elif m <= 64:
        bm, bn, warps, stages = triton.next_power_of_2(m), 64, 4, 4
    elif m <= 256:
        bm, bn, warps, stages = 64, 128, 4, 4
    else:
        bm, bn, warps, stages = 128, 128, 8, 4
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    return GemmConfig(bm, bn, BLOCK, pick_split_k(tiles, triton.cdiv(k, BLOCK), sms), 8, warps, stages)


def fp8_gemm(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, *, config: GemmConfig | None = None
) -> torch.Tensor:
    """x [M, K] (bf16/fp16/fp32) times FP8 weight [N, K] with channel [N, 1] or block scales -> [M, N] in x.dtype.

    The activations are quantized dynamically (per token, or per 1x128 group under block scales) by act_quant,
    once, rather than by every program of the GEMM."""
    assert x.dim() == 2 and x.stride(1) == 1, f"x must be row-major 2-D, got {tuple(x.shape)}"
    assert x.dtype in (torch.bfloat16, torch.float16, torch.float32), x.dtype
    block = is_block_scale(weight, weight_scale)
    xq, xs = act_quant(x, BLOCK if block else None)
    return fp8_gemm_q(xq, xs, weight, weight_scale, x.dtype, config=config)


def fp8_gemm_q(
    xq: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16, *, config: GemmConfig | None = None,
) -> torch.Tensor:
    """fp8_gemm on activations already quantized by act_quant, so that projections of the same input
    (q_proj and kv_a_proj, dense gate and up) can share one quantization. -> [M, N] in out_dtype."""
    assert xq.dim() == 2 and xq.dtype == FP8 and xq.stride(1) == 1 and xs.dtype == torch.float32
    block = is_block_scale(weight, weight_scale)
    assert xs.shape == (xq.shape[0], triton.cdiv(xq.shape[1], BLOCK) if block else 1), tuple(xs.shape)
    return _launch(xq, xs, weight, weight_scale, out_dtype, config)


def _launch(
    a: torch.Tensor, a_s: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
    out_dtype: torch.dtype, config: GemmConfig | None,
) -> torch.Tensor:
    """Check the weight, pick the tiles, run the GEMM (+ the split-K sum)."""
    m, k = a.shape
    n = weight.shape[0]
    assert weight.dtype == FP8 and weight.shape == (n, k) and weight.is_contiguous(), (weight.dtype, weight.shape)
    assert weight_scale.dtype == torch.float32 and weight_scale.is_contiguous(), weight_scale.dtype
    block = is_block_scale(weight, weight_scale)
    if block:
        assert weight_scale.shape == (triton.cdiv(n, BLOCK), triton.cdiv(k, BLOCK)), tuple(weight_scale.shape)
    cfg = config or fp8_config(m, n, k, a)
    cfg.check()
    assert cfg.bk == BLOCK or not block, "block scales step by 128"
    if m == 0:
        return a.new_empty(0, n, dtype=out_dtype)
    split = cfg.split_k > 1
    out = a.new_empty(cfg.split_k, m, n, dtype=torch.float32) if split else a.new_empty(m, n, dtype=out_dtype)
    grid = (triton.cdiv(m, cfg.bm) * triton.cdiv(n, cfg.bn), cfg.split_k)
    _fp8_gemm_kernel[grid](
        a, a_s, weight, weight_scale, out, m, n, k, cfg.split_k,
        a.stride(0), a_s.stride(0), weight.stride(0), weight_scale.stride(0), n,
        BLOCK_SCALES=block, BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, GROUP_M=cfg.group_m, num_warps=cfg.warps,
        num_stages=cfg.stages,
    )
    return splitk_reduce(out, out_dtype) if split else out
