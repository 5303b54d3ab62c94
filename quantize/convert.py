"""The conversion of one source tensor into its output file: row blocks in parallel, each quantized by its
storage format (dsq.formats) and written straight to its place; returns the tensor's error record."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor, wait

import torch

from dsq.quant import BLOCK
from dsq.quantize.scheme import Options, Task
from dsq.quantize.writer import OutputWriter

BLOCK_ELEMENTS = 1 << 18  # a row block quantized by one CPU core (1 MB of fp32): its buffers stay in cache
BLOCK_ELEMENTS_GPU = 1 << 24  # on a GPU, blocks large enough to hide launch overhead
SHORT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def convert_tensor(task: Task, w: torch.Tensor, writer: OutputWriter, dev: torch.device, opts: Options,
                   pool: ThreadPoolExecutor) -> dict:
    """Quantize (or cast) one tensor into its output file, row blocks in parallel; return its error record."""
    fmt = task.fmt
    info = {"role": task.role, "format": fmt.name if fmt else SHORT.get(task.outs[0].dtype, str(task.outs[0].dtype)
            .removeprefix("torch.")), "bytes_in": task.nbytes, "bytes_out": task.out_nbytes}
    if w.dim() == 2:
        unit = math.lcm(BLOCK, fmt.split_unit(0)[0] if fmt else 1)  # whole scale blocks and packed words
        budget = BLOCK_ELEMENTS if dev.type == "cpu" else BLOCK_ELEMENTS_GPU
        rows = max(unit, budget // w.shape[1] // unit * unit)
        jobs = [pool.submit(_convert_rows, task, w[r0:r0 + rows], r0, writer, dev, opts)
                for r0 in range(0, w.shape[0], rows)]
    else:
        jobs = [pool.submit(_convert_rows, task, w, 0, writer, dev, opts)]
    try:
        sums = [j.result() for j in jobs]
    finally:  # never leave a block writing into a file that is being abandoned
        for j in jobs:
            j.cancel()
        wait(jobs)
    if fmt is not None:  # the tensors that are not row slices of the weight (INT4's weight_shape)
        for out, stored in zip(task.outs, fmt.spec(*task.shape, task.dtype).values(), strict=True):
            if stored.unit is None:
                writer.write(out.name, torch.tensor(task.shape, dtype=torch.int64))
    if sums[0] is None:
        return info | _errors(None, None)
    return info | _errors(sum(e for e, _ in sums), sum(n for _, n in sums))


def _convert_rows(task: Task, w: torch.Tensor, r0: int, writer: OutputWriter, dev: torch.device,
                  opts: Options) -> tuple[float, float] | None:
    """Rows [r0, r0 + len(w)) of one tensor: convert, write, and return (squared error, squared norm)."""
    w = w.to(dev)
    if task.fmt is None:
        out = task.outs[0]
        cast = w.to(out.dtype)
        writer.write(out.name, cast, r0)
        if not w.is_floating_point() or out.dtype == w.dtype:
            return None
        f = w.float()
        return torch.linalg.vector_norm(cast.float() - f).item() ** 2, torch.linalg.vector_norm(f).item() ** 2
    q = task.fmt.quantize(w, opts.clip_search)
    for out, (name, stored) in zip(task.outs, task.fmt.spec(*task.shape, task.dtype).items(), strict=True):
        if stored.unit is not None:  # a row slice: stored row r holds weight rows [r * unit, (r + 1) * unit)
            writer.write(out.name, q.tensors[name], r0 // stored.unit[0])
    return q.err2, q.norm2


def _errors(err2: float | None, norm2: float | None) -> dict:
    """Relative Frobenius error and SQNR (dB); None where there is no error to speak of."""
    if err2 is None or norm2 is None:
        return {"rel_err": None, "sqnr_db": None}
    rel = math.sqrt(err2 / norm2) if norm2 > 0 else 0.0
    return {"rel_err": rel, "sqnr_db": 10 * math.log10(norm2 / err2) if err2 > 0 and norm2 > 0 else None}
