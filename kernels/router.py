"""The MoE router, one program per token: the logits x @ W^T in fp32, softmax over the experts, greedy or
group-limited top-k (DeepSeek-V2's `group_limited_greedy`: keep the `topk_groups` groups with the highest
expert score, then pick among their experts), then normalise the k weights or scale them.

This is dsq.model.Gate's maths in one launch instead of ~10 torch ops. The logits are fp32 sums of the
products of x and W upcast to fp32, as Gate's F.linear(x.float(), W.float()), in another summation order.
Up to FUSED_MAX_TOKENS tokens (decode batches of up to 64, not all of the CUDA graphs' buckets, which go to 256)
and FUSED_MAX_BYTES of W (V2-Lite's, not V2's) each program computes its token's logits itself, one launch
instead of three (casts and GEMM) ahead of it.
Beyond, each program would re-read all of W (E x D, 0.5 MB in fp32 for V2-Lite) from L2 for its one token, a
wave per SM count of tokens, while a GEMM reads it once per tile: there a torch GEMM makes the logits and the
kernel reads them (a prefill chunk's ~80 launches per layer dwarf its three). Untimed: one program streams W
through one SM, 16K-element tiles to keep loads in flight; should that lose to the three launches, split W
over programs with a last-program-reduces semaphore.

Experts are chosen by their logits: the softmax is monotonic, so the choice is torch's on the same logits.
Ties (equal logits, or equal group maxima) go to the lower expert (group) index, and the k slots come out in
descending score, ties in ascending expert id. The ids are int64 and contiguous, as fused_moe takes them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# one program per token, each streaming all of W: up to one wave of programs on an H200's 132 SMs (64, the
# largest batch bucket under it), so W's re-reads run side by side; larger batches keep the GEMM
FUSED_MAX_TOKENS = 64
# one SM streams W per token: V2-Lite's 0.5 MB in ~5 us at ~100 GB/s per SM, about the three launches it
# replaces; V2's 3.3 MB would take ~30 us per layer, so it keeps the GEMM (guesses until bench/kernels.py's
# router table is measured)
FUSED_MAX_BYTES = 1 << 20


@triton.jit
def _router_kernel(
    x_ptr, gate_ptr, logits_ptr, weight_ptr, ids_ptr, E, D, stride_x, stride_g, stride_l, scale,
    K: tl.constexpr, GROUPS: tl.constexpr, TOPK_GROUPS: tl.constexpr, NORM: tl.constexpr, FUSED: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """FUSED: logits of token t = x[t] @ gate^T, D in steps of BLOCK_D; else read from logits_ptr."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_E)
    valid = offs < E
    if FUSED:
        acc = tl.zeros([BLOCK_E, BLOCK_D], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            x = tl.load(x_ptr + t * stride_x + d, mask=d < D, other=0.0).to(tl.float32)
            w = tl.load(gate_ptr + offs[:, None] * stride_g + d[None, :], mask=valid[:, None] & (d[None, :] < D),
                        other=0.0)
            acc += w.to(tl.float32) * x[None, :]
        logit = tl.where(valid, tl.sum(acc, axis=1), float("-inf"))
    else:
        logit = tl.load(logits_ptr + t * stride_l + offs, mask=valid, other=float("-inf"))
    e = tl.where(valid, tl.exp(logit - tl.max(logit, axis=0)), 0.0)
    score = e / tl.sum(e, axis=0)
    if GROUPS > 1:  # keep the TOPK_GROUPS groups with the highest expert logit
        group = offs // (E // GROUPS)
        g = tl.arange(0, BLOCK_G)
        best = tl.full([BLOCK_G], float("-inf"), tl.float32)
        for i in tl.static_range(GROUPS):
            best = tl.where(g == i, tl.max(tl.where(group == i, logit, float("-inf")), axis=0), best)
        keep = tl.zeros([BLOCK_E], dtype=tl.int1)
        for _ in tl.static_range(TOPK_GROUPS):
            top = tl.min(tl.where(best == tl.max(best, axis=0), g, BLOCK_G), axis=0)
            keep = keep | (group == top)
            best = tl.where(g == top, float("-inf"), best)
        logit = tl.where(keep, logit, float("-inf"))
    slot = tl.arange(0, BLOCK_K)
    weights = tl.zeros([BLOCK_K], dtype=tl.float32)
    ids = tl.zeros([BLOCK_K], dtype=tl.int64)
    for j in tl.static_range(K):  # greedy: the highest remaining logit, the lower id on a tie
        top = tl.min(tl.where(logit == tl.max(logit, axis=0), offs, BLOCK_E), axis=0)
        weights = tl.where(slot == j, tl.sum(tl.where(offs == top, score, 0.0), axis=0), weights)
        ids = tl.where(slot == j, top.to(tl.int64), ids)
        logit = tl.where(offs == top, float("-inf"), logit)
    if NORM:  # noqa: SIM108 (constexpr branches stay statements for Triton's compiler)
        weights = weights / (tl.sum(weights, axis=0) + 1e-20)
    else:
        weights = weights * scale
    tl.store(weight_ptr + t * K + slot, weights, mask=slot < K)
    tl.store(ids_ptr + t * K + slot, ids, mask=slot < K)


def route(
    x: torch.Tensor, gate: torch.Tensor, k: int, groups: int = 1, topk_groups: int = 1, norm: bool = False,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states x [T, D] and the router weight [E, D] -> (weights fp32 [T, k], expert ids int64 [T, k]),
    as dsq.model.Gate.

    groups > 1: group-limited (E // groups experts per group, the best `topk_groups` groups kept);
    norm: weights / their sum (when k > 1, as Gate does); else weights * scale."""
    assert x.dim() == 2 and x.stride(1) == 1 and x.dtype.is_floating_point, (tuple(x.shape), x.dtype)
    assert gate.dim() == 2 and gate.shape[1] == x.shape[1] and gate.stride(1) == 1, tuple(gate.shape)
    assert gate.dtype in (torch.float32, torch.bfloat16, torch.float16), gate.dtype
    (t, d), e = x.shape, gate.shape[0]
    assert 0 < k <= e and e % groups == 0 and 0 < topk_groups <= groups, (k, e, groups, topk_groups)
    assert k <= topk_groups * (e // groups), "top-k needs at least k experts in the kept groups"
    weights = torch.empty(t, k, dtype=torch.float32, device=x.device)
    ids = torch.empty(t, k, dtype=torch.int64, device=x.device)
    if not t:
        return weights, ids
    fused = t <= FUSED_MAX_TOKENS and gate.numel() * gate.element_size() <= FUSED_MAX_BYTES
    # the pointers a path does not read are placeholders (so that a profiler counts W read once)
    logits = x if fused else F.linear(x.float(), gate.float())
    x, gate = (x, gate) if fused else (logits, logits)
    block_e = triton.next_power_of_2(e)
    _router_kernel[(t,)](
        x, gate, logits, weights, ids, e, d, x.stride(0), gate.stride(0), logits.stride(0), scale,
        K=k, GROUPS=groups, TOPK_GROUPS=topk_groups, NORM=norm and k > 1, FUSED=fused, BLOCK_E=block_e,
        BLOCK_D=max(16, 16384 // block_e), BLOCK_G=triton.next_power_of_2(groups), BLOCK_K=triton.next_power_of_2(k),
        num_warps=16 if fused else 1 if e <= 64 else 2,
    )
    return weights, ids
