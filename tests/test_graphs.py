"""GraphDecoder's warm-up and capture on CPU, with torch.cuda's stream and graph objects stubbed."""

from __future__ import annotations

import contextlib
import copy

import torch
from tiny import make_tiny, rows_of

import dsq
from dsq.cache import Attention, LatentCache
from dsq.graphs import GraphDecoder, bucket


class Stream:
    def wait_stream(self, other: Stream) -> None:
        pass


class Graph:
    """Replay reruns the step eagerly; the test points it at the decoder once that is built."""

    replay = None


def stub_cuda(monkeypatch, cache: LatentCache) -> None:
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


def live_bytes(cache: LatentCache, tables: list[list[int]], lens: list[int]) -> list[torch.Tensor]:
    """Every cached tensor at the positions sequence i owns (0..lens[i]-1), all layers."""
    out, size = [], cache.page_size
    for i, n in enumerate(lens):
        slots = torch.tensor([tables[i][p // size] * size + p % size for p in range(n)])
        out += [t.view(-1, t.shape[-1])[slots].clone() for pool in cache.pools for t in pool if t is not None]
    return out


def test_warm_up_leaves_the_live_cache_alone_and_decodes_as_eager(tmp_path, monkeypatch):
    net = dsq.load_quantized(make_tiny(tmp_path, "lite"), kv_cache_dtype="fp32").net
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 1000, (n,), generator=gen).tolist() for n in (11, 5, 8)]  # a bucket of 4 rows
    lens, new = torch.tensor([len(p) for p in prompts]), 6
    rows, size = bucket(len(prompts)), 16
    tables = rows_of(-(-(int(lens.max()) + new) // size), rows)
    cache = net.new_cache(rows * len(tables[0]), size)
    n = lens.tolist()
    seqs = [(sum(n[:i]), n[i], n[i], tables[i]) for i in range(len(n))]
    slots = [tables[i][p // size] * size + p % size for i in range(len(n)) for p in range(n[i])]
    pos = torch.cat([torch.arange(k) for k in n])
    last = torch.tensor([sum(n[:i + 1]) - 1 for i in range(len(n))])
    flat = torch.tensor([t for p in prompts for t in p])
    first = net(flat, pos, Attention.build(cache, seqs, slots, "cpu"), last).argmax(-1)
    before = live_bytes(cache, tables, n)
    eager_cache = copy.deepcopy(cache)

    stub_cuda(monkeypatch, cache)
    decode = GraphDecoder(net, cache, torch.tensor(tables, dtype=torch.int32), lens)

    def replay() -> None:
        with torch.inference_mode():
            decode.logits.copy_(decode._step())

    decode.graph.replay = replay
    after = live_bytes(cache, tables, n)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)), "the warm-up overwrote a cached token"

    graphed, eager = [first], [first]
    for step in range(new - 1):
        at = lens + step
        graphed.append(decode(graphed[-1], at).argmax(-1))
        seqs = [(i, 1, int(at[i]) + 1, tables[i]) for i in range(len(n))]
        slots = [tables[i][int(at[i]) // size] * size + int(at[i]) % size for i in range(len(n))]
        eager.append(net(eager[-1], at, Attention.build(eager_cache, seqs, slots, "cpu")).argmax(-1))
    assert torch.equal(torch.stack(graphed), torch.stack(eager))
