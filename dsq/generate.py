"""How a caller asks to sample (the CLI's flags, ChatSession); the engine samples (dsq.engine.sample)."""

from __future__ import annotations

from dataclasses import dataclass

from dsq.errors import DsqError


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
