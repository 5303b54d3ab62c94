"""`dsq quantize`: stream a DeepSeek-V2 checkpoint, one tensor at a time, into the compressed-tensors format.

The whole run is planned from the safetensors headers before any weight is read (so bad options and bad
files fail before OUT is touched): each source tensor's role and format, its output tensors, and which
shard they land in. A reader thread reads the next tensors while the current one is quantized, within a
byte budget, and each tensor is quantized in row blocks written straight to their place in the shard, so
memory stays near one source tensor plus a few block-sized buffers whatever the model's size.

Resume: `.dsq-progress.json` in OUT records each finished shard's sha256 and errors. A re-run with the same
source and options keeps the shards whose hash still matches and redoes the rest; the index, config.json
and `dsq_manifest.json` are written last, so a folder without them is visibly unfinished.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import re
import shutil
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich import box
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

import dsq
from dsq.checkpoint import Checkpoint, check_config, check_finite, resolve
from dsq.config import Config
from dsq.errors import DsqError
from dsq.inspect import size
from dsq.quant import BLOCK, fp8_dequantize_weight, fp8_quantize_weight, int4_pack
from dsq.quantize.scheme import Options, Task, plan_task, quantization_config
from dsq.quantize.search import GRID, int4_search
from dsq.quantize.writer import TMP, Shard, ShardWriter, atomic_write, plan_shards, sha256

PROGRESS = ".dsq-progress.json"
MANIFEST = "dsq_manifest.json"
INDEX = "model.safetensors.index.json"
COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
          "tokenizer.model", "*.jinja")
OURS = ("*.safetensors", f"*{TMP}", INDEX, MANIFEST, PROGRESS, "config.json")  # what --force removes
BLOCK_ELEMENTS = 1 << 18  # a row block quantized by one CPU core (1 MB of fp32): its buffers stay in cache
BLOCK_ELEMENTS_GPU = 1 << 24  # on a GPU, blocks large enough to hide launch overhead
PREFETCH_BYTES = 256 << 20  # read at most this far ahead (always at least one tensor)
KILL_AFTER = "DSQ_TEST_KILL_AFTER_TENSORS"  # tests: SIGKILL this process after N converted tensors
SHORT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclass
class Report:
    """What a run did; `table()` renders it."""

    out: Path
    tensors: dict[str, dict]  # tensor -> role, format, bytes_in, bytes_out, rel_err, sqnr_db
    seconds: float
    bytes_done: int  # source bytes converted by this run (resumed shards excluded)
    shards: int
    resumed: int
    roles: dict[str, dict] = field(init=False)

    def __post_init__(self) -> None:
        roles: dict[str, dict] = defaultdict(lambda: {"formats": set(), "n": 0, "in": 0, "out": 0, "errs": []})
        for info in self.tensors.values():
            r = roles[info["role"]]
            r["formats"].add(info["format"])
            r["n"] += 1
            r["in"] += info["bytes_in"]
            r["out"] += info["bytes_out"]
            if info["rel_err"] is not None:
                r["errs"].append(info)
        self.roles = dict(roles)

    def table(self) -> Table:
        t = Table(title=f"dsq quantize -> {self.out}", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                  collapse_padding=True)
        for col in ("role", "format", "tensors", "before", "after", "ratio", "err mean", "err max", "SQNR"):
            t.add_column(col, justify="left" if col in ("role", "format") else "right", no_wrap=True)
        for role, r in sorted(self.roles.items(), key=lambda kv: -kv[1]["in"]):
            errs = [e["rel_err"] for e in r["errs"]]
            sq = [e["sqnr_db"] for e in r["errs"] if e["sqnr_db"] is not None]
            t.add_row(role, ",".join(sorted(r["formats"])), str(r["n"]), size(r["in"]), size(r["out"]),
                      f"{r['in'] / max(r['out'], 1):.2f}x", f"{sum(errs) / len(errs):.2%}" if errs else "-",
                      f"{max(errs):.2%}" if errs else "-", f"{sum(sq) / len(sq):.1f}" if sq else "-")
        size_in = sum(r["in"] for r in self.roles.values())
        size_out = sum(r["out"] for r in self.roles.values())
        t.add_section()
        t.add_row("total", "", str(len(self.tensors)), size(size_in), size(size_out),
                  f"{size_in / max(size_out, 1):.2f}x", "", "", "")
        rate = self.bytes_done / self.seconds / 1e6 if self.seconds else 0.0
        t.caption = (f"{self.shards} shards ({self.resumed} resumed) in {self.seconds:.1f} s, {rate:.0f} MB/s of "
                     "source converted; err = relative Frobenius error of a tensor, SQNR in dB")
        return t


def quantize(src: str | Path, out: str | Path, opts: Options | None = None, *, revision: str | None = None,
             shard_size: int = 5 * 10**9, device: str = "cpu", force: bool = False,
             console: Console | None = None) -> Report:
    """Quantize the checkpoint `src` (folder or Hub id) into the folder `out`; see the module docstring."""
    start = time.perf_counter()
    opts = opts or Options()
    console = console or Console()
    dev = _device(device)
    if shard_size < 1:
        raise DsqError(f"--shard-size {shard_size}: must be positive")
    folder = resolve(src, revision)
    hf_cfg = _source_config(folder)
    ckpt = Checkpoint(folder)
    check_config(Config.from_hf(hf_cfg, str(folder / "config.json")), ckpt)
    tasks = sorted((plan_task(n, ckpt.shape(n), ckpt.dtype(n), opts, str(folder / ckpt.files[n]))
                    for n in ckpt.files), key=lambda t: _natural(t.name))
    shards = plan_shards(tasks, shard_size)
    key = {"source_fingerprint": _fingerprint(folder, ckpt, tasks), "options": opts.to_dict(),
           "shard_size": shard_size}
    out = Path(out).expanduser()
    if out.resolve() == folder.resolve():
        raise DsqError(f"{out}: is the source folder; write the quantized model to another folder")
    done, tensors = _prepare(out, key, shards, force)
    pending = [s for s in shards if s.name not in done]
    _check_space(out, sum(s.size for s in pending))
    state = {"dsq_version": dsq.__version__, **key, "done": done,
             "tensors": {t.name: tensors[t.name] for s in shards if s.name in done for t in s.tasks}}
    atomic_write(out / PROGRESS, json.dumps(state))
    for name in (MANIFEST, INDEX, "config.json"):  # unfinished from here until they are rewritten
        (out / name).unlink(missing_ok=True)

    todo = [t for s in pending for t in s.tasks]
    kill_after = int(os.environ.get(KILL_AFTER, "0"))
    converted = 0

    def finish_shard(writer: ShardWriter, errors: dict) -> None:
        """Sync, hash, rename and record a written shard (in the background: the next shard goes on)."""
        digest = writer.commit()
        done[writer.shard.name] = {"sha256": digest, "bytes": writer.shard.size}
        state["tensors"].update(errors)
        atomic_write(out / PROGRESS, json.dumps(state))

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TextColumn("{task.fields[tensors]} tensors"), TimeRemainingColumn())
    # On the CPU, one core per row block (one intra-op thread per worker) rather than every core on each op:
    # a block's buffers then stay in its core's cache.
    threads = torch.get_num_threads()
    cpu = dev.type == "cpu"
    if cpu:
        torch.set_num_threads(1)
    with (Progress(*columns, console=console, disable=not console.is_terminal) as bar,
          ThreadPoolExecutor(threads if cpu else 1, "dsq-quantize", initializer=torch.set_num_threads,
                             initargs=(1 if cpu else threads,)) as pool,
          ThreadPoolExecutor(1, "dsq-commit") as committer):
        total_in = sum(s.nbytes_in for s in shards)
        done_in = total_in - sum(t.nbytes for t in todo)
        job = bar.add_task("quantizing", total=total_in, completed=done_in,
                           tensors=f"{len(tasks) - len(todo)}/{len(tasks)}")
        stream = _prefetch(Source(ckpt), todo)
        commit = None
        try:
            for shard in pending:
                errors = {}
                with ShardWriter(out, shard) as writer:
                    for task in shard.tasks:
                        _, tensor = next(stream)
                        errors[task.name] = {"shard": shard.name, **_convert(task, tensor, writer, dev, opts, pool)}
                        del tensor
                        converted += 1
                        if converted == kill_after:
                            os.kill(os.getpid(), signal.SIGKILL)
                        done_in += task.nbytes
                        bar.update(job, completed=done_in,
                                   tensors=f"{len(tasks) - len(todo) + converted}/{len(tasks)}")
                if commit is not None:
                    commit.result()
                commit = committer.submit(finish_shard, writer, errors)
            if commit is not None:
                commit.result()
        finally:
            torch.set_num_threads(threads)
            stream.close()

    _finish(out, folder, src, revision, hf_cfg, opts, shards, state)
    return Report(out, state["tensors"], time.perf_counter() - start, sum(t.nbytes for t in todo), len(shards),
                  len(shards) - len(pending))


def _device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise DsqError(f"--device {device!r}: not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DsqError(f"--device {device}: no CUDA GPU is visible; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise DsqError(f"--device {device}: dsq quantizes on cpu or cuda")
    return dev


def _source_config(folder: Path) -> dict:
    path = folder / "config.json"
    Config.from_file(path)  # refuses what is not DeepSeek-V2, in one line
    hf = json.loads(path.read_text())
    if hf.get("quantization_config"):
        method = hf["quantization_config"].get("quant_method", "?")
        raise DsqError(f"{path}: the checkpoint is already quantized ({method}); give dsq quantize the "
                       "BF16 checkpoint")
    return hf


def _natural(name: str) -> list:
    """Sort key that puts layer 2 before layer 10."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _fingerprint(folder: Path, ckpt: Checkpoint, tasks: list[Task]) -> str:
    """Identity of the source for resuming: tensor names, shapes, dtypes and file sizes."""
    h = hashlib.sha256()
    for t in tasks:
        h.update(f"{t.name}:{list(t.shape)}:{t.dtype}\n".encode())
    for f in sorted(set(ckpt.files.values())):
        h.update(f"{f}:{(folder / f).stat().st_size}\n".encode())
    return h.hexdigest()


