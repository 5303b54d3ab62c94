"""`dsq quantize`: stream a DeepSeek-V2 checkpoint, one tensor at a time, into the compressed-tensors format.

The whole run is planned from the safetensors headers before any weight is read (so bad options and bad
files fail before OUT is touched): each source tensor's role and format, its output tensors, and which
shard they land in. A reader thread reads the next tensors while the current one is quantized, within a
byte budget, and each tensor is quantized in row blocks written straight to their place in the shard, so
memory stays near one source tensor plus a few block-sized buffers whatever the model's size.

The parts: quantize/source.py reads, quantize/convert.py converts one tensor, quantize/writer.py lays out
and writes the output files, quantize/resume.py finds what a killed run already finished, and
quantize/report.py tells what was done. The index, config.json and `dsq_manifest.json` are written last,
so a folder without them is visibly unfinished.
"""

from __future__ import annotations

import json
import re
import shlex
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

import dsq
from dsq.api import check_device
from dsq.checkpoint import Checkpoint, check_config, resolve
from dsq.config import Config
from dsq.errors import DsqError
from dsq.loader import read_config
from dsq.quantize.convert import convert_tensor
from dsq.quantize.lock import locked
from dsq.quantize.report import Report
from dsq.quantize.resume import INDEX, MANIFEST, PROGRESS, check_space, check_unchanged, fingerprint, prepare, stamps
from dsq.quantize.scheme import Options, Task, quantization_config, task_for
from dsq.quantize.source import Source, check_tensors, prefetch
from dsq.quantize.writer import OutputFile, OutputWriter, atomic_write, layout_files

SHARD_SIZE = 5 * 10**9  # bytes: the largest output file, as --shard-size's default 5GB
COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
          "tokenizer.model", "*.jinja")


def quantize(src: str | Path, out: str | Path, opts: Options | None = None, *, revision: str | None = None,
             shard_size: int = SHARD_SIZE, device: str = "cpu", force: bool = False,
             console: Console | None = None) -> Report:
    """Quantize the checkpoint `src` (folder or Hub id) into the folder `out`; see the module docstring."""
    start = time.perf_counter()
    opts = opts or Options()
    console = console or Console()
    dev = check_device(device, cli=True)
    if shard_size < 1:
        raise DsqError(f"--shard-size {shard_size}: must be positive")
    folder = resolve(src, revision)
    cfg, hf_cfg = _source_config(folder)
    ckpt = Checkpoint(folder)
    check_config(cfg, ckpt)
    check_tensors(cfg, ckpt)
    tasks = sorted((task_for(n, ckpt.shape(n), ckpt.dtype(n), opts, str(folder / ckpt.files[n]))
                    for n in ckpt.files), key=lambda t: _natural(t.name))
    shards = layout_files(tasks, shard_size)
    key = {"source_fingerprint": fingerprint(tasks), "options": opts.to_dict(), "shard_size": shard_size}
    out = Path(out).expanduser()
    if out.resolve() == folder.resolve():
        raise DsqError(f"{out}: is the source folder; write the quantized model to another folder")
    if out.exists() and not out.is_dir():
        raise DsqError(f"{out}: exists and is not a folder; choose another output folder")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DsqError(f"{out}: cannot create the output folder ({e.strerror}); choose a writable place") from None
    try:
        with locked(out):
            return _run(ckpt, src, revision, out, hf_cfg, opts, tasks, shards, key, dev, force, console, start)
    except BaseException:
        if created:  # a refused or failed run leaves no empty folder behind
            _remove_if_empty(out)
        raise


def command(src: str | Path, revision: str | None, out: Path, opts: Options, shard_size: int,
            device: torch.device) -> str:
    """The `dsq quantize` command line of this run, for the hints that tell how to finish it."""
    words = ["dsq", "quantize", str(src), str(out), *(w for f in opts.flags() for w in f.split())]
    words += ["--shard-size", str(shard_size)] if shard_size != SHARD_SIZE else []
    words += ["--device", str(device)] if device.type != "cpu" else []
    return shlex.join(words + (["--revision", revision] if revision else []))


