"""Continuous batching: which requests run in the next step, and how many of their tokens.

Every step has a token budget. Requests already running go first, oldest first: a decode costs one token, a
prompt still being prefilled costs the rest of it or what is left of the budget (chunked prefill, as vLLM's
scheduler mixes prefill chunks with decodes). Then waiting requests are admitted in arrival order while the
budget and the free pages last; a request that does not fit blocks the ones behind it (FIFO fairness). When a
running request needs a page and none is free, the newest running request is preempted: its pages are
released and it waits at the head of the queue to be recomputed from its tokens (nano-vllm's scheduler.py;
recompute rather than swap, as vLLM does by default). The oldest request therefore always progresses."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from dsq.engine.pages import PagePool
from dsq.engine.request import Request, Status


@dataclass(frozen=True)
class SeqSlice:
    """One sequence's part of a step: its new tokens are `tokens[start:start + length]` of the batch, at
    positions `context - length .. context - 1`; `pages` is its page table; `logits` says whether the step
    wants the next-token logits after its last new token (decodes and the last chunk of a prefill)."""

    start: int
    length: int
    context: int
    pages: list[int]
    logits: bool


@dataclass(frozen=True)
class StepBatch:
    """One forward step, flattened: the new tokens of all sequences, their positions, and the cache slot
    (`page * page_size + position % page_size`) each new token's latent is written to."""

    tokens: list[int]
    positions: list[int]
    slots: list[int]
    seqs: list[SeqSlice]


class Scheduler:
    def __init__(self, pool: PagePool, max_batch_tokens: int, max_seqs: int):
        self.pool, self.max_batch_tokens, self.max_seqs = pool, max_batch_tokens, max_seqs
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: the last one is the newest
        self.preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def remove(self, req: Request) -> None:
        """Take a request out (finished or cancelled) and release its pages."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.pool.release(req.pages)
        req.pages = []

    def schedule(self) -> tuple[StepBatch, list[Request]] | None:
        """The next step's batch and its requests (in the order of `batch.seqs`), or None when idle."""
        budget, planned = self.max_batch_tokens, []
        preempted = False
        for req in list(self.running):
            if budget == 0:
                break
            if req.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            n = min(len(req.tokens) - req.computed, budget)
            while not self._grow(req, req.computed + n):
                preempted = True
                self._preempt(self.running[-1])
                if req.status is not Status.RUNNING:
                    break
            else:
                planned.append((req, n))
                budget -= n
        while self.waiting and not preempted and budget > 0 and len(self.running) < self.max_seqs:
            n = self._admit(self.waiting[0], budget)
            if n is None:
                break
            planned.append((self.waiting.popleft(), n))
            budget -= n
        return (self._batch(planned), [req for req, _ in planned]) if planned else None

    def advance(self, batch: StepBatch, reqs: list[Request]) -> None:
        """After the runner wrote the step's tokens: they are computed, and new full blocks can be shared."""
        for s, req in zip(batch.seqs, reqs, strict=True):
            req.computed = s.context
            self.pool.publish(req.tokens, req.pages, req.block_hashes, req.computed)

    def _grow(self, req: Request, tokens: int) -> bool:
        """Hold enough pages for `tokens` positions, if the pool has them."""
        fresh = self.pool.pages_for(tokens) - len(req.pages)
        if fresh > 0:
            if not self.pool.can_take([], fresh):
                return False
            req.pages += self.pool.take([], fresh)
        return True

    def _admit(self, req: Request, budget: int) -> int | None:
        """Move the head of the queue to running, reusing cached blocks of its prefix; returns how many of its
        tokens this step computes, or None when the free pages cannot hold them."""
        tokens = req.tokens
        cached, hashes = self.pool.match(tokens)
        computed = len(cached) * self.pool.page_size
        n = min(len(tokens) - computed, budget)
        fresh = self.pool.pages_for(computed + n) - len(cached)
        if not self.pool.can_take(cached, fresh):
            return None
        req.pages, req.block_hashes, req.computed = self.pool.take(cached, fresh), hashes, computed
        req.status = Status.RUNNING
        self.running.append(req)
        return n

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.pool.release(req.pages)
        req.pages, req.block_hashes, req.computed = [], [], 0
        req.status = Status.WAITING
        self.waiting.appendleft(req)
        self.preemptions += 1

    def _batch(self, planned: list[tuple[Request, int]]) -> StepBatch:
        tokens, positions, slots, seqs, b = [], [], [], [], self.pool.page_size
        for req, n in planned:
            all_tokens, first = req.tokens, req.computed
            seqs.append(SeqSlice(len(tokens), n, first + n, list(req.pages), first + n == len(all_tokens)))
            tokens += all_tokens[first:first + n]
            positions += range(first, first + n)
            slots += [req.pages[p // b] * b + p % b for p in range(first, first + n)]
        return StepBatch(tokens, positions, slots, seqs)
