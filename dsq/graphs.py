"""CUDA-graph decode: a decode-only step captured once per batch bucket, replayed with each step's inputs.

At batch 1 a decode step is ~27 layers x ~15 kernels; launched one by one from Python that is launch- and
interpreter-bound. Replaying a captured graph removes both (vLLM and gpt-fast capture decode the same way).
The step must be free of host syncs and data-dependent shapes: the Triton backend's paths are.

A bucket's graph has fixed shapes: `batch` rows, page tables `width` pages wide (every page of the pool, so any
sequence fits) and the MLA decode split for a context of `width` pages. Rows a step does not fill, and every row
during warm-up and capture, point at the scratch page, one page of the pool that no sequence is ever given: they
write their latent there and attend only it, so nothing a sequence owns is touched.
"""

from __future__ import annotations

import torch

from dsq.cache import Attention, LatentCache
from dsq.model import Transformer

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def bucket(batch: int) -> int | None:
    """The captured batch size that serves `batch` sequences (None: more than the largest bucket)."""
    return next((b for b in BUCKETS if b >= batch), None)


class GraphDecoder:
    """Replays a decode-only step of `batch` rows, `net(tokens, pos, attn)`, after copying the step's tokens,
    positions, slots and page tables into its static tensors."""

    def __init__(self, net: Transformer, cache: LatentCache, batch: int, width: int, scratch: int,
                 pool: object | None = None):
        device = net.inv_freq.device
        self.net, self.batch, self.width, self.scratch, self.size = net, batch, width, scratch, cache.page_size
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)
        self.pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.attn = Attention(cache, torch.full((batch,), scratch * cache.page_size, dtype=torch.long, device=device),
                              torch.arange(batch, device=device),
                              torch.full((batch, width), scratch, dtype=torch.int32, device=device),
                              torch.ones(batch, dtype=torch.int32, device=device), width * cache.page_size)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):  # warm up: compile the kernels, allocate the workspaces
            for _ in range(2):
                self._step()
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits = self._step()

    def _step(self) -> torch.Tensor:
        return self.net(self.tokens, self.pos, self.attn)

    def __call__(self, tokens: list[int], pos: list[int], pages: list[list[int]]) -> torch.Tensor:
        """Logits [n, V] of n <= batch decodes: token i at position pos[i] of the sequence whose page table is
        pages[i]. Every row is rewritten, so a row left over from a larger step points at the scratch page again."""
        n, spare, size = len(tokens), self.batch - len(tokens), self.size
        table = [p + [self.scratch] * (self.width - len(p)) for p in pages] + [[self.scratch] * self.width] * spare
        slots = [p[q // size] * size + q % size for p, q in zip(pages, pos, strict=True)]
        as_tensor = lambda values, dtype: torch.tensor(values, dtype=dtype)
        self.tokens.copy_(as_tensor(tokens + [0] * spare, torch.long))
        self.pos.copy_(as_tensor(pos + [0] * spare, torch.long))
        self.attn.slots.copy_(as_tensor(slots + [self.scratch * size] * spare, torch.long))
        self.attn.decode_pages.copy_(as_tensor(table, torch.int32))
        self.attn.decode_lens.copy_(as_tensor([q + 1 for q in pos] + [1] * spare, torch.int32))
        self.graph.replay()
        return self.logits[:n]
