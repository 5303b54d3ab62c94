"""The flags several commands share: their types and help, and the checks that run before a model is loaded."""

from __future__ import annotations

import math
import os
import re
from typing import Annotated, Optional

import typer

from dsq.errors import DsqError


def check_device(device: str) -> None:
    """cpu, cuda or cuda:N, with that GPU present."""
    import torch

    m = re.fullmatch(r"cpu|cuda(?::(\d+))?", device)
    if m is None:
        raise DsqError(f"--device {device}: dsq runs on cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DsqError(f"--device {device}: no CUDA GPU is visible; use --device cpu")
        if m[1] is not None and int(m[1]) >= torch.cuda.device_count():
            raise DsqError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) are visible "
                           f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")


def check_sampling(temperature: float, top_p: float, top_k: int, seed: int | None,
                   stop: list[str] | None = None) -> None:
    if not (math.isfinite(temperature) and temperature >= 0):
        raise DsqError(f"--temperature {temperature}: give a number >= 0 (0 is greedy)")
    if not 0 < top_p <= 1:  # NaN fails this too
        raise DsqError(f"--top-p {top_p}: give a number in (0, 1] (1 turns it off)")
    if top_k < 0:
        raise DsqError(f"--top-k {top_k}: give a number >= 0 (0 turns it off)")
    if seed is not None and not 0 <= seed < 2**63:
        raise DsqError(f"--seed {seed}: give a number in [0, 2**63)")
    if stop is not None and "" in stop:
        raise DsqError("--stop '': an empty stop string would stop at once; give some text")


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