def _run(ckpt: Checkpoint, src: str | Path, revision: str | None, out: Path, hf_cfg: dict, opts: Options,
         tasks: list[Task], shards: list[OutputFile], key: dict, dev: torch.device, force: bool, console: Console,
         start: float) -> Report:
    """The run itself, with OUT locked: what is already done, then the rest, shard by shard."""
    folder, sources = ckpt.folder, stamps(ckpt)
    done, tensors, complete = prepare(out, key, shards, ckpt, sources, force)
    if complete:  # a finished output, every shard verified: nothing to rewrite
        return Report(out, tensors, time.perf_counter() - start, 0, len(shards), len(shards))
    pending = [s for s in shards if s.name not in done]
    check_space(out, sum(s.size for s in pending))
    state = {"dsq_version": dsq.__version__, **key, "source": str(src), "command": command(src, revision, out, opts,
                                                                                        key["shard_size"], dev),
             "source_files": sources, "done": done,
             "tensors": {t.name: tensors[t.name] for s in shards if s.name in done for t in s.tasks}}
    atomic_write(out / PROGRESS, json.dumps(state))
    for name in (MANIFEST, INDEX, "config.json"):  # unfinished from here until they are rewritten
        (out / name).unlink(missing_ok=True)

    todo = [t for s in pending for t in s.tasks]
    converted = 0

    def finish_shard(writer: OutputWriter, errors: dict) -> None:
        """Sync, hash, rename and record a written shard (in the background: the next shard goes on)."""
        try:
            check_unchanged(ckpt, writer.shard, sources)
        except DsqError:
            writer.abort()
            raise
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
        stream = prefetch(Source(ckpt), todo)
        commit = None
        try:
            for shard in pending:
                errors = {}
                with OutputWriter(out, shard) as writer:
                    for task in shard.tasks:
                        _, tensor = next(stream)
                        record = convert_tensor(task, tensor, writer, dev, opts, pool)
                        errors[task.name] = {"shard": shard.name, **record}
                        del tensor
                        converted += 1
                        done_in += task.nbytes
                        bar.update(job, completed=done_in,
                                   tensors=f"{len(tasks) - len(todo) + converted}/{len(tasks)}")
                if commit is not None:
                    try:
                        commit.result()
                    except BaseException:  # the previous shard failed: this one will not be committed either
                        writer.abort()
                        raise
                commit = committer.submit(finish_shard, writer, errors)
            if commit is not None:
                commit.result()
        finally:
            torch.set_num_threads(threads)
            stream.close()

    _finish(out, folder, src, revision, hf_cfg, opts, shards, state)
    return Report(out, state["tensors"], time.perf_counter() - start, sum(t.nbytes for t in todo), len(shards),
                  len(shards) - len(pending))


def _source_config(folder: Path) -> tuple[Config, dict]:
    """The source's Config (refusing what is not DeepSeek-V2, in one line) and its config.json as written."""
    cfg, _ = read_config(folder)
    hf = json.loads((folder / "config.json").read_text())
    if hf.get("quantization_config"):
        method = hf["quantization_config"].get("quant_method", "?")
        raise DsqError(f"{folder / 'config.json'}: the checkpoint is already quantized ({method}); give dsq "
                       "quantize the BF16 checkpoint")
    return cfg, hf


def _remove_if_empty(out: Path) -> None:
    """Remove OUT if it holds nothing but a progress record of no finished file."""
    try:
        if all(p.name == PROGRESS for p in out.iterdir()):
            (out / PROGRESS).unlink(missing_ok=True)
            out.rmdir()
    except OSError:
        pass  # another run may have started there meanwhile: leave it


def _natural(name: str) -> list:
    """Sort key that puts layer 2 before layer 10."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _finish(out: Path, folder: Path, src: str | Path, revision: str | None, hf_cfg: dict, opts: Options,
            shards: list[OutputFile], state: dict) -> None:
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
        "source_files": state["source_files"],
        "options": state["options"],
        "shard_size": state["shard_size"],
        "shards": {s.name: state["done"][s.name] for s in shards},
        "tensors": {t.name: state["tensors"][t.name] for s in shards for t in s.tasks},
    }
    atomic_write(out / MANIFEST, json.dumps(manifest, indent=1))
    (out / PROGRESS).unlink(missing_ok=True)


