"""Resuming `dsq quantize`: `.dsq-progress.json` in OUT records each finished output file's sha256, its
tensors' errors, and the stamp (size, mtime_ns, inode) of every source file. A re-run with the same source
tensors and options keeps each file whose hash still matches and whose source files are unchanged, and
redoes the rest; anything else in OUT is refused unless --force.

Stamps, not a content hash: hashing a 470 GB source on every resume would cost as long as reading it once,
and a re-download, an edit or a replacement changes the size, the mtime or the inode (mtime_ns is as fine as
the file system's clock, so an edit within the same tick would be missed: a trade, said here plainly)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import dsq
from dsq.checkpoint import Checkpoint
from dsq.errors import DsqError
from dsq.inspect import size
from dsq.loader import PROGRESS, unfinished_command
from dsq.quantize.lock import LOCK
from dsq.quantize.scheme import Task
from dsq.quantize.writer import TMP, OutputFile, sha256

MANIFEST = "dsq_manifest.json"
INDEX = "model.safetensors.index.json"
OURS = ("*.safetensors", f"*{TMP}", INDEX, MANIFEST, PROGRESS, "config.json")  # what --force removes


def fingerprint(tasks: list[Task]) -> str:
    """What the plan depends on: tensor names, shapes and dtypes (the bytes are the stamps' business)."""
    h = hashlib.sha256()
    for t in tasks:
        h.update(f"{t.name}:{list(t.shape)}:{t.dtype}\n".encode())
    return h.hexdigest()


def stamps(ckpt: Checkpoint) -> dict[str, list[int]]:
    """Source file -> [size, mtime_ns, inode]."""
    out = {}
    for f in sorted(set(ckpt.files.values())):
        try:
            st = os.stat(ckpt.folder / f)
        except OSError as e:
            raise DsqError(f"{ckpt.folder / f}: cannot read ({e.strerror}); the source changed during the run: "
                           "restore it, then run the same command to resume") from None
        out[f] = [st.st_size, st.st_mtime_ns, st.st_ino]
    return out


def reads(ckpt: Checkpoint, shard: OutputFile) -> set[str]:
    """The source files an output file is made from."""
    return {ckpt.files[t.name] for t in shard.tasks}


def check_unchanged(ckpt: Checkpoint, shard: OutputFile, recorded: dict[str, list[int]]) -> None:
    """Refuse to commit an output file whose source files changed while it was made."""
    now = stamps(ckpt)
    for f in sorted(reads(ckpt, shard)):
        if now[f] != recorded[f]:
            raise DsqError(f"{ckpt.folder / f}: changed during the run (size, mtime or inode); {shard.name} was "
                           "not kept: run the same command again to redo it from the new file")


def prepare(out: Path, key: dict, shards: list[OutputFile], ckpt: Checkpoint, sources: dict[str, list[int]],
            force: bool) -> tuple[dict[str, dict], dict[str, dict], bool]:
    """Make OUT (an existing folder, locked by this run) ready; return the shards already finished there
    (matching hash, unchanged source files), their tensors' records, and whether OUT holds a finished run."""
    state, finished_run = None, False
    for name in (PROGRESS, MANIFEST):
        if (out / name).is_file():
            try:
                state = json.loads((out / name).read_text())
                finished_run = name == MANIFEST
                break
            except (OSError, UnicodeDecodeError, ValueError):
                pass
    if not isinstance(state, dict):
        state = None
    if any(p.name != LOCK for p in out.iterdir()):
        ours = state is not None and all(state.get(k) == v for k, v in key.items())
        if not ours:
            if not force:
                what = "is not a dsq output" if state is None else "holds a dsq output of another source or options"
                command = None if finished_run else unfinished_command(out)
                if command:
                    what = f"holds an unfinished run of another source or options, which `{command}` finishes"
                raise DsqError(f"{out}: exists and {what}; choose another folder, or pass --force to replace "
                               "its weights")
            for pattern in OURS:
                for p in out.glob(pattern):
                    _remove(p)
            state = None
    for p in out.glob(f"*{TMP}"):
        _remove(p)
    done: dict[str, dict] = {}
    tensors: dict[str, dict] = {}
    if state is not None and state.get("dsq_version") == dsq.__version__:
        finished = state.get("done", state.get("shards", {}))
        recorded, before = state.get("tensors", {}), state.get("source_files", {})
        for s in shards:
            info = finished.get(s.name)
            if (info and all(t.name in recorded for t in s.tasks) and (out / s.name).is_file()
                    and all(before.get(f) == sources[f] for f in reads(ckpt, s))
                    and sha256(out / s.name) == info["sha256"]):
                done[s.name] = info
                tensors.update((t.name, recorded[t.name]) for t in s.tasks)
    return done, tensors, finished_run and len(done) == len(shards)


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except OSError as e:
        raise DsqError(f"{path}: cannot remove ({e.strerror}); choose a writable output folder") from None


def check_space(out: Path, need: int) -> None:
    free = shutil.disk_usage(out).free
    if need > free:
        raise DsqError(f"{out}: the output needs {size(need)} more and only {size(free)} is free; free space "
                       "or choose another folder")
