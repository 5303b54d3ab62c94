"""The grouped fused-MoE path's sort: (token, slot) pairs by expert, each expert's run padded to a multiple of BM
(as vLLM's moe_align_block_size does), in one launch instead of ~15 torch ops (counts, cumsums, a stable
argsort, scatters, a searchsorted).

One program does it all, in four passes over the M * k pair ids: count per expert, pad the whole output, write
each pair at its expert's start + its rank among the expert's earlier pairs (a one-hot cumsum per chunk plus
the running count, so the order within an expert is the pairs' order, as a stable sort gives), then each
block's expert. M * k is at most a few tens of thousands (a 4,096-token prefill chunk, top-6), and every pass
streams it once, so one program is enough and needs no atomics: the result is deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _moe_align_kernel(ids_ptr, pair_ptr, expert_ptr, T, E, max_blocks,
                      BM: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr):
    experts = tl.arange(0, BLOCK_E)
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for t0 in range(0, T, BLOCK_T):
        offs = t0 + tl.arange(0, BLOCK_T)
        ids = tl.load(ids_ptr + offs, mask=offs < T, other=BLOCK_E)  # past the end: no expert's
        counts += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
    blocks = (counts + BM - 1) // BM
    block_end = tl.cumsum(blocks, axis=0)
    start = (block_end - blocks) * BM  # each expert's first padded slot
    for s0 in range(0, max_blocks * BM, BLOCK_T):  # padding: the pair id one past the last
        offs = s0 + tl.arange(0, BLOCK_T)
        tl.store(pair_ptr + offs, tl.zeros([BLOCK_T], dtype=tl.int32) + T, mask=offs < max_blocks * BM)
    tl.debug_barrier()  # the padding is written before any pair lands over it
    seen = tl.zeros([BLOCK_E], dtype=tl.int32)  # pairs of each expert in earlier chunks
    for t0 in range(0, T, BLOCK_T):
        offs = t0 + tl.arange(0, BLOCK_T)
        ids = tl.load(ids_ptr + offs, mask=offs < T, other=BLOCK_E)
        hot = (ids[:, None] == experts[None, :]).to(tl.int32)
        before = tl.cumsum(hot, axis=0) - hot  # earlier pairs of the same expert within the chunk
        slot = tl.sum(hot * (before + seen[None, :] + start[None, :]), axis=1)
        tl.store(pair_ptr + slot, offs, mask=offs < T)
        seen += tl.sum(hot, axis=0)
    for b0 in range(0, max_blocks, BLOCK_T):  # block b's expert: how many experts end at or before it
        b = b0 + tl.arange(0, BLOCK_T)
        ended = (block_end[None, :] <= b[:, None]) & (experts[None, :] < E)
        e = tl.sum(ended.to(tl.int32), axis=1)
        tl.store(expert_ptr + b, tl.where(e < E, e, -1), mask=b < max_blocks)


def max_blocks(pairs: int, num_experts: int, block_m: int) -> int:
    """Blocks of the padded sort, from the shapes only: at most min(E, pairs) experts are non-empty and each
    wastes at most block_m - 1 slots (a CUDA graph replays one size)."""
    return triton.cdiv(pairs + min(num_experts, pairs) * (block_m - 1), block_m)


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort (token, slot) pairs by expert, each expert's run padded to a multiple of block_m.

    Returns pair_ids int32 [max_blocks * block_m] (flat pair index m * k + j; padding = M * k) and
    expert_ids int32 [max_blocks] (-1 past the used blocks), exactly as `moe_align_ref`."""
    assert topk_ids.dim() == 2 and topk_ids.is_contiguous(), tuple(topk_ids.shape)
    assert topk_ids.dtype in (torch.int32, torch.int64), topk_ids.dtype
    t = topk_ids.numel()
    n_blocks = max_blocks(t, num_experts, block_m)
    pair_ids = torch.empty(n_blocks * block_m, dtype=torch.int32, device=topk_ids.device)
    expert_ids = torch.empty(n_blocks, dtype=torch.int32, device=topk_ids.device)
    block_e = triton.next_power_of_2(num_experts)
    _moe_align_kernel[(1,)](topk_ids, pair_ids, expert_ids, t, num_experts, n_blocks, BM=block_m,
                            BLOCK_E=block_e, BLOCK_T=max(16, 8192 // block_e), num_warps=8)
    return pair_ids, expert_ids


def moe_align_ref(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """moe_align in torch ops: the reference."""
    flat = topk_ids.flatten().long()
    t = flat.numel()
    n_blocks = max_blocks(t, num_experts, block_m)
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    blocks = (counts + block_m - 1) // block_m
    block_end = blocks.cumsum(0)
    slot_start = (block_end - blocks) * block_m  # first padded slot of each expert
    order = torch.argsort(flat, stable=True)
    sorted_e = flat[order]
    rank = torch.arange(t, device=flat.device) - (counts.cumsum(0) - counts)[sorted_e]
    pair_ids = torch.full((n_blocks * block_m,), t, dtype=torch.int32, device=flat.device)
    pair_ids.scatter_(0, slot_start[sorted_e] + rank, order.to(torch.int32))
    expert_ids = torch.searchsorted(block_end, torch.arange(n_blocks, device=flat.device), right=True)
    expert_ids = torch.where(expert_ids < num_experts, expert_ids, -1).to(torch.int32)
    return pair_ids, expert_ids
