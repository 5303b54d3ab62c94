"""The engine: requests in, one batched step at a time, tokens out (nano-vllm's llm_engine.py).

`add_request` may be called from any thread; `step` runs on one thread only, the caller's (`generate`) or
the engine's own loop (`start`/`stop`, what the server uses). A step takes the newly added requests and
the cancellations in, asks the scheduler for a batch, has the runner compute the logits, samples every
request's next token in one call and finishes the requests that stopped."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

import torch

from dsq.engine.pages import PagePool
from dsq.engine.request import Request, SamplingParams
from dsq.engine.scheduler import Scheduler, StepBatch
from dsq.errors import DsqError

log = logging.getLogger(__name__)


class Runner(Protocol):
    """What the engine needs of a model: the geometry of the page pool it allocated once, and a forward that
    writes the batch's new tokens to their slots and returns float32 logits [number of seqs with `logits`, V],
    in the order of `batch.seqs`."""

    num_pages: int
    page_size: int

    def forward(self, batch: StepBatch) -> torch.Tensor: ...


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           uniform: torch.Tensor, all_greedy: bool = False) -> torch.Tensor:
    """Next token [B] from logits [B, V] with per-row temperature, top-k (0: off), top-p (1: off) and one
    uniform draw in [0, 1) per row. A temperature-0 row is the exact argmax. The others invert the CDF of
    the filtered softmax at their draw, so a row's sample depends on its own draw only (per-request seeds).
    A row with a NaN or Inf logit gives -1, so the host learns of it from the ids it reads anyway (no sync
    of its own). `all_greedy` (the host knows every row's temperature is 0) skips the sort over the vocabulary
    and the rest: two kernels instead of ~25."""
    finite = torch.isfinite(logits).all(dim=-1)
    if all_greedy:
        return torch.where(finite, logits.argmax(dim=-1), -1)
    greedy = temperature == 0
    scaled = logits / torch.where(greedy, 1.0, temperature)[:, None]
    ordered, order = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)
    drop = (top_k[:, None] > 0) & (rank >= top_k[:, None])
    probs = ordered.masked_fill(drop, float("-inf")).softmax(dim=-1)
    drop |= probs.cumsum(dim=-1) - probs > top_p[:, None]  # keep the smallest prefix whose mass reaches top_p
    cdf = probs.masked_fill(drop, 0).cumsum(dim=-1)
    index = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None]).clamp(max=logits.shape[-1] - 1)
    tokens = torch.where(greedy, logits.argmax(dim=-1), order.gather(-1, index).squeeze(-1))
    return torch.where(finite, tokens, -1)


class Engine:
    def __init__(self, runner: Runner, max_batch_tokens: int = 2048, max_seqs: int = 256, seed: int = 0):
        self.runner = runner
        self.pool = PagePool(runner.num_pages, runner.page_size)
        self.scheduler = Scheduler(self.pool, max_batch_tokens, max_seqs)
        self.generator = torch.Generator().manual_seed(seed)  # for requests without a seed
        self.requests: dict[int, Request] = {}  # unfinished ones
        self._inbox: list[Request] = []
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    def add_request(self, prompt: list[int], params: SamplingParams,
                    stream: Callable[[int | None], None] | None = None) -> Request:
        req = Request(prompt, params, stream)
        pages = self.pool.pages_for(req.num_prompt + params.max_tokens)
        if pages > self.pool.num_pages:
            raise DsqError(f"prompt ({req.num_prompt} tokens) + max_tokens ({params.max_tokens}) needs {pages} "
                           f"pages of {self.pool.page_size} tokens; the cache holds {self.pool.num_pages}: ask for "
                           "fewer tokens, or give the cache more room (max_seq_len, gpu_memory_utilization)")
        with self._wake:
            self.requests[req.id] = req
            self._inbox.append(req)
            self._wake.notify()
        return req

    def cancel(self, req: Request) -> None:
        req.cancel()
        with self._wake:
            self._wake.notify()

    @property
    def running(self) -> bool:
        """Whether the loop thread is serving."""
        return self._thread is not None and self._thread.is_alive()

    def step(self) -> None:
        with self._wake:
            inbox, self._inbox = self._inbox, []
            cancelled = [r for r in self.requests.values() if r.cancel_requested]
        for req in inbox:
            self.scheduler.add(req)
        for req in cancelled:
            self._finish(req, req.cancel_reason)
        planned = self.scheduler.schedule()
        if planned is None:
            return
        batch, reqs = planned
        logits = self.runner.forward(batch)
        self.scheduler.advance(batch, reqs)
        wanting = [req for s, req in zip(batch.seqs, reqs, strict=True) if s.logits]
        for req, token in zip(wanting, self._sample(logits, wanting), strict=True):
            if token in req.params.stop_token_ids:
                self._finish(req, "stop")
                continue
            req.tokens.append(token)
            if req.stream is not None:
                req.stream(token)
            if len(req.tokens) - req.num_prompt >= req.params.max_tokens:
                self._finish(req, "length")

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 stream: Callable[[int, Request, int | None], None] | None = None) -> list[Request]:
        """Run these prompts to the end on the calling thread (not while the loop thread runs). `stream(i, request,
        token)` sees each new token of prompt i (None when it finishes) and may cancel the request. Interrupted
        (Ctrl-C, an exception from `stream`), it cancels what is left, so the pages are free again."""
        reqs: list[Request] = []
        try:
            for i, p in enumerate(prompts):
                cb = (lambda token, i=i: stream(i, reqs[i], token)) if stream is not None else None
                reqs.append(self.add_request(p, params, cb))
            while not all(r.done.is_set() for r in reqs):
                self.step()
        finally:
            for r in reqs:
                if not r.done.is_set():
                    self.cancel(r)
            while not all(r.done.is_set() for r in reqs):
                self.step()
        return reqs

    def start(self) -> None:
        """Run steps on a thread of the engine's own whenever there is work."""
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="dsq-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop thread; requests still unfinished end with finish_reason "shutdown"."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._wake:
            unfinished = list(self.requests.values())
        for req in unfinished:
            req.cancel("shutdown")
        self.step()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._stopping or self.requests):
                    self._wake.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception:
                log.exception("an engine step failed; every request ends with finish_reason 'error'")
                with self._wake:
                    failed, self._inbox = list(self.requests.values()), []
                for req in failed:
                    self._finish(req, "error")
                return

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> list[int]:
        p = [r.params for r in reqs]
        uniform = [0.0 if q.temperature == 0 else torch.rand((), generator=r.generator or self.generator).item()
                   for q, r in zip(p, reqs, strict=True)]
        as_tensor = lambda values, dtype: torch.tensor(values, dtype=dtype, device=logits.device)
        tokens = sample(logits, as_tensor([q.temperature for q in p], torch.float32),
                        as_tensor([q.top_k for q in p], torch.long), as_tensor([q.top_p for q in p], torch.float32),
                        as_tensor(uniform, torch.float32), all(q.temperature == 0 for q in p))
        tokens = tokens.tolist()  # the step's one host sync
        if -1 in tokens:  # sampling would have made them a token
            raise DsqError("the model produced NaN or Inf logits; generation stopped (damaged weights, or an "
                           "overflow: try dtype float32)")
        return tokens

    def _finish(self, req: Request, reason: str) -> None:
        self.scheduler.remove(req)
        with self._wake:
            del self.requests[req.id]
        req.finish(reason)
