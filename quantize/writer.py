"""Sharded, atomic safetensors output written tensor by tensor (never a whole shard in memory).

Every output tensor's dtype and shape are known before any weight is read, so each shard's header and the
offset of each tensor are fixed up front: a shard is the header, then its tensors at those offsets, each
written (in any order, in row blocks if need be) with pwrite into `<name>.dsq-tmp`, which is renamed to its
final name only once every byte is written and synced. Tensors are laid out by decreasing element size
(as safetensors' own writer does), so every tensor is aligned to its element size.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dsq.checkpoint import DTYPES
from dsq.errors import DsqError
from dsq.quantize.scheme import Out, Task

ST_DTYPES = {v: k for k, v in DTYPES.items()}
TMP = ".dsq-tmp"  # every file dsq writes has this suffix until it is whole


@dataclass
class OutputFile:
    """One output file: the source tensors it holds and the byte layout of their outputs."""

    name: str
    tasks: list[Task]
    header: bytes = b""
    offsets: dict[str, int] = field(default_factory=dict)  # output tensor -> absolute file offset
    size: int = 0  # bytes of the whole file

    def layout(self) -> None:
        outs: list[Out] = [o for t in self.tasks for o in t.outs]
        order = sorted(range(len(outs)), key=lambda i: (-outs[i].dtype.itemsize, i))
        meta: dict[str, dict] = {"__metadata__": {"format": "pt"}}  # type: ignore[dict-item]
        pos = 0
        rel = {}
        for i in order:
            o = outs[i]
            meta[o.name] = {"dtype": ST_DTYPES[o.dtype], "shape": list(o.shape), "data_offsets": [pos, pos + o.nbytes]}
            rel[o.name] = pos
            pos += o.nbytes
        text = json.dumps(meta, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self.header = len(text).to_bytes(8, "little") + text
        self.offsets = {name: len(self.header) + p for name, p in rel.items()}
        self.size = len(self.header) + pos

    @property
    def nbytes_in(self) -> int:
        return sum(t.nbytes for t in self.tasks)


def layout_files(tasks: list[Task], shard_size: int) -> list[OutputFile]:
    """Greedy, in the given (deterministic) order: a source tensor's outputs never straddle two shards."""
    groups: list[list[Task]] = [[]]
    used = 0
    for t in tasks:
        if groups[-1] and used + t.out_nbytes > shard_size:
            groups.append([])
            used = 0
        groups[-1].append(t)
        used += t.out_nbytes
    n = len(groups)
    shards = [OutputFile(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]
    for s in shards:
        s.layout()
    return shards


class OutputWriter:
    """Writes one shard to `<final>.dsq-tmp` (from several threads at once: each write has its own offset);
    `commit()` syncs it, renames it into place and returns its sha256. An error inside the `with` block,
    or a failed commit, deletes the temporary file.

    The hash is of the file as committed, re-read through the descriptor that wrote it (so of these bytes,
    whatever else happens to the path): blocks are written out of order, from several threads, so there is no
    stream to hash while writing, and a re-read also catches a write the file system did not keep."""

    def __init__(self, folder: Path, shard: OutputFile):
        self.shard = shard
        self.final = folder / shard.name
        self.tmp = folder / f"{shard.name}{TMP}"
        self.written = 0
        self.lock = threading.Lock()
        self.fd = -1

    def __enter__(self) -> OutputWriter:
        self.fd = self._io(lambda: os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644))
        try:
            self._io(lambda: os.pwrite(self.fd, self.shard.header, 0))
            self._io(lambda: os.ftruncate(self.fd, self.shard.size))
        except BaseException:
            self.abort()
            raise
        return self

    def __exit__(self, exc_type: type | None, *_: object) -> None:
        if exc_type is not None:
            self.abort()

    def write(self, out: str, t: torch.Tensor, first_row: int = 0) -> None:
        """Write `t` as rows [first_row, first_row + len(t)) of output tensor `out` (all of it by default)."""
        # flat before the byte view: a contiguous [n, 1] tensor may keep a last stride other than 1
        data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        row_bytes = data.nbytes // t.shape[0] if t.dim() > 1 else 0
        offset = self.shard.offsets[out] + first_row * row_bytes
        view = memoryview(data)
        while view.nbytes:
            n = self._io(lambda v=view, o=offset: os.pwrite(self.fd, v, o))
            view, offset = view[n:], offset + n
            with self.lock:
                self.written += n

    def commit(self) -> str:
        try:
            expected = self.shard.size - len(self.shard.header)
            if self.written != expected:  # a bug, not bad input: never let a shard with holes through
                raise RuntimeError(f"{self.tmp}: wrote {self.written} of {expected} data bytes")
            self._io(lambda: os.fsync(self.fd))
            digest = self._io(lambda: _sha256_fd(self.fd))
            os.close(self.fd)
            self.fd = -1
            self._io(lambda: os.replace(self.tmp, self.final))
            fsync_dir(self.final.parent)
            return digest
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.tmp.unlink(missing_ok=True)

    def _io(self, fn):
        try:
            return fn()
        except OSError as e:
            raise DsqError(f"{self.tmp}: write failed ({e.strerror or e}); free disk space or fix the folder, "
                           "then run the same command again to resume") from None


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _sha256_fd(fd: int) -> str:
    h, pos = hashlib.sha256(), 0
    while chunk := os.pread(fd, 1 << 24, pos):
        h.update(chunk)
        pos += len(chunk)
    return h.hexdigest()


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write to a temporary name, sync, rename: `path` is either absent, old, or whole."""
    tmp = path.with_name(f"{path.name}{TMP}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DsqError(f"{path}: write failed ({e.strerror or e}); free disk space or fix the folder, "
                       "then run the same command again to resume") from None
