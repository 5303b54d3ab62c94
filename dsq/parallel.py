"""Tensor + expert parallelism over torch.distributed: who holds what, the collectives, launching ranks.

Split (docs/parallel.md has the why and the memory arithmetic):
- attention by heads: q_proj / q_b_proj and kv_b_proj column-parallel, o_proj row-parallel; q_a_proj,
  kv_a_proj_with_mqa and the 576-wide latent cache replicated;
- dense MLP and shared experts by intermediate columns: gate/up column-parallel, down row-parallel;
- routed experts whole, a contiguous range of experts per rank; the router replicated;
- embedding and lm_head by vocab rows.
Per layer: one all-reduce after attention, one after the MoE (routed + shared summed first) or dense MLP.
Per forward: one all-reduce after the embedding, one all-gather of the logits; per step, one broadcast of
rank 0's sampled tokens. At world size 1 every collective is the identity and nothing is sliced.

Splits need not be even: each range is cut into contiguous pieces of whole units, the first ranks taking one
unit more. A unit is one head / column / expert / vocab row, or more where a quantization format needs it:
an FP8 128x128 block or an INT4 group must not straddle two ranks.
"""

from __future__ import annotations

import contextlib
import itertools
import math
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
from dataclasses import dataclass, fields
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as td
import torch.nn.functional as F

from dsq.config import Config
from dsq.errors import DsqError

TIMEOUT = "DSQ_DIST_TIMEOUT"  # seconds a collective may wait for the other ranks (default 600)


# --- who holds what ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shard:
    """One rank's half-open range of each split dimension."""

    heads: tuple[int, int]
    dense: tuple[int, int]  # intermediate columns of the dense MLP
    shared: tuple[int, int]  # intermediate columns of the shared experts
    experts: tuple[int, int]
    vocab: tuple[int, int]

    @staticmethod
    def whole(cfg: Config) -> Shard:
        return Shard(**{k: (0, n) for k, n in extents(cfg).items()})


def extents(cfg: Config) -> dict[str, int]:
    """The length of each split dimension; 0 where the model has no such part (no dense or no MoE layer)."""
    moe = [cfg.is_moe(i) for i in range(cfg.num_hidden_layers)]
    return {"heads": cfg.num_attention_heads, "dense": 0 if all(moe) else cfg.intermediate_size,
            "shared": cfg.moe_intermediate_size * cfg.n_shared_experts if any(moe) else 0,
            "experts": cfg.n_routed_experts if any(moe) else 0, "vocab": cfg.vocab_size}