def _prepare(out: Path, key: dict, shards: list[Shard], force: bool) -> tuple[dict[str, dict], dict[str, dict]]:
    """Make OUT ready; return the shards already finished there with a matching hash, and their tensors'
    records."""
    if out.exists() and not out.is_dir():
        raise DsqError(f"{out}: exists and is not a folder; choose another output folder")
    state = None
    for name in (PROGRESS, MANIFEST):
        if (out / name).is_file():
            try:
                state = json.loads((out / name).read_text())
                break
            except (OSError, json.JSONDecodeError):
                pass
    if out.exists() and any(out.iterdir()):
        ours = state is not None and all(state.get(k) == v for k, v in key.items())
        if not ours:
            if not force:
                what = "is not a dsq output" if state is None else "holds a dsq output of another source or options"
                raise DsqError(f"{out}: exists and {what}; choose another folder, or pass --force to replace "
                               "its weights")
            for pattern in OURS:
                for p in out.glob(pattern):
                    p.unlink()
            state = None
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DsqError(f"{out}: cannot create the output folder ({e.strerror}); choose a writable place") from None
    for p in out.glob(f"*{TMP}"):
        p.unlink()
    done: dict[str, dict] = {}
    tensors: dict[str, dict] = {}
    if state is not None and state.get("dsq_version") == dsq.__version__:
        finished = state.get("done", state.get("shards", {}))
        recorded = state.get("tensors", {})
        for s in shards:
            info = finished.get(s.name)
            if (info and all(t.name in recorded for t in s.tasks) and (out / s.name).is_file()
                    and sha256(out / s.name) == info["sha256"]):
                done[s.name] = info
                tensors.update((t.name, recorded[t.name]) for t in s.tasks)
    return done, tensors


