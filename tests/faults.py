"""Fault injection from outside the product: run the dsq CLI with one function wrapped to fail.

    python tests/faults.py rank RANK STEP exit|hang CLI-ARGS...   rank RANK fails at its STEP-th engine step
    python tests/faults.py start RANK exit|hang CLI-ARGS...       spawned rank RANK fails while importing
    python tests/faults.py kill N CLI-ARGS...                      SIGKILL after the N-th converted tensor

The patch is applied at import, so ranks spawned by the `--tp` launcher (multiprocessing's spawn re-imports
this file as their main module, with the same argv) carry it too; only `__main__` runs the CLI."""

from __future__ import annotations

import os
import signal
import sys
import time


def _rank_fault(rank: int, step: int, how: str) -> None:
    from dsq.engine.runner import ModelRunner

    compute, calls = ModelRunner.compute, [0]

    def failing_compute(self, batch):
        if self.net.dist.rank == rank:
            calls[0] += 1
            if calls[0] == step:
                if how == "hang":
                    time.sleep(1e6)
                os._exit(3)
        return compute(self, batch)

    ModelRunner.compute = failing_compute


def _start_fault(rank: int, how: str) -> None:
    import multiprocessing

    if multiprocessing.current_process().name == f"dsq-rank-{rank}":  # as dsq.launch names its ranks
        if how == "hang":
            time.sleep(1e6)
        raise ImportError(f"rank {rank} fails while importing (injected)")


def _kill_after(n: int) -> None:
    from dsq.quantize import run

    convert, done = run.convert_tensor, [0]

    def killing_convert(*args, **kwargs):
        out = convert(*args, **kwargs)
        done[0] += 1
        if done[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    run.convert_tensor = killing_convert


def _install(argv: list[str]) -> list[str]:
    """Apply the fault named by argv; return the CLI's arguments."""
    if argv[0] == "rank":
        _rank_fault(int(argv[1]), int(argv[2]), argv[3])
        return argv[4:]
    if argv[0] == "start":
        _start_fault(int(argv[1]), argv[2])
        return argv[3:]
    if argv[0] == "kill":
        _kill_after(int(argv[1]))
        return argv[2:]
    raise SystemExit(f"unknown fault {argv[0]!r}")


CLI_ARGS = _install(sys.argv[1:])

if __name__ == "__main__":
    from dsq.cli.main import app

    app(CLI_ARGS, prog_name="dsq")
