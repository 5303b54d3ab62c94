"""A generation request: its prompt, how to sample, when to stop, and where it stands in the engine."""

from __future__ import annotations

import enum
import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dsq.errors import DsqError


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy; top_k 0 and top_p 1 turn those filters off. A seed makes the samples of this
    request reproducible whatever else is in the batch. Stop strings are the detokenizer's business (the server
    cuts them); the engine stops on `stop_token_ids` (not included in the output) and after `max_tokens`."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if not 0 <= self.temperature < float("inf"):  # NaN fails this too
            raise DsqError(f"temperature must be a number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise DsqError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise DsqError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_tokens < 1:
            raise DsqError(f"max_tokens must be >= 1, got {self.max_tokens}")


class Status(enum.Enum):
    WAITING = "waiting"  # queued, or preempted: holds no pages
    RUNNING = "running"  # holds pages; prefilling (maybe in chunks) or decoding
    FINISHED = "finished"


_ids = itertools.count()


class Request:
    """`stream`, when given, is called from the engine's thread with each new token id, then once with None when
    the request finishes (`finish_reason` is then "stop", "length", "cancelled", or "error" when a step of the
    engine failed)."""

    def __init__(self, prompt: list[int], params: SamplingParams, stream: Callable[[int | None], None] | None = None):
        if not prompt:
            raise DsqError("a prompt needs at least one token")
        self.id = next(_ids)
        self.tokens = list(prompt)  # then each new token: what a preempted request recomputes
        self.num_prompt, self.params, self.stream = len(prompt), params, stream
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.done = threading.Event()
        self.cancel_requested = False
        # Where its cache stands, kept by the scheduler: the pages holding positions 0.., how many positions are
        # written, and the hashes of its full blocks registered for reuse (dsq/engine/pages.py).
        self.pages: list[int] = []
        self.computed = 0
        self.block_hashes: list[bytes] = []
        self.generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None

    @property
    def prompt(self) -> list[int]:
        return self.tokens[:self.num_prompt]

    @property
    def output(self) -> list[int]:
        return self.tokens[self.num_prompt:]

    def cancel(self) -> None:
        """Ask the engine to stop this request; safe from any thread, takes effect before the engine's next step."""
        self.cancel_requested = True

    def finish(self, reason: str) -> None:
        self.status, self.finish_reason = Status.FINISHED, reason
        if self.stream is not None:
            self.stream(None)
        self.done.set()

    def __repr__(self) -> str:
        return f"Request({self.id}, {self.status.value}, prompt {self.num_prompt}, output {len(self.output)})"
