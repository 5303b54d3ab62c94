"""GraphDecoder's warm-up and capture on CPU, with torch.cuda's stream and graph objects stubbed."""

from __future__ import annotations

import contextlib
import copy

import torch
from tiny import make_tiny

import dsq
from dsq.cache import PagedCache
from dsq.graphs import GraphDecoder, bucket


class Stream:
    def wait_stream(self, other: Stream) -> None:
        pass


class Graph:
    """Replay reruns the step eagerly; the test points it at the decoder once that is built."""

    replay = None


def stub_cuda(monkeypatch, cache: PagedCache) -> None:
    """torch.cuda as GraphDecoder uses it. Capture records kernels without running them, so the stubbed
    capture runs the step and then puts every cache byte back: only the eager warm-up writes, as on a GPU."""

    @contextlib.contextmanager
    def capture(graph: Graph):
        before = copy.deepcopy(cache.pools)
        yield
        for pool, old in zip(cache.pools, before, strict=True):
            for now, was in zip(pool, old, strict=True):
                if now is not None:
                    now.copy_(was)

    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", capture)


def live_bytes(cache: PagedCache, lens: list[int]) -> list[torch.Tensor]:
    """Every cached tensor at the positions sequence i owns (0..lens[i]-1), all layers."""
    out = []
    for i, n in enumerate(lens):
        pos = torch.arange(n)
        slots = cache.block_table[i, pos // cache.block_size].long() * cache.block_size + pos % cache.block_size
        out += [t.view(-1, t.shape[-1])[slots].clone() for pool in cache.pools for t in pool if t is not None]
    return out


def test_warm_up_leaves_the_live_cache_alone_and_decodes_as_eager(tmp_path, monkeypatch):
    net = dsq.load_quantized(make_tiny(tmp_path, "lite"), kv_cache_dtype="fp32").net
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 1000, (n,), generator=gen).tolist() for n in (11, 5, 8)]  # a bucket of 4 rows
    lens, new = torch.tensor([len(p) for p in prompts]), 6
    rows = bucket(len(prompts))
    cache = net.new_cache(rows, int(lens.max()) + new)
    tokens = torch.zeros(len(prompts), int(lens.max()), dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p)
    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    first = net(tokens, pos, cache, last=lens - 1).argmax(-1)
    before = live_bytes(cache, lens.tolist())
    eager_cache = copy.deepcopy(cache)

    stub_cuda(monkeypatch, cache)
    decode = GraphDecoder(net, cache, rows, lens)

    def replay() -> None:
        with torch.inference_mode():
            decode.logits.copy_(decode._step())

    decode.graph.replay = replay
    after = live_bytes(cache, lens.tolist())
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)), "the warm-up overwrote a cached token"

    graphed, eager = [first], [first]
    for step in range(new - 1):
        at = (lens + step)[:, None]
        graphed.append(decode(graphed[-1][:, None], at).argmax(-1))
        last = torch.zeros_like(lens)
        eager.append(net(eager[-1][:, None], at, eager_cache, absorb=True, last=last).argmax(-1))
    assert torch.equal(torch.stack(graphed), torch.stack(eager))
