"""Prefill then decode through the latent cache, for a batch of prompts of different lengths."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from dsq.cache import PagedCache
from dsq.errors import DsqError
from dsq.graphs import GraphDecoder, bucket
from dsq.model import Transformer


@dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy; top_k 0 and top_p 1 turn those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not 0 <= self.temperature < float("inf"):  # NaN fails this too
            raise DsqError(f"temperature must be a number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise DsqError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise DsqError(f"top_p must be in (0, 1], got {self.top_p}")


GREEDY = Sampling()


def sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token [B] from float32 logits [B, V]."""
    if s.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / s.temperature
    if s.top_k:
        kth = logits.topk(min(s.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > s.top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def steps(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    sampling: Sampling = GREEDY,
    seed: int | None = None,
    context: int | None = None,
    cache: PagedCache | None = None,
    start: list[int] | None = None,
    graphs: bool = False,
    prefill_chunk: int = 4096,
) -> Iterator[list[int]]:
    """Yield the next token of every prompt, step by step: a prefill, then one absorbed decode per step.
    Stop iterating to stop early. `context` caps prompt + new tokens (default: the model's). With a `cache`
    whose first `start[i]` positions already hold sequence i, the prompts continue it (multi-turn chat).
    `graphs` replays decode steps from a CUDA graph (needs the Triton backend on a GPU). Prompts are
    prefilled `prefill_chunk` tokens at a time.
    On N ranks, rank 0's prompts and its sampled tokens are the ones every rank runs (dsq/parallel.py)."""
    prompts, start, max_new_tokens = model.dist.share((prompts, start, max_new_tokens))
    if not prompts or any(len(p) == 0 for p in prompts):
        raise DsqError("every prompt needs at least one token")
    vocab = model.cfg.vocab_size
    if any(not 0 <= t < vocab for p in prompts for t in p):
        raise DsqError(f"prompt token ids must be in [0, {vocab})")
    context = context or model.cfg.max_position_embeddings
    device = model.inv_freq.device
    first = torch.tensor(start or [0] * len(prompts), device=device)
    lens = torch.tensor([len(p) for p in prompts], device=device)
    width = int(lens.max())
    end = int((first + lens).max()) + max_new_tokens
    if end > context:
        raise DsqError(f"prompt ({int((first + lens).max())} tokens) + max new tokens ({max_new_tokens}) exceeds "
                       f"the context of {context} tokens; shorten the prompt or ask for fewer tokens")
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    tokens = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):  # right-padded: padding sits past each prompt, where nothing attends
        tokens[i, : len(p)] = torch.tensor(p)
    graphs = graphs and device.type == "cuda" and max_new_tokens > 1
    if cache is None:  # a graph replays a whole bucket, so the cache holds a row per bucket slot
        rows = bucket(len(prompts)) if graphs else len(prompts)
        if model.cache_tokens is not None and rows * end > model.cache_tokens:
            raise DsqError(f"{len(prompts)} sequence(s) of up to {end:,} tokens need a cache of {rows * end:,} "
                           f"tokens; the memory planner left room for {model.cache_tokens:,}: use fewer or shorter "
                           "sequences, or raise gpu_memory_utilization")
        cache = model.new_cache(rows, end)
    pos = first[:, None] + torch.arange(width, device=device)
    logits = None
    for c0 in range(0, width, prefill_chunk):  # chunks bound a long prompt's memory; later ones read the cache
        n = min(prefill_chunk, width - c0)
        part = model(tokens[:, c0:c0 + n], pos[:, c0:c0 + n], cache, last=(lens - 1 - c0).clamp(0, n - 1))
        here = (lens - 1 >= c0) & (lens - 1 < c0 + n)  # the chunk holding each prompt's last token
        logits = part if logits is None else torch.where(here[:, None], part, logits)
    decode = GraphDecoder(model, cache, cache.block_table.shape[0], first + lens) if graphs else None
    for step in range(max_new_tokens):
        if not torch.isfinite(logits).all():  # argmax/multinomial would turn them into token 0
            raise DsqError(f"the model produced NaN or Inf logits at new token {step + 1}; generation stopped "
                           "(damaged weights, or an overflow: try dtype float32)")
        nxt = model.dist.agree(sample(logits, sampling, generator))
        yield nxt.tolist()
        if step < max_new_tokens - 1:
            at = (first + lens + step)[:, None]
            if decode is not None:
                logits = decode(nxt[:, None], at)
            else:
                logits = model(nxt[:, None], at, cache, absorb=True, last=torch.zeros_like(lens))


def generate(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    sampling: Sampling = GREEDY,
    eos_id: int | None = None,
    stop: Callable[[int, list[int]], bool] | None = None,
    on_token: Callable[[int, int], None] | None = None,
    seed: int | None = None,
    context: int | None = None,
    graphs: bool = False,
) -> list[list[int]]:
    """New tokens for each prompt (eos not included). `stop(i, tokens)` ends sequence i early;
    `on_token(i, token)` sees every token as it is made."""
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for tokens in steps(model, prompts, max_new_tokens, sampling, seed, context, graphs=graphs):
        for i, t in enumerate(tokens):
            if done[i]:
                continue
            if t == eos_id:
                done[i] = True
                continue
            out[i].append(t)
            if on_token is not None:
                on_token(i, t)
            done[i] = stop is not None and stop(i, out[i])
        if all(done):
            break
    return out
