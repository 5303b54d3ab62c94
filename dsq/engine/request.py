"""A generation request: its prompt, how to sample, when to stop, and where it stands in the engine."""

from __future__ import annotations

import enum
import itertools
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dsq.errors import DsqError


class SamplingError(DsqError):
    """A SamplingParams field out of its range. `field`, `value` and `rule` let a caller that spells the field
    its own way (the CLI's --top-p) say so in its words; the message is the Python API's (`top_p=0: give ...`)."""

    def __init__(self, field: str, value: object, rule: str):
        super().__init__(f"{field}={value!r}: give {rule}")
        self.field, self.value, self.rule = field, value, rule


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy; top_k 0 and top_p 1 turn those filters off. A seed makes the samples of this
    request reproducible whatever else is in the batch. Stop strings are the detokenizer's business (the server
    cuts them); the engine stops on `stop_token_ids` (not included in the output) and after `max_tokens`.
    The one place the sampling rules are checked: every caller (API, CLI, server) builds one of these."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        seed = self.seed
        rules = {
            "temperature": (0 <= self.temperature < math.inf, "a number >= 0 (0 is greedy)"),  # NaN fails this too
            "top_p": (0 < self.top_p <= 1, "a number in (0, 1] (1 turns it off)"),
            "top_k": (self.top_k >= 0, "an integer >= 0 (0 turns it off)"),
            "seed": (seed is None or (type(seed) is int and 0 <= seed < 2**63), "an integer in [0, 2**63)"),
            "max_tokens": (self.max_tokens >= 1, "an integer >= 1"),
        }
        for field, (ok, rule) in rules.items():
            if not ok:
                raise SamplingError(field, getattr(self, field), rule)


class Status(enum.Enum):
    WAITING = "waiting"  # queued, or preempted: holds no pages
    RUNNING = "running"  # holds pages; prefilling (maybe in chunks) or decoding
    FINISHED = "finished"


_ids = itertools.count()


class Request:
    """`stream`, when given, is called from the engine's thread with each new token id, then once with None when
    the request finishes (`finish_reason` is then "stop", "length", "cancelled", "shutdown" when the engine
    stopped before it finished, or "error" when a step of the engine failed)."""

    def __init__(self, prompt: list[int], params: SamplingParams, stream: Callable[[int | None], None] | None = None):
        if not prompt:
            raise DsqError("a prompt needs at least one token")
        self.id = next(_ids)
        self.tokens = list(prompt)  # then each new token: what a preempted request recomputes
        self.num_prompt, self.params, self.stream = len(prompt), params, stream
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.done = threading.Event()
        self.cancel_requested, self.cancel_reason = False, "cancelled"
        # Where its cache stands, kept by the scheduler: the pages holding positions 0.., how many positions are
        # written, and the hashes of its full blocks registered for reuse (dsq/engine/pages.py).
        self.pages: list[int] = []
        self.computed = 0
        self.block_hashes: list[bytes] = []
        self.generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None

    @property
    def output(self) -> list[int]:
        return self.tokens[self.num_prompt:]

    def cancel(self, reason: str = "cancelled") -> None:
        """Ask the engine to stop this request; safe from any thread, takes effect before the engine's next step."""
        self.cancel_requested, self.cancel_reason = True, reason

    def finish(self, reason: str) -> None:
        self.status, self.finish_reason = Status.FINISHED, reason
        if self.stream is not None:
            self.stream(None)
        self.done.set()

    def __repr__(self) -> str:
        return f"Request({self.id}, {self.status.value}, prompt {self.num_prompt}, output {len(self.output)})"
