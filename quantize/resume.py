"""Resuming `dsq quantize`: `.dsq-progress.json` in OUT records each finished output file's sha256 and its
tensors' errors. A re-run with the same source and options keeps the files whose hash still matches and
redoes the rest; anything else in OUT is refused unless --force."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import dsq
from dsq.checkpoint import Checkpoint
from dsq.errors import DsqError
from dsq.inspect import size
from dsq.quantize.scheme import Task
from dsq.quantize.writer import TMP, OutputFile, sha256

PROGRESS = ".dsq-progress.json"
MANIFEST = "dsq_manifest.json"
INDEX = "model.safetensors.index.json"
OURS = ("*.safetensors", f"*{TMP}", INDEX, MANIFEST, PROGRESS, "config.json")  # what --force removes


def fingerprint(folder: Path, ckpt: Checkpoint, tasks: list[Task]) -> str:
    """Identity of the source for resuming: tensor names, shapes, dtypes and file sizes."""
    h = hashlib.sha256()
    for t in tasks:
        h.update(f"{t.name}:{list(t.shape)}:{t.dtype}\n".encode())
    for f in sorted(set(ckpt.files.values())):
        h.update(f"{f}:{(folder / f).stat().st_size}\n".encode())
    return h.hexdigest()


def prepare(out: Path, key: dict, shards: list[OutputFile], force: bool) -> tuple[dict[str, dict], dict[str, dict]]:
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


def check_space(out: Path, need: int) -> None:
    free = shutil.disk_usage(out).free
    if need > free:
        raise DsqError(f"{out}: the output needs {size(need)} more and only {size(free)} is free; free space "
                       "or choose another folder")
