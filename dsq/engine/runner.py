"""The model runner: owns the model's latent-cache page pools and runs the engine's flattened steps through it
(nano-vllm's model_runner.py). The engine decides which tokens run and where they are cached; the runner
turns that into tensors and the model computes.

On N ranks rank 0 runs the engine and its runner; the other ranks run `follow`: they make the same runner and
compute each step rank 0 sends them (`Dist.share`), so the collectives inside the forward pair up. Only rank 0
samples."""

from __future__ import annotations

import torch

from dsq.cache import PAGE_SIZE, Attention, is_decode
from dsq.engine.scheduler import StepBatch
from dsq.graphs import BUCKETS, GraphDecoder, bucket
from dsq.model import Transformer
from dsq.parallel import Interrupt


def planned_pages(net: Transformer, cpu_tokens: int, page_size: int = PAGE_SIZE) -> int:
    """Pages a pool can give sequences: on a GPU what the memory planner left for the cache (net.cache_tokens),
    elsewhere `cpu_tokens`' worth; less the runner's scratch page, which the plan holds too."""
    return max(1, (net.cache_tokens or cpu_tokens) // page_size - 1)


class ModelRunner:
    """`num_pages` pages of `page_size` slots per layer, allocated once: on a GPU what the memory planner
    left room for (`net.cache_tokens // page_size`), on the CPU enough for the longest sequence times a few.
    One more page is the scratch page of the CUDA graphs, never given to a sequence.

    `graphs` (default: on one CUDA device with the Triton backend, whose decode step has no host sync): decode
    steps of up to `max_batch` sequences replay a CUDA graph per batch bucket, captured here, once."""

    def __init__(self, net: Transformer, num_pages: int, page_size: int = PAGE_SIZE, graphs: bool | None = None,
                 max_batch: int = 256):
        self.net, self.num_pages, self.page_size = net, num_pages, page_size
        if net.dist.rank == 0:
            net.dist.share(("runner", num_pages, page_size, graphs, max_batch))
        self.cache = net.new_cache(num_pages + 1, page_size)
        device = net.inv_freq.device
        if graphs is None:
            graphs = device.type == "cuda" and net.backend == "triton" and net.dist.world == 1
        self.graphs: dict[int, GraphDecoder] = {}
        if graphs:
            self.capture(max_batch)

    def capture(self, max_batch: int) -> None:
        """A graph per bucket up to max_batch's, largest first, sharing one memory pool."""
        pool = None
        for b in reversed([b for b in BUCKETS if b <= bucket(max_batch)]):
            self.graphs[b] = GraphDecoder(self.net, self.cache, b, self.num_pages, self.num_pages, pool)
            pool = self.graphs[b].graph.pool()

    def forward(self, batch: StepBatch) -> torch.Tensor:
        """float32 logits [seqs with `logits`, V], in the order of `batch.seqs` (on rank 0: sent to the others
        first; a Ctrl-C held since the last step is raised here, before anything is sent)."""
        if self.net.dist.world > 1:
            if Interrupt.take():
                raise KeyboardInterrupt
            self.net.dist.share(("step", batch))
        return self.compute(batch)

    @torch.inference_mode()
    def compute(self, batch: StepBatch) -> torch.Tensor:
        graph = self.graphs.get(bucket(len(batch.seqs)) or 0)
        if graph is not None and all(is_decode(s.length, s.context) for s in batch.seqs):
            return graph(batch.tokens, batch.positions, [s.pages for s in batch.seqs])
        device = self.net.inv_freq.device
        attn = Attention.build(self.cache, [(s.start, s.length, s.context, s.pages) for s in batch.seqs],
                               batch.slots, device)
        as_long = lambda values: torch.tensor(values, dtype=torch.long, device=device)
        rows = [s.start + s.length - 1 for s in batch.seqs if s.logits]
        rows = None if rows == list(range(len(batch.tokens))) else as_long(rows)  # None: every row (decodes)
        return self.net(as_long(batch.tokens), as_long(batch.positions), attn, rows)


def full_forward(net: Transformer, input_ids: torch.Tensor, page_size: int = PAGE_SIZE) -> torch.Tensor:
    """float32 logits [B, T, V] of input_ids [B, T] from an empty cache of this call's own (on rank 0 of N
    ranks, sent to the others first)."""
    if net.dist.rank == 0:
        net.dist.share(("logits", input_ids))
    device = net.inv_freq.device
    b, t = input_ids.shape
    per = -(-t // page_size)  # pages per row
    seqs = [(i * t, t, t, list(range(i * per, (i + 1) * per))) for i in range(b)]
    slots = [(i * per + p // page_size) * page_size + p % page_size for i in range(b) for p in range(t)]
    attn = Attention.build(net.new_cache(b * per, page_size), seqs, slots, device)
    pos = torch.arange(t, device=device).repeat(b)
    return net(input_ids.to(device).flatten(), pos, attn).view(b, t, -1)


def follow(net: Transformer) -> None:
    """Ranks > 0: make the runner rank 0 makes and compute the steps it sends, until it says stop."""
    runner = None
    while True:
        command, *args = net.dist.share(None)
        if command == "stop":
            return
        if command == "runner":
            runner = ModelRunner(net, *args)
        elif command == "step":
            runner.compute(*args)
        elif command == "logits":
            full_forward(net, *args)


def stop_followers(net: Transformer) -> None:
    """Rank 0 of N: tell the other ranks to stop following (they return from `follow`)."""
    net.dist.share(("stop",))
