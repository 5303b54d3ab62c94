"""The serving engine: requests, the page pool, the scheduler and the engine that drives a runner."""

from dsq.engine.engine import Engine, Runner, sample
from dsq.engine.pages import PagePool
from dsq.engine.request import Request, SamplingError, SamplingParams, Status
from dsq.engine.scheduler import Scheduler, SeqSlice, StepBatch

__all__ = ["Engine", "PagePool", "Request", "Runner", "SamplingError", "SamplingParams", "Scheduler", "SeqSlice",
           "Status", "StepBatch", "sample"]
