"""How a caller asks to sample (the CLI's flags, ChatSession); the engine samples (dsq.engine.sample)."""

from __future__ import annotations

from dataclasses import dataclass

from dsq.engine.request import SamplingParams


@dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy; top_k 0 and top_p 1 turn those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        SamplingParams(self.temperature, self.top_p, self.top_k)  # the engine's rules, refused in its words


GREEDY = Sampling()
