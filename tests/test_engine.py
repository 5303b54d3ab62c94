"""The engine over a fake runner that reads every sequence back through its page table (helpers_engine.py):
batching, preemption, chunked prefill and prefix reuse must not change a single token."""

from __future__ import annotations

import threading

import pytest
import torch
from helpers_engine import FakeRunner, alone

from dsq.engine import Engine, SamplingParams, sample
from dsq.errors import DsqError

GREEDY = SamplingParams(max_tokens=12)


def prompts(n: int, lo: int = 1, hi: int = 40, vocab: int = 64, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=gen).tolist()
    return [torch.randint(0, vocab, (k,), generator=gen).tolist() for k in lengths]


def test_a_batch_equals_each_request_alone():
    ps = prompts(8)
    engine = Engine(FakeRunner(page_size=4))
    outputs = [r.output for r in engine.generate(ps, GREEDY)]
    assert outputs == [alone(p, GREEDY, page_size=4) for p in ps]
    assert all(len(o) == GREEDY.max_tokens for o in outputs)
    assert engine.pool.used == 0


def test_preemption_is_invisible_in_the_output():
    # Each request alone needs at most 40 + 20 = 60 slots = 15 pages; all 8 at once need far more than 16.
    greedy, seeded = SamplingParams(max_tokens=20), SamplingParams(max_tokens=20, temperature=1.0, seed=3)
    ps = prompts(8, lo=20, hi=40)
    for params in (greedy, seeded):
        engine = Engine(FakeRunner(num_pages=16, page_size=4))
        outputs = [r.output for r in engine.generate(ps, params)]
        assert engine.scheduler.preemptions > 0
        assert outputs == [alone(p, params, num_pages=16, page_size=4) for p in ps]
        assert engine.pool.used == 0


def test_requests_finish_in_arrival_order_under_preemption():
    # Equal requests through a pool that holds about one and a half: the oldest always progresses, and a
    # preempted request waits ahead of the ones that came after it.
    runner = FakeRunner(num_pages=16, page_size=4)
    engine = Engine(runner)
    order: list[int] = []
    reqs = [engine.add_request(p, SamplingParams(max_tokens=20), lambda t, i=i: t is None and order.append(i))
            for i, p in enumerate(prompts(6, lo=20, hi=20, seed=10))]
    while engine.requests:
        engine.step()
    assert engine.scheduler.preemptions > 0 and order == list(range(len(reqs)))


def test_a_shared_1k_prefix_is_prefilled_once():
    prefix, (a, b) = prompts(1, lo=1024, hi=1024, seed=1)[0], prompts(2, lo=30, hi=30, seed=2)
    runner = FakeRunner(num_pages=256, page_size=16)
    engine = Engine(runner, max_batch_tokens=4096)
    first = engine.generate([prefix + a], GREEDY)[0]
    assert engine.pool.used == 0  # finished: its pages are free, and still hold its blocks
    given = len(runner.batches)
    second = engine.generate([prefix + b], GREEDY)[0]
    fed = [len(batch.tokens) for batch in runner.batches[given:]]
    assert fed == [len(b)] + [1] * (GREEDY.max_tokens - 1)  # the suffix, then one token per decode
    assert second.output == alone(prefix + b, GREEDY, num_pages=256, page_size=16)
    assert first.output == alone(prefix + a, GREEDY, num_pages=256, page_size=16)


def test_a_prompt_seen_before_still_computes_its_last_block():
    p = prompts(1, lo=64, hi=64, seed=9)[0]  # four full blocks of 16
    runner = FakeRunner(num_pages=64, page_size=16)
    engine = Engine(runner)
    first = engine.generate([p], GREEDY)[0].output
    given = len(runner.batches)
    assert engine.generate([p], GREEDY)[0].output == first
    assert len(runner.batches[given].tokens) == 16  # three blocks found; the last holds the token to compute


def test_the_next_chat_turn_continues_the_cache_of_the_last():
    # Turn two's prompt is turn one's prompt, its answer and a new message: every full block of what turn one
    # computed (all but its last sampled token) is found, so only the rest is prefilled.
    first_prompt, question = prompts(2, lo=50, hi=50, seed=8)
    runner = FakeRunner(num_pages=64, page_size=8)
    engine = Engine(runner)
    answer = engine.generate([first_prompt], GREEDY)[0].output
    given = len(runner.batches)
    second = first_prompt + answer + question
    out = engine.generate([second], GREEDY)[0].output
    computed = len(first_prompt) + len(answer) - 1
    assert len(runner.batches[given].tokens) == len(second) - computed // 8 * 8
    assert out == alone(second, GREEDY, num_pages=64, page_size=8)


def test_cancel_returns_the_pages():
    runner = FakeRunner(num_pages=32, page_size=4)
    engine = Engine(runner, max_seqs=2)
    reqs = [engine.add_request(p, SamplingParams(max_tokens=50)) for p in prompts(4, lo=10, hi=20)]
    engine.step()
    engine.step()
    assert engine.pool.used > 0 and [r.status.value for r in reqs] == ["running"] * 2 + ["waiting"] * 2
    reqs[0].cancel()  # running
    reqs[3].cancel()  # waiting
    while engine.requests:
        engine.step()
    assert [r.finish_reason for r in reqs] == ["cancelled", "length", "length", "cancelled"]
    assert len(reqs[0].output) == 2 and reqs[3].output == []
    assert engine.pool.used == 0