def _check_space(out: Path, need: int) -> None:
    free = shutil.disk_usage(out).free
    if need > free:
        raise DsqError(f"{out}: the output needs {size(need)} more and only {size(free)} is free; free space "
                       "or choose another folder")


class Source:
    """Reads source tensors with pread into fresh buffers. (safetensors' reader maps the file, and every page
    read through a map stays in the process's RSS for as long as the file is open: a whole 8 GB shard.)"""

    def __init__(self, ckpt: Checkpoint):
        self.where: dict[str, tuple[Path, int, int]] = {}  # tensor -> file, first byte, end
        for file in sorted(set(ckpt.files.values())):  # headers already checked by safetensors
            path = ckpt.folder / file
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            for name, meta in header.items():
                if name != "__metadata__":
                    start, end = meta["data_offsets"]
                    self.where[name] = (path, 8 + n + start, 8 + n + end)

    def get(self, task: Task) -> torch.Tensor:
        """One tensor, checked for NaN and Inf when it is floating point (aminmax: one fast pass)."""
        path, start, end = self.where[task.name]
        buf = torch.empty(end - start, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        with open(path, "rb", buffering=0) as f:
            while view.nbytes:
                n = os.preadv(f.fileno(), [view], start)
                if n == 0:
                    raise DsqError(f"{path}: tensor {task.name} is cut short; the file is truncated, re-download it")
                view, start = view[n:], start + n
        t = buf.view(task.dtype).view(task.shape)
        check_finite(t, path, task.name)
        return t


def _prefetch(source: Source, tasks: list[Task]) -> Iterator[tuple[Task, torch.Tensor]]:
    """The tasks' source tensors in order, read by a thread up to PREFETCH_BYTES ahead, so reading (and
    the NaN check) overlaps the maths. The caller drops each tensor before asking for the next."""
    results: queue.Queue = queue.Queue()
    ahead = [0]
    cv = threading.Condition()
    stop = threading.Event()

    def reader() -> None:
        try:
            for t in tasks:
                with cv:
                    cv.wait_for(lambda t=t: stop.is_set() or ahead[0] == 0 or ahead[0] + t.nbytes <= PREFETCH_BYTES)
                    if stop.is_set():
                        return
                    ahead[0] += t.nbytes
                results.put((t, source.get(t)))
        except BaseException as e:  # handed to the consumer, which raises it
            results.put((None, e))

    thread = threading.Thread(target=reader, name="dsq-reader", daemon=True)
    thread.start()
    try:
        for _ in tasks:
            t, x = results.get()
            if t is None:
                raise x
            yield t, x
            del x
            with cv:
                ahead[0] -= t.nbytes
                cv.notify()
    finally:
        stop.set()
        with cv:
            cv.notify()
        thread.join()


def _convert(task: Task, w: torch.Tensor, writer: ShardWriter, dev: torch.device, opts: Options,
             pool: ThreadPoolExecutor) -> dict:
    """Quantize (or cast) one tensor into the shard, row blocks in parallel; return its error record."""
    info = {"role": task.role, "format": task.fmt, "bytes_in": task.nbytes, "bytes_out": task.out_nbytes}
    if task.fmt == "keep":
        info["format"] = SHORT.get(task.outs[0].dtype, str(task.outs[0].dtype).removeprefix("torch."))
    if w.dim() == 2:
        budget = BLOCK_ELEMENTS if dev.type == "cpu" else BLOCK_ELEMENTS_GPU
        rows = max(BLOCK, budget // w.shape[1] // BLOCK * BLOCK)
        jobs = [pool.submit(_convert_rows, task, w[r0:r0 + rows], r0, writer, dev, opts)
                for r0 in range(0, w.shape[0], rows)]
    else:
        jobs = [pool.submit(_convert_rows, task, w, 0, writer, dev, opts)]
    try:
        sums = [j.result() for j in jobs]
    finally:  # never leave a block writing into a shard that is being abandoned
        for j in jobs:
            j.cancel()
        wait(jobs)
    if task.fmt == "int4":
        writer.write(task.outs[2].name, torch.tensor(task.shape, dtype=torch.int64))
    if sums[0] is None:
        return info | _errors(None, None)
    return info | _errors(sum(e for e, _ in sums), sum(n for _, n in sums))


def _convert_rows(task: Task, w: torch.Tensor, r0: int, writer: ShardWriter, dev: torch.device,
                  opts: Options) -> tuple[float, float] | None:
    """Rows [r0, r0 + len(w)) of one tensor: convert, write, and return (squared error, squared norm)."""
    w = w.to(dev)
    if task.fmt == "keep":
        out = task.outs[0]
        cast = w.to(out.dtype)
        writer.write(out.name, cast, r0)
        if not w.is_floating_point() or out.dtype == w.dtype:
            return None
        f = w.float()
        return torch.linalg.vector_norm(cast.float() - f).item() ** 2, torch.linalg.vector_norm(f).item() ** 2
    if task.fmt == "int4":
        packed, scale, _, *zp = task.outs
        res = int4_search(w, opts.group_size, opts.symmetric, GRID if opts.clip_search else (1.0,))
        writer.write(packed.name, int4_pack(res.q), r0)
        writer.write(scale.name, res.scale, r0)
        if zp:
            writer.write(zp[0].name, int4_pack(res.zero, dim=0), r0 // 8)
        return res.err2, res.norm2
    weight, scale = task.outs
    q, s = fp8_quantize_weight(w, opts.fp8_block)
    writer.write(weight.name, q, r0)
    writer.write(scale.name, s, r0 // BLOCK if opts.fp8_block else r0)
    f = w.float()
    return (torch.linalg.vector_norm(fp8_dequantize_weight(q, s).sub_(f)).item() ** 2,
            torch.linalg.vector_norm(f).item() ** 2)


def _errors(err2: float | None, norm2: float | None) -> dict:
    """Relative Frobenius error and SQNR (dB); None where there is no error to speak of."""
    if err2 is None or norm2 is None:
        return {"rel_err": None, "sqnr_db": None}
    rel = math.sqrt(err2 / norm2) if norm2 > 0 else 0.0
    return {"rel_err": rel, "sqnr_db": 10 * math.log10(norm2 / err2) if err2 > 0 and norm2 > 0 else None}


def _finish(out: Path, folder: Path, src: str | Path, revision: str | None, hf_cfg: dict, opts: Options,
            shards: list[Shard], state: dict) -> None:
    """Tokenizer files, then index, config.json and the manifest, each written whole; then drop progress."""
    for pattern in COPIED:
        for p in sorted(folder.glob(pattern)):
            atomic_write(out / p.name, p.read_bytes())
    weight_map = {o.name: s.name for s in shards for t in s.tasks for o in t.outs}
    total = sum(o.nbytes for s in shards for t in s.tasks for o in t.outs)
    atomic_write(out / INDEX, json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(
        weight_map.items()))}, indent=2))
    cfg = dict(hf_cfg)
    qcfg = quantization_config(opts)
    if qcfg is not None:
        cfg["quantization_config"] = qcfg
    cast = any(o.dtype == torch.bfloat16 and t.dtype == torch.float32 for s in shards for t in s.tasks for o in t.outs)
    for k in ("torch_dtype", "dtype"):
        if cast and cfg.get(k) == "float32":
            cfg[k] = "bfloat16"
    atomic_write(out / "config.json", json.dumps(cfg, indent=2))
    manifest = {
        "dsq_version": dsq.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {"path": str(src), "folder": str(folder), "revision": revision},
        "source_fingerprint": state["source_fingerprint"],
        "options": state["options"],
        "shard_size": state["shard_size"],
        "shards": {s.name: state["done"][s.name] for s in shards},
        "tensors": {t.name: state["tensors"][t.name] for s in shards for t in s.tasks},
    }
    atomic_write(out / MANIFEST, json.dumps(manifest, indent=1))
    (out / PROGRESS).unlink(missing_ok=True)


