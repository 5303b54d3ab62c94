"""Starting a tensor-parallel job and living in it: joining the process group, spawning the other ranks with
a watchdog, and Ctrl-C on rank 0.

`load_quantized(tp=N)` in a plain process makes it rank 0 and spawns ranks 1.. (multiprocessing's spawn), each
of which loads its shard and then only follows rank 0's steps (dsq.engine.runner.follow): stdout silenced,
stderr kept aside, Ctrl-C ignored; a rank that dies ends the job with a line that names it. Under torchrun
every process makes the same call and ranks > 0 follow instead of returning. docs/parallel.md has the design.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as td

from dsq.errors import DsqError
from dsq.formats import Scheme
from dsq.loader import read_config
from dsq.parallel import Dist, Interrupt, open_commands, shard_plan

TIMEOUT = "DSQ_DIST_TIMEOUT"  # seconds a collective may wait for the other ranks (default 600)
START = "DSQ_START_TIMEOUT"  # seconds ranks may take to join: default 300 for ranks `launch` starts, else 3600
_started = False  # whether init() started the default process group, which then is dsq's to leave


# --- joining a job -------------------------------------------------------------------------------------
def init(world: int, device: torch.device) -> tuple[int, torch.device]:
    """Join this process's rank of a `world`-rank job (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT, as
    torchrun and `launch` set them), starting the default process group unless the caller already has:
    NCCL on CUDA, gloo on CPU. The rendezvous waits $DSQ_START_TIMEOUT s for every rank to join (an hour
    under torchrun, whose ranks may start minutes apart; 300 s for the ranks `launch` starts here, and its
    watchdog sees one that dies first); once running, a collective waits at most $DSQ_DIST_TIMEOUT s (600).
    Returns (rank, this rank's device: cuda means cuda:LOCAL_RANK)."""
    global _started
    if td.is_initialized():
        if td.get_world_size() != world:
            raise DsqError(f"tp={world}, but the process group has {td.get_world_size()} ranks")
    elif os.environ.get("WORLD_SIZE") is None:
        raise DsqError(f"tp={world} needs {world} processes: start them with torchrun --nproc-per-node {world}, "
                       "or let load_quantized spawn them")
    elif int(os.environ["WORLD_SIZE"]) != world:
        raise DsqError(f"tp={world}, but this job has WORLD_SIZE={os.environ['WORLD_SIZE']} processes")
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if device.index >= torch.cuda.device_count():
            raise DsqError(f"tp={world} on cuda needs a GPU per rank; {torch.cuda.device_count()} visible")
        torch.cuda.set_device(device)
    if not td.is_initialized():
        start = float(os.environ.get(START, 3600))
        try:
            store, rank, size = next(td.rendezvous("env://", timeout=timedelta(seconds=start)))
            td.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank,
                                  world_size=size, timeout=timedelta(seconds=timeout()),
                                  device_id=device if device.type == "cuda" else None)
            _started = True
        except RuntimeError as e:  # torch's DistError and its store timeouts
            why = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
            raise DsqError(f"rank {os.environ.get('RANK', '?')}: the {world} ranks did not all join within "
                           f"{START}={start:g} s ({why}); check that every rank started") from None
        open_commands()
    return td.get_rank(), device


def leave(ours_only: bool = False) -> None:
    """Leave the process groups before the interpreter exits, so that no collective's thread outlives it (one
    that does aborts the exit: "terminate called without an active exception", seen on a loaded machine): a
    follower once rank 0 said stop; rank 0 of a torchrun job as it closes, if dsq started the group
    (`ours_only`: a group the caller started is the caller's to end)."""
    global _started
    if td.is_initialized() and (_started or not ours_only):
        td.destroy_process_group()
        _started = False


def timeout() -> float:
    return float(os.environ.get(TIMEOUT, 600))


def check_split(world: int, folder: Path, scheme: Scheme | None, said: str) -> None:
    """Refuse a split the model cannot take: the shard plan of its config.json (no weights are read), in
    `scheme`'s formats or those it declares. `said` is how the caller spells the option: "tp=4", "--tp 4"."""
    cfg, declared = read_config(folder)
    try:
        shard_plan(cfg, world, scheme or declared)
    except DsqError as e:
        raise DsqError(f"{said}: {e}") from None


def check_tp(world: int, folder: Path, device: str) -> None:
    """`--tp world` before a command loads the model: the split (as load_quantized checks it, but named by the
    flag), then more ranks than there are GPUs (cuda) or CPU cores (cpu) to run them, which would only start
    interpreters that fight over memory. The API does not refuse the latter (its tests run 4 CPU ranks on 2 cores),
    and load_quantized spawns right after its own split check, so the command checks both here first."""
    check_split(world, folder, None, f"--tp {world}")
    if device.startswith("cuda"):
        have, what = torch.cuda.device_count(), "GPU(s) are visible, one per rank"
    else:
        have, what = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, \
            "CPU core(s) are available to this process"
    if world > have:
        raise DsqError(f"--tp {world}: only {have} {what}; use --tp {have} or fewer")


