"""A deterministic stand-in for the model runner, strict about paging.

Its "cache" holds the token id written at each slot. The logits for a sequence are a seeded random row drawn
from a hash of ALL its tokens read back through its page table, so a wrong slot, a page shared when it should
not be, a stale page or a lost token after preemption changes the generated tokens."""

from __future__ import annotations

import hashlib
import threading

import torch

from dsq.engine import Engine, SamplingParams, StepBatch


class FakeRunner:
    def __init__(self, num_pages: int = 64, page_size: int = 16, vocab: int = 64):
        self.num_pages, self.page_size, self.vocab = num_pages, page_size, vocab
        self.cache = torch.full((num_pages * page_size,), -1, dtype=torch.long)
        self.batches: list[StepBatch] = []
        self.running = threading.Event()  # cleared: forward waits (tests hold a step to act in between)
        self.running.set()

    def logits_for(self, context: list[int]) -> torch.Tensor:
        digest = hashlib.blake2b(torch.tensor(context).numpy().tobytes(), digest_size=8).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
        return torch.randn(self.vocab, generator=gen) * 3

    def forward(self, batch: StepBatch) -> torch.Tensor:
        self.running.wait()
        assert len(batch.tokens) == len(batch.positions) == len(batch.slots) == sum(s.length for s in batch.seqs)
        assert all(s.length >= 1 for s in batch.seqs), "every sequence in a step computes a token"
        self.cache[torch.tensor(batch.slots, dtype=torch.long)] = torch.tensor(batch.tokens, dtype=torch.long)
        self.batches.append(batch)
        rows, b = [], self.page_size
        for s in batch.seqs:
            if s.logits:
                slots = [s.pages[p // b] * b + p % b for p in range(s.context)]
                rows.append(self.logits_for(self.cache[slots].tolist()))
        return torch.stack(rows) if rows else torch.empty(0, self.vocab)


def alone(prompt: list[int], params: SamplingParams, **runner) -> list[int]:
    """The output of a prompt run by itself on a fresh engine; when greedy, checked against the fake model
    run without any engine (each next token the argmax of the logits of the whole sequence so far)."""
    out = Engine(FakeRunner(**runner)).generate([prompt], params)[0].output
    if params.temperature == 0:
        model, context, expected = FakeRunner(**runner), list(prompt), []
        while len(expected) < params.max_tokens:
            token = int(model.logits_for(context).argmax())
            if token in params.stop_token_ids:
                break
            expected.append(token)
            context.append(token)
        assert out == expected, "one request alone differs from the model run without the engine"
    return out
