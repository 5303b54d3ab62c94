"""The model runner: owns the model's latent-cache page pools and runs the engine's flattened steps through it
(nano-vllm's model_runner.py). The engine decides which tokens run and where they are cached; the runner
turns that into tensors and the model computes."""

from __future__ import annotations

import torch

from dsq.cache import Attention
from dsq.engine.scheduler import StepBatch
from dsq.model import Transformer


class ModelRunner:
    """`num_pages` pages of `page_size` slots per layer, allocated once: on a GPU what the memory planner
    left room for (`net.cache_tokens // page_size`), on the CPU enough for the longest sequence times a few."""

    def __init__(self, net: Transformer, num_pages: int, page_size: int = 64):
        self.net, self.num_pages, self.page_size = net, num_pages, page_size
        self.cache = net.new_cache(num_pages, page_size)

    @torch.inference_mode()
    def forward(self, batch: StepBatch) -> torch.Tensor:
        """float32 logits [seqs with `logits`, V], in the order of `batch.seqs`. On N ranks every rank runs
        rank 0's batch."""
        batch = self.net.dist.share(batch)
        device = self.net.inv_freq.device
        attn = Attention.build(self.cache, [(s.start, s.length, s.context, s.pages) for s in batch.seqs],
                               batch.slots, device)
        rows = torch.tensor([s.start + s.length - 1 for s in batch.seqs if s.logits], dtype=torch.long, device=device)
        as_long = lambda values: torch.tensor(values, dtype=torch.long, device=device)
        return self.net(as_long(batch.tokens), as_long(batch.positions), attn, rows)

    def agree(self, tokens: torch.Tensor) -> torch.Tensor:
        """Rank 0's sampled tokens on every rank (a Ctrl-C on rank 0 travels with them: dsq.parallel.Dist)."""
        return self.net.dist.agree(tokens)