def span(n: int, world: int, unit: int = 1) -> list[tuple[int, int]]:
    """range(n) cut into `world` contiguous pieces of whole `unit`s (the last unit may be short); the first
    ranks take one unit more when they do not divide evenly. Callers check that there are >= world units."""
    units = -(-n // unit)
    base, extra = divmod(units, world)
    cuts = [0]
    for r in range(world):
        cuts.append(cuts[-1] + base + (r < extra))
    return [(min(a * unit, n), min(b * unit, n)) for a, b in itertools.pairwise(cuts)]


def splits(cfg: Config) -> dict[str, tuple[int, str, int]]:
    """The tensor-parallel modules: dsq module name -> (the dim of its [out, in] weight that is split, the
    Shard range it follows, weight rows/columns per unit of that range). Everything else is replicated,
    except routed experts, which are whole and split by expert."""
    p, r, v = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    out = {"embed": (0, "vocab", 1), "head": (0, "vocab", 1)}
    for i in range(cfg.num_hidden_layers):
        a = f"layers.{i}.attn"
        out[f"{a}.wq_b" if cfg.q_lora_rank else f"{a}.wq"] = (0, "heads", p + r)
        out[f"{a}.wkv_b"] = (0, "heads", p + v)
        out[f"{a}.wo"] = (1, "heads", v)
        if cfg.is_moe(i) and not cfg.n_shared_experts:
            continue
        mlp, rng = (f"layers.{i}.ffn.shared", "shared") if cfg.is_moe(i) else (f"layers.{i}.ffn", "dense")
        out |= {f"{mlp}.w1": (0, rng, 1), f"{mlp}.w3": (0, rng, 1), f"{mlp}.w2": (1, rng, 1)}
    return out


def _align(make: Callable[..., Any], dim: int) -> tuple[int, str]:
    """Rows (dim 0) or columns (dim 1) that must stay on one rank for a module format, and why."""
    from dsq.layers import FP8Linear, Int4Linear
    from dsq.quant import BLOCK

    cls, kw = getattr(make, "func", make), getattr(make, "keywords", {})
    if issubclass(cls, FP8Linear) and kw.get("block"):
        return BLOCK, f"FP8 {BLOCK}x{BLOCK} block scales"
    if issubclass(cls, Int4Linear) and dim == 1:
        return kw.get("group", 128), f"INT4 groups of {kw.get('group', 128)} inputs"
    if issubclass(cls, Int4Linear) and not kw.get("symmetric", True):
        return 8, "INT4 zero points packed 8 rows to a word"
    return 1, ""


def plan(cfg: Config, world: int, scheme: Any = None) -> list[Shard]:
    """Every rank's Shard, on whole quantization units of the formats `scheme` (a dsq.layers.Scheme)
    declares; a DsqError names the range, the module and the format when there are fewer units than ranks."""
    from dsq.loader import hf_module

    if world == 1:
        return [Shard.whole(cfg)]
    unit = dict.fromkeys(extents(cfg), 1)
    why = dict.fromkeys(unit, "")
    for name, (dim, rng, width) in splits(cfg).items():
        if scheme is None or name == "embed":
            continue
        a, reason = _align(scheme.format(hf_module(name)), dim)
        need = a // math.gcd(a, width)  # units of the range that fill whole `a`-sized pieces
        if need > 1:
            if unit[rng] % need:
                why[rng] = f"{hf_module(name)} has {reason}, so a rank takes {math.lcm(unit[rng], need)} at a time"
            unit[rng] = math.lcm(unit[rng], need)
    names = {"heads": "attention heads", "dense": "dense-MLP intermediate columns",
             "shared": "shared-expert intermediate columns", "experts": "routed experts", "vocab": "vocab rows"}
    cut = {}
    for rng, n in extents(cfg).items():
        if n == 0:
            cut[rng] = [(0, 0)] * world
            continue
        if -(-n // unit[rng]) < world:
            reason = f" ({why[rng]})" if why[rng] else ""
            raise DsqError(f"cannot split {n} {names[rng]} over {world} ranks{reason}; use fewer ranks")
        cut[rng] = span(n, world, unit[rng])
    return [Shard(**{f.name: cut[f.name][r] for f in fields(Shard)}) for r in range(world)]


# --- the collectives the model calls -------------------------------------------------------------------
class Dist:
    """This rank's Shard and the collectives over the default process group. At world size 1 each
    collective returns its input, so the single-rank model runs exactly the code it always did."""

    def __init__(self, shards: list[Shard], rank: int = 0):
        self.shards, self.rank, self.world = shards, rank, len(shards)
        self.shard = shards[rank]

    @staticmethod
    def single(cfg: Config) -> Dist:
        return Dist([Shard.whole(cfg)])

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of every rank's x (in place)."""
        if self.world > 1:
            self._call(td.all_reduce, "all_reduce", x)
        return x

    def all_gather(self, x: torch.Tensor, widths: list[int]) -> torch.Tensor:
        """Every rank's x concatenated along the last dim; rank r's piece is widths[r] wide."""
        if self.world == 1:
            return x
        x = F.pad(x, (0, max(widths) - x.shape[-1])).contiguous()  # all_gather wants equal shapes
        parts = [torch.empty_like(x) for _ in range(self.world)]
        self._call(td.all_gather, "all_gather", parts, x)
        return torch.cat([p[..., :w] for p, w in zip(parts, widths, strict=True)], dim=-1)

    def share(self, obj: Any) -> Any:
        """Rank 0's obj (picklable), on every rank: what rank 0 read decides what all ranks run."""
        if self.world == 1:
            return obj
        box = [obj]
        self._call(td.broadcast_object_list, "broadcast", box, src=0)
        return box[0]

    def agree(self, tokens: torch.Tensor) -> torch.Tensor:
        """Rank 0's sampled tokens [B], on every rank, so that sampling cannot make ranks diverge. A Ctrl-C
        on rank 0 (see `terminal`) travels with them and stops every rank at this same step."""
        if self.world == 1:
            return tokens
        msg = torch.cat([tokens, tokens.new_tensor([_Interrupt.take()])])
        self._call(td.broadcast, "broadcast", msg, src=0)
        if msg[-1]:
            raise KeyboardInterrupt
        return msg[:-1]

    def _call(self, fn: Callable[..., Any], what: str, *args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except RuntimeError as e:
            cause = str(e).split("\n", 1)[0].split("] ", 1)[-1].split(". ", 1)[0][:200]  # gloo's first sentence
            raise DsqError(f"rank {self.rank}: {what} failed, so another rank has died or stalled ({cause}); "
                           "stopping") from None


# --- joining a job -------------------------------------------------------------------------------------
def init(world: int, device: torch.device) -> tuple[int, torch.device]:
    """Join this process's rank of a `world`-rank job (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT, as
    torchrun and `launch` set them), starting the default process group unless the caller already has:
    NCCL on CUDA, gloo on CPU. Ranks may take long to start (the rendezvous waits up to an hour; a launcher
    sees a rank that dies first), but once running a collective waits at most $DSQ_DIST_TIMEOUT s (600).
    Returns (rank, this rank's device: cuda means cuda:LOCAL_RANK)."""
    if td.is_initialized():
        if td.get_world_size() != world:
            raise DsqError(f"tp={world}, but the process group has {td.get_world_size()} ranks")
    elif os.environ.get("WORLD_SIZE") is None:
        raise DsqError(f"tp={world} needs {world} processes: start them with torchrun --nproc-per-node {world}, "
                       f"or use `dsq generate/chat --tp {world}`")
    elif int(os.environ["WORLD_SIZE"]) != world:
        raise DsqError(f"tp={world}, but this job has WORLD_SIZE={os.environ['WORLD_SIZE']} processes")
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if device.index >= torch.cuda.device_count():
            raise DsqError(f"tp={world} on cuda needs a GPU per rank; {torch.cuda.device_count()} visible")
        torch.cuda.set_device(device)
    if not td.is_initialized():
        store, rank, size = next(td.rendezvous("env://", timeout=timedelta(hours=1)))
        td.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank, world_size=size,
                              timeout=timedelta(seconds=timeout()), device_id=device if device.type == "cuda" else None)
    return td.get_rank(), device


def timeout() -> float:
    return float(os.environ.get(TIMEOUT, 600))


def launch(world: int, fn: Callable[..., Any], kwargs: dict[str, Any]) -> bool:
    """Run the command fn(**kwargs) on `world` ranks of this machine. True: it ran (the caller is done).
    False: this process already is one rank of a job (spawned here, or by torchrun), so the caller runs it.

    This process becomes rank 0 and keeps the terminal; ranks 1.. are spawned with stdout silenced, stderr
    kept aside and Ctrl-C ignored. When a rank exits with an error the others are killed and that rank is
    named with the last line it wrote (so an error every rank hits is not printed once per rank)."""
    if "RANK" in os.environ:
        if int(os.environ["RANK"]):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
        return False
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(world)}
    ctx = multiprocessing.get_context("spawn")
    logs = Path(tempfile.mkdtemp(prefix="dsq-ranks-"))
    procs = {r: ctx.Process(target=_rank_main, args=(r, env, fn, kwargs, os.getpid(), logs / f"{r}.err"),
                            daemon=True) for r in range(1, world)}
    for p in procs.values():
        p.start()
    watch = _Watch(procs, logs)
    old = {k: os.environ.get(k) for k in (*env, "RANK", "LOCAL_RANK")}
    os.environ.update(env, RANK="0", LOCAL_RANK="0")
    threads = torch.get_num_threads()
    torch.set_num_threads(_threads(world))
    try:
        fn(**kwargs)
        for p in procs.values():
            p.join(timeout())
    finally:
        watch.stop()
        torch.set_num_threads(threads)
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        if td.is_initialized():
            td.destroy_process_group()
    return True


def _threads(world: int) -> int:
    """CPU threads per rank: the cores shared out, as torchrun's OMP_NUM_THREADS does, so CPU ranks don't
    fight over them."""
    return max(1, (os.cpu_count() or 1) // world)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, env: dict[str, str], fn: Callable[..., Any], kwargs: dict[str, Any], parent: int,
               log: Path) -> None:
    """A spawned rank: rank 0 (the parent) reads input and prints; this one follows, and dies with it."""
    os.dup2(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)  # C++ messages too
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(_threads(int(env["WORLD_SIZE"])))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    fn(**kwargs)


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
                lines = (self.logs / f"{r}.err").read_text(errors="replace").strip().splitlines()
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


# --- rank 0 reads and prints ---------------------------------------------------------------------------
class _Interrupt:
    """Rank 0's Ctrl-C: raised at once while it waits for input (nothing is shared yet), otherwise held
    until the next `Dist.agree`, which stops every rank at the same step."""

    reading = False
    pending = False

    @classmethod
    def handler(cls, signum: int, frame: Any) -> None:
        if cls.reading:
            raise KeyboardInterrupt
        cls.pending = True

    @classmethod
    def take(cls) -> int:
        pending, cls.pending = cls.pending, False
        return int(pending)


class _Terminal:
    """A console stand-in for `dsq chat` on N ranks: rank 0 reads lines and shares them (over a gloo group
    that never times out: a user may think for hours); the others take them and print nothing."""

    def __init__(self, console: Any, rank: int):
        self.console, self.rank = console, rank
        self.group = td.new_group(backend="gloo", timeout=timedelta(days=365))

    def input(self, prompt: str = "") -> str:
        if self.rank == 0:
            _Interrupt.reading = True
            try:
                line = self.console.input(prompt)
            except EOFError:
                line = None
            finally:
                _Interrupt.reading = False
        box = [line if self.rank == 0 else None]
        td.broadcast_object_list(box, src=0, group=self.group)
        if box[0] is None:
            raise EOFError
        return box[0]

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self.rank == 0:
            self.console.print(*args, **kwargs)


@contextlib.contextmanager
def terminal(console: Any, dist: Dist) -> Iterator[Any]:
    """The console an interactive loop should use: `console` itself on one rank; on N ranks, one whose input
    rank 0 reads and shares, and under which Ctrl-C on rank 0 stops a reply on every rank at one step."""
    if dist.world == 1:
        yield console
        return
    old = signal.signal(signal.SIGINT, _Interrupt.handler) if dist.rank == 0 else None
    try:
        yield _Terminal(console, dist.rank)
    finally:
        if old is not None:
            signal.signal(signal.SIGINT, old)


# --- memory ------------------------------------------------------------------------------------------------
def cache_tokens(cfg: Config, world: int, gpu_bytes: int, scheme: Any = None, kind: str = "fp8",
                 prefill: int = 4096, overhead: int = 1 << 30) -> dict[str, int]:
    """The memory plan of one GPU of `gpu_bytes` in a `world`-GPU job: rank 0's weights (it holds the most),
    the activations of a `prefill`-token forward over its heads (dsq.plan's bound), `overhead` for the CUDA
    context and NCCL buffers, and how many tokens of latent cache the rest holds. The cache is replicated,
    so that is the job's capacity too, shared by all sequences."""
    from dataclasses import replace

    from dsq.cache import bytes_per_token
    from dsq.plan import activation_bytes, weight_bytes

    weights = sum(weight_bytes(cfg, scheme, world=world).values())
    heads = plan(cfg, world, scheme)[0].heads
    act = activation_bytes(replace(cfg, num_attention_heads=heads[1] - heads[0]), prefill)
    free = gpu_bytes - weights - act - overhead
    per_token = bytes_per_token(cfg, kind)
    return {"weights": weights, "activations": act, "overhead": overhead, "free": free, "per_token": per_token,
            "tokens": max(free, 0) // per_token}
