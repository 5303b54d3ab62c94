"""Reading the source tensors for `dsq quantize`: pread into fresh buffers, a reader thread ahead of the maths.

Seam: `Source` finds each tensor's file and byte range from the safetensors headers; once `Checkpoint`
gives parsed per-tensor entries (file, dtype, shape, byte range), `Source.__init__` reads them from there.
"""

from __future__ import annotations

import json
import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from dsq.checkpoint import Checkpoint, check_finite
from dsq.errors import DsqError
from dsq.quantize.scheme import Task

PREFETCH_BYTES = 256 << 20  # read at most this far ahead (always at least one tensor)


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
