"""CUDA-graph decode: one decode step captured per batch bucket, replayed with new tokens and positions.

At batch 1 a decode step is ~27 layers x ~15 kernels; launched one by one from Python that is launch- and
interpreter-bound. Replaying a captured graph removes both (vLLM and gpt-fast capture decode the same way).
The step must be free of host syncs and data-dependent shapes: the Triton backend's paths are."""

from __future__ import annotations

import torch

from dsq.cache import Attention, LatentCache
from dsq.model import Transformer

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def bucket(batch: int) -> int:
    """The captured batch size that serves `batch` sequences (it needs page tables for that many rows)."""
    return next((b for b in BUCKETS if b >= batch), batch)


class GraphDecoder:
    """Replays a decode-only step of a fixed-size batch, `net(tokens, pos, attn)`, with the tokens, positions,
    slots and context lengths copied into its static tensors before each replay."""

    def __init__(self, net: Transformer, cache: LatentCache, pages: torch.Tensor, next_pos: torch.Tensor):
        """`pages` [batch, max_pages] int32: each row's page table; `next_pos` [n]: the position each of the
        first n rows writes next (its cached length).

        The eager warm-up steps write a latent per row, so they write where no cached token lives: row i
        at next_pos[i], rows n.. (a bucket's spare rows, whose pages no sequence owns) at 0. That is safe because
        attention at position p reads only positions <= p of its row, and every decode step writes its own
        position before attending to it: the first real step overwrites next_pos[i] before anything reads it.
        Capture writes nothing (kernels are recorded, not run), and each replay gets the caller's positions."""
        device, batch = net.inv_freq.device, pages.shape[0]
        self.net, self.size = net, cache.page_size
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)
        self.pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.attn = Attention(cache, torch.zeros(batch, dtype=torch.long, device=device),
                              torch.arange(batch, device=device), pages,
                              torch.zeros(batch, dtype=torch.int32, device=device), pages.shape[1] * cache.page_size)
        self._place(next_pos)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):  # warm up: compile the kernels, allocate the workspaces
            for _ in range(2):
                self._step()
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()

    def _place(self, pos: torch.Tensor) -> None:
        """Positions of the first len(pos) rows, and from them their slots and context lengths."""
        n = len(pos)
        self.pos[:n].copy_(pos)
        rows = self.attn.decode_pages.gather(1, (self.pos // self.size)[:, None])[:, 0].long()
        self.attn.slots.copy_(rows * self.size + self.pos % self.size)
        self.attn.decode_lens.copy_(self.pos + 1)

    def _step(self) -> torch.Tensor:
        return self.net(self.tokens, self.pos, self.attn)

    def __call__(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] for tokens [B] at positions pos [B] (B <= the captured batch)."""
        n = tokens.shape[0]
        self.tokens[:n].copy_(tokens)
        self._place(pos)
        self.graph.replay()
        return self.logits[:n]
