"""The runner's CUDA-graph decode on CPU, with torch.cuda's stream and graph objects stubbed: capture touches
only the scratch page, and an engine whose decode steps replay the graphs gives the eager engine's tokens while
requests join, finish and leave rows of a bucket empty."""

from __future__ import annotations

import contextlib

import torch
from tiny import make_tiny

import dsq
from dsq.engine import Engine, SamplingParams
from dsq.engine.runner import ModelRunner
from dsq.graphs import BUCKETS, GraphDecoder, bucket


class Stream:
    def wait_stream(self, other: Stream) -> None:
        pass


class Graph:
    """Replay reruns the captured step eagerly (set on each decoder once it is built); capture records the
    kernels without running them, which the stub mimics by putting every cache byte back afterwards."""

    replay = None

    def pool(self) -> None:
        return None


def stub_cuda(monkeypatch, cache) -> None:
    @contextlib.contextmanager
    def capture(graph: Graph, pool=None):
        before = [[t.clone() if t is not None else None for t in pool_] for pool_ in cache.pools]
        yield
        for pool_, old in zip(cache.pools, before, strict=True):
            for now, was in zip(pool_, old, strict=True):
                if now is not None:
                    now.copy_(was)

    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", capture)


def replaying(decoder: GraphDecoder) -> None:
    def replay() -> None:
        with torch.inference_mode():
            decoder.logits.copy_(decoder._step())

    decoder.graph.replay = replay


def pages(cache, ids) -> list[torch.Tensor]:
    return [t[ids].clone() for pool in cache.pools for t in pool if t is not None]


def test_buckets():
    assert [bucket(n) for n in (1, 2, 3, 5, 256)] == [1, 2, 4, 8, 256] and bucket(257) is None
    assert list(BUCKETS) == sorted(BUCKETS)


def test_capture_writes_only_the_scratch_page(tmp_path, monkeypatch):
    net = dsq.load_quantized(make_tiny(tmp_path, "lite"), kv_cache_dtype="fp32").net
    runner = ModelRunner(net, 6, 8, graphs=False)
    for pool in runner.cache.pools:  # every page holds something a sequence could own
        for t in pool:
            if t is not None:
                t.copy_(torch.randn(t.shape).to(t.dtype))
    live = list(range(runner.num_pages))
    before = pages(runner.cache, live)
    stub_cuda(monkeypatch, runner.cache)
    runner.capture(max_batch=4)
    assert sorted(runner.graphs) == [1, 2, 4]
    assert all(torch.equal(a, b) for a, b in zip(before, pages(runner.cache, live), strict=True))


def test_graph_decode_gives_the_eager_tokens(tmp_path, monkeypatch):
    net = dsq.load_quantized(make_tiny(tmp_path, "lite"), kv_cache_dtype="fp32").net
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 1000, (n,), generator=gen).tolist() for n in (11, 5, 8, 3, 17)]
    params = [SamplingParams(max_tokens=m) for m in (6, 3, 9, 1, 5)]  # rows finish at different steps

    def run(engine: Engine) -> list[list[int]]:
        first = [engine.add_request(p, q) for p, q in zip(prompts[:3], params[:3], strict=True)]
        engine.step()
        engine.step()  # decodes of the first three running: two more join
        later = [engine.add_request(p, q) for p, q in zip(prompts[3:], params[3:], strict=True)]
        while engine.requests:
            engine.step()
        return [r.output for r in first + later]

    eager = run(Engine(ModelRunner(net, 16, 8, graphs=False)))
    runner = ModelRunner(net, 16, 8, graphs=False)
    stub_cuda(monkeypatch, runner.cache)
    runner.capture(max_batch=8)
    replays = []
    for b, decoder in runner.graphs.items():
        replaying(decoder)
        inner = decoder.graph.replay
        decoder.graph.replay = lambda inner=inner, b=b: (replays.append(b), inner())
    assert run(Engine(runner)) == eager
    assert len(set(replays)) >= 2, f"decode steps replayed the buckets {replays}: too few to show rows left empty"
