"""CUDA-graph decode: one decode step captured per batch bucket, replayed with new tokens and positions.

At batch 1 a decode step is ~27 layers x ~15 kernels; launched one by one from Python that is launch- and
interpreter-bound. Replaying a captured graph removes both (vLLM and gpt-fast capture decode the same way).
The step must be free of host syncs and data-dependent shapes: the Triton backend's paths are."""

from __future__ import annotations

import torch

from dsq.cache import PagedCache
from dsq.model import Transformer

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def bucket(batch: int) -> int:
    """The captured batch size that serves `batch` sequences (the cache must hold that many rows)."""
    return next((b for b in BUCKETS if b >= batch), batch)


class GraphDecoder:
    """Replays `net(tokens, pos, cache, absorb=True)` for one token per sequence of a fixed-size batch."""

    def __init__(self, net: Transformer, cache: PagedCache, batch: int, next_pos: torch.Tensor):
        """`next_pos` [n]: the position each of the first n cache rows writes next (its cached length).

        The eager warm-up steps write a latent per row, so they write where no cached token lives: row i
        at next_pos[i], rows n.. (a bucket's spare rows, owned by no sequence) at 0. That is safe because
        attention at position p reads only positions <= p of its row, and every decode step writes its own
        position before attending to it: the first real step overwrites next_pos[i] before anything reads it.
        Capture writes nothing (kernels are recorded, not run), and each replay gets the caller's positions."""
        device = net.inv_freq.device
        self.net, self.cache, self.batch = net, cache, batch
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos[: len(next_pos), 0] = next_pos
        self.last = torch.zeros(batch, dtype=torch.long, device=device)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):  # warm up: compile the kernels, allocate the workspaces
            for _ in range(2):
                self._step()
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()

    def _step(self) -> torch.Tensor:
        return self.net(self.tokens, self.pos, self.cache, absorb=True, last=self.last)

    def __call__(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] for tokens [B, 1] at positions pos [B, 1] (B <= the captured batch)."""
        n = tokens.shape[0]
        self.tokens[:n].copy_(tokens)
        self.pos[:n].copy_(pos)
        self.graph.replay()
        return self.logits[:n]
