"""Reading the source tensors for `dsq quantize`: pread into fresh buffers, a reader thread ahead of the maths.
Each tensor's file and byte range come from `Checkpoint.entries` (its checked safetensors headers)."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator

import torch

from dsq.checkpoint import Checkpoint, check_finite
from dsq.config import Config
from dsq.errors import DsqError
from dsq.loader import hf_tensors, refuse_names
from dsq.quantize.scheme import Task

PREFETCH_BYTES = 256 << 20  # read at most this far ahead (always at least one tensor)
FLOATS = ("BF16", "F16", "F32")


def check_tensors(cfg: Config, ckpt: Checkpoint) -> None:
    """The source holds exactly the tensors of an unquantized checkpoint of its config, at their shapes and in
    a float dtype (the loader's own list, `hf_tensors`), so quantize never writes an output the loader refuses.
    The messages are the loader's."""
    want = hf_tensors(cfg)
    for name in ckpt.files:
        if name in want and ckpt.shape(name) != list(want[name]):
            raise DsqError(f"{ckpt.folder}: tensor {name} has shape {ckpt.shape(name)}, the config implies "
                           f"{list(want[name])}")
        if ckpt.dtype(name) not in FLOATS:
            raise DsqError(f"{ckpt.folder}: tensor {name} has dtype {ckpt.dtype(name)}; dsq quantize reads "
                           "BF16/FP16/FP32 checkpoints")
    optional = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    refuse_names(ckpt.folder, [n for n in want if n not in ckpt.files and n not in optional],
                 [n for n in ckpt.files if n not in want])


class Source:
    """Reads source tensors with pread into fresh buffers. (safetensors' reader maps the file, and every page
    read through a map stays in the process's RSS for as long as the file is open: a whole 8 GB shard.)"""

    def __init__(self, ckpt: Checkpoint):
        self.entries = ckpt.entries

    def get(self, task: Task) -> torch.Tensor:
        """One tensor, checked for NaN and Inf when it is floating point (aminmax: one fast pass)."""
        entry = self.entries[task.name]
        path, start, end = entry.file, entry.start, entry.end
        buf = torch.empty(end - start, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        try:
            with open(path, "rb", buffering=0) as f:
                while view.nbytes:
                    n = os.preadv(f.fileno(), [view], start)
                    if n == 0:
                        raise DsqError(f"{path}: tensor {task.name} is cut short; the file is truncated (or was "
                                       "changed during the run): restore it, then run the same command to resume")
                    view, start = view[n:], start + n
        except OSError as e:  # deleted, moved or unreadable since the run was planned
            raise DsqError(f"{path}: cannot read tensor {task.name} ({e.strerror or e}); the source changed "
                           "during the run: restore it, then run the same command to resume") from None
        t = buf.view(task.dtype).view(task.shape)
        check_finite(t, path, task.name)
        return t


def prefetch(source: Source, tasks: list[Task]) -> Iterator[tuple[Task, torch.Tensor]]:
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
