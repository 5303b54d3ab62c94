"""The flags several commands share: their types and help, and the checks that run before a model is loaded."""

from __future__ import annotations

import os
from typing import Annotated, Optional

import typer

from dsq.api import check_stop
from dsq.engine import SamplingError, SamplingParams
from dsq.errors import DsqError

SAMPLING_FLAGS = {"temperature": "--temperature", "top_p": "--top-p", "top_k": "--top-k", "seed": "--seed",
                  "max_tokens": "--max-new-tokens"}  # SamplingParams' fields as the commands spell them


def sampling(temperature: float, top_p: float, top_k: int, seed: int | None, max_new_tokens: int,
             stop: list[str] | None = None) -> SamplingParams:
    """The sampling flags as the engine takes them, checked by the API's rules (SamplingParams, check_stop) and
    refused in the flags' names."""
    try:
        params = SamplingParams(temperature, top_p, top_k, seed, max_new_tokens)
    except SamplingError as e:
        raise DsqError(f"{SAMPLING_FLAGS[e.field]} {e.value}: give {e.rule}") from None
    try:
        check_stop(stop)
    except DsqError:  # --stop is repeatable, so a list of strings: only an empty one is refused
        raise DsqError("--stop '': an empty stop string would stop at once; give some text") from None
    return params


def use_threads(threads: int | None, tp: int) -> None:
    """torch's CPU threads: --threads, else the cores this process may use (its affinity, which on a shared
    machine is far fewer than the machine's cores OpenMP would start). On --tp N ranks, dsq.parallel shares
    the cores out instead."""
    import torch

    if threads is not None and threads < 1:
        raise DsqError(f"--threads {threads}: give a number >= 1")
    if tp == 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(threads or cores)


def model_config(model: str, revision: str | None):
    """The folder a model argument names (fetched from the Hub if it is a repo id) and its config, read
    without building anything."""
    from dsq.checkpoint import resolve
    from dsq.loader import read_config

    folder = resolve(model, revision)
    return folder, read_config(folder)[0]


ModelArg = Annotated[str, typer.Argument(metavar="MODEL", show_default=False,
                                         help="A model folder or a Hugging Face Hub repo id (owner/name).")]
Device = Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")]
Revision = Annotated[Optional[str], typer.Option(help="Hub revision (branch, tag or commit).")]  # noqa: UP045
TP = Annotated[int, typer.Option("--tp", min=1, help="Split the model over N ranks (a GPU each with cuda, "
                                                     "processes on cpu): tensor + expert parallel.")]
Threads = Annotated[Optional[int], typer.Option(help="CPU threads for torch (default: the cores this "  # noqa: UP045
                                                     "process may use).")]
Seed = Annotated[Optional[int], typer.Option(help="Seed for sampling.")]  # noqa: UP045
