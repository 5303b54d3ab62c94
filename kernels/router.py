"""The MoE router after its logits GEMM, one program per token: softmax over the experts in fp32, greedy or
group-limited top-k (DeepSeek-V2's `group_limited_greedy`: keep the `topk_groups` groups with the highest
expert score, then pick among their experts), then normalise the k weights or scale them.

This is dsq.model.Gate's maths in one launch instead of ~10 torch ops. Experts are chosen by their logits:
the softmax is monotonic, so the choice is torch's, and it is made on exact inputs. Ties (equal logits, or
equal group maxima) go to the lower expert (group) index, and the k slots come out in descending score, ties
in ascending expert id. The ids are int64 and contiguous, as fused_moe takes them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _router_kernel(
    logits_ptr, weight_ptr, ids_ptr, E, stride_l, scale,
    K: tl.constexpr, GROUPS: tl.constexpr, TOPK_GROUPS: tl.constexpr, NORM: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_E)
    valid = offs < E
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
    logits: torch.Tensor, k: int, groups: int = 1, topk_groups: int = 1, norm: bool = False, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] (fp32) -> (weights fp32 [T, k], expert ids int64 [T, k]), as dsq.model.Gate.

    groups > 1: group-limited (E // groups experts per group, the best `topk_groups` groups kept);
    norm: weights / their sum (when k > 1, as Gate does); else weights * scale."""
    assert logits.dim() == 2 and logits.dtype == torch.float32 and logits.stride(1) == 1, (logits.dtype,)
    t, e = logits.shape
    assert 0 < k <= e and e % groups == 0 and 0 < topk_groups <= groups, (k, e, groups, topk_groups)
    assert k <= topk_groups * (e // groups), "top-k needs at least k experts in the kept groups"
    weights = torch.empty(t, k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(t, k, dtype=torch.int64, device=logits.device)
    if t:
        _router_kernel[(t,)](
            logits, weights, ids, e, logits.stride(0), scale, K=k, GROUPS=groups, TOPK_GROUPS=topk_groups,
            NORM=norm and k > 1, BLOCK_E=triton.next_power_of_2(e), BLOCK_G=triton.next_power_of_2(groups),
            BLOCK_K=triton.next_power_of_2(k), num_warps=1 if e <= 64 else 2,
        )
    return weights, ids