def test_chunked_prefill_keeps_to_the_token_budget():
    ps = prompts(3, lo=100, hi=120) + prompts(3, lo=1, hi=5, seed=4)
    runner = FakeRunner(num_pages=128, page_size=8)
    engine = Engine(runner, max_batch_tokens=32)
    outputs = [r.output for r in engine.generate(ps, GREEDY)]
    assert max(len(b.tokens) for b in runner.batches) == 32
    mixed = [b for b in runner.batches if any(s.length > 1 for s in b.seqs) and any(s.length == 1 for s in b.seqs)]
    assert mixed, "prefill chunks and decodes share steps"
    assert outputs == [alone(p, GREEDY, num_pages=128, page_size=8) for p in ps]


def test_stop_tokens_and_max_tokens():
    p = prompts(1)[0]
    free = alone(p, GREEDY)
    stop = free[4]
    engine = Engine(FakeRunner())
    r = engine.generate([p], SamplingParams(max_tokens=12, stop_token_ids=(stop,)))[0]
    assert r.finish_reason == "stop" and r.output == free[:free.index(stop)]
    assert engine.generate([p], GREEDY)[0].finish_reason == "length"


def test_a_seed_reproduces_the_samples_whatever_the_batch():
    p, others = prompts(1, seed=5)[0], prompts(5, seed=6)
    seeded = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=20, seed=11)
    by_itself = alone(p, seeded)
    mixed = Engine(FakeRunner()).generate([*others, p], seeded)
    engine = Engine(FakeRunner())
    reqs = [engine.add_request(q, SamplingParams(max_tokens=16, temperature=1.0)) for q in others]
    reqs.append(engine.add_request(p, seeded))
    while engine.requests:
        engine.step()
    assert reqs[-1].output == by_itself == mixed[-1].output
    assert alone(p, SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=20, seed=12)) != by_itself


def reference_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The filtered distribution written out plainly: top-k, then the smallest top-p prefix, renormalized."""
    probs = (logits / temperature).softmax(-1)
    order = probs.argsort(descending=True).tolist()
    keep = order[:top_k] if top_k else order
    kept = probs[keep] / probs[keep].sum()
    mass, chosen = 0.0, []
    for i, q in zip(keep, kept.tolist(), strict=True):
        chosen.append(i)
        mass += q
        if mass >= top_p:
            break
    out = torch.zeros_like(probs)
    out[chosen] = probs[chosen] / probs[chosen].sum()
    return out


@pytest.mark.parametrize(("temperature", "top_k", "top_p"),
                         [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (1.0, 9, 0.6)])
def test_sample_inverts_the_filtered_distribution(temperature, top_k, top_p):
    # N draws on the grid (i + 1/2) / N: a token of probability q receives N*q draws up to one, so the count
    # over N is within 1/N of q (plus float32 rounding of the CDF, far below that).
    n, logits = 4096, torch.randn(32, generator=torch.Generator().manual_seed(0)) * 2
    rows = logits.expand(n, -1)
    tokens = sample(rows, torch.full((n,), temperature), torch.full((n,), top_k), torch.full((n,), top_p),
                    (torch.arange(n) + 0.5) / n)
    frequency = torch.bincount(tokens, minlength=32) / n
    assert (frequency - reference_probs(logits, temperature, top_k, top_p)).abs().max() <= 1 / n + 1e-6


def test_greedy_rows_are_the_exact_argmax_beside_sampled_rows():
    logits = torch.randn(6, 100, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.0, 1.0, 0.0, 2.0, 0.0, 1.0])
    tokens = sample(logits, t, torch.zeros(6, dtype=torch.long), torch.ones(6), torch.full((6,), 0.999))
    assert tokens[t == 0].tolist() == logits[t == 0].argmax(-1).tolist()


def test_the_loop_thread_serves_requests_from_other_threads():
    ps = prompts(6, seed=7)
    engine = Engine(FakeRunner(page_size=4))
    engine.start()
    results: dict[int, list[int]] = {}

    def client(i: int) -> None:
        req = engine.add_request(ps[i], GREEDY)
        assert req.done.wait(60)
        results[i] = req.output

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(ps))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    late = engine.add_request(ps[0], SamplingParams(max_tokens=200))
    engine.stop()  # whether the loop got to it or not, it ends now and gives its pages back
    assert [results[i] for i in range(len(ps))] == [alone(p, GREEDY, page_size=4) for p in ps]
    assert late.done.is_set() and late.finish_reason in ("shutdown", "length")
    assert engine.pool.used == 0 and not engine.requests


def test_a_request_larger_than_the_pool_is_refused():
    with pytest.raises(DsqError, match="pages"):
        Engine(FakeRunner(num_pages=4, page_size=4)).add_request([1] * 10, SamplingParams(max_tokens=7))