class Job:
    """Ranks 1.. of a job this process started as its rank 0, and how to end it."""

    def __init__(self, procs: dict[int, multiprocessing.process.BaseProcess], logs: Path, env: dict[str, str]):
        self.procs, self.watch = procs, _Watch(procs, logs)
        self.saved = {k: os.environ.get(k) for k in (*env, "RANK", "LOCAL_RANK")}
        self.threads = torch.get_num_threads()
        os.environ.update(env, RANK="0", LOCAL_RANK="0")
        torch.set_num_threads(_threads(len(procs) + 1))

    def close(self) -> None:
        """After rank 0 told its followers to stop: wait for them, then leave the process group."""
        for p in self.procs.values():
            p.join(timeout())
        self._end()

    def kill(self) -> None:
        """Rank 0 failed before the job was running: stop the other ranks now."""
        self._end()

    def _end(self) -> None:
        self.watch.stop()
        torch.set_num_threads(self.threads)
        for k, v in self.saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        if td.is_initialized():
            td.destroy_process_group()


def spawn(world: int, load: Callable[..., Any], kwargs: dict[str, Any]) -> Job | None:
    """Start ranks 1..world-1 of a job on this machine, each running load(**kwargs) (load_quantized, which on
    ranks > 0 follows rank 0 and does not return), and make this process rank 0. None: this process already is
    a rank of a job (spawned here, or by torchrun).

    A rank writes to its log from its first instruction (it inherits it as stderr), so one that fails while
    importing is named too; when a rank exits with an error the others are killed and that rank is named
    with the last line it wrote."""
    if "RANK" in os.environ:
        return None
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(world),
           START: os.environ.get(START, "300")}
    ctx = multiprocessing.get_context("spawn")
    logs = Path(tempfile.mkdtemp(prefix="dsq-ranks-"))
    procs = {r: ctx.Process(target=_rank_main, args=(r, env, load, kwargs, os.getpid()), name=f"dsq-rank-{r}",
                            daemon=True) for r in range(1, world)}
    for r, p in procs.items():
        _start_logged(p, logs / f"{r}.err")
    return Job(procs, logs, env)


def _threads(world: int) -> int:
    """CPU threads per rank: the cores shared out, as torchrun's OMP_NUM_THREADS does, so CPU ranks don't
    fight over them."""
    return max(1, (os.cpu_count() or 1) // world)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_logged(p: multiprocessing.process.BaseProcess, log: Path) -> None:
    """Start p with `log` as its stderr (file descriptor 2, so C++ messages too): the child inherits it at
    exec, before it imports anything, and this process's own stderr is back right after."""
    sys.stderr.flush()
    saved, fd = os.dup(2), os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        os.dup2(fd, 2)
        p.start()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)


def _rank_main(rank: int, env: dict[str, str], load: Callable[..., Any], kwargs: dict[str, Any], parent: int) -> None:
    """A spawned rank: load its shard and follow rank 0's steps; it dies with its parent."""
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank))
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
    torch.set_num_threads(_threads(int(env["WORLD_SIZE"])))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    load(**kwargs)


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


class _Watch:
    """Rank 0's watchdog: when a spawned rank exits non-zero, say which, kill the rest, and end the job
    (rank 0 may be blocked inside a collective, where only process exit reaches it)."""

    def __init__(self, procs: dict[int, multiprocessing.process.BaseProcess], logs: Path):
        self.procs, self.logs, self.done = procs, logs, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(0.1):
            dead = self._dead()
            if dead is not None:
                self._kill()
                shutil.rmtree(self.logs, ignore_errors=True)
                os._exit(1)

    def _dead(self) -> int | None:
        for r, p in self.procs.items():
            if p.exitcode:
                why = f"signal {-p.exitcode}" if p.exitcode < 0 else f"exit code {p.exitcode}"
                try:
                    lines = (self.logs / f"{r}.err").read_text(errors="replace").strip().splitlines()
                except OSError:  # an unreadable log must not kill the watchdog, or rank 0 waits on a dead rank
                    lines = []
                last = f"\nrank {r}: {lines[-1]}" if lines else ""
                print(f"dsq: rank {r} died ({why}); stopped the other ranks{last}", file=sys.stderr, flush=True)
                return r
        return None

    def _kill(self) -> None:
        sys.stdout.flush()
        for p in self.procs.values():
            if p.exitcode is None:
                p.kill()
        for p in self.procs.values():
            p.join(5)

    def stop(self) -> None:
        self.done.set()
        self.thread.join()
        self._dead()
        self._kill()
        shutil.rmtree(self.logs, ignore_errors=True)


# --- Ctrl-C on rank 0 ----------------------------------------------------------------------------------
@contextlib.contextmanager
def terminal(dist: Dist) -> Iterator[None]:
    """Around an interactive loop on rank 0 of N ranks: a Ctrl-C while it waits for input is raised at once; one
    during a reply is held until rank 0's next step (dsq.parallel.Interrupt), never mid-forward."""
    if dist.world == 1:
        yield
        return
    old = signal.signal(signal.SIGINT, Interrupt.handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
