"""`dsq quantize SRC OUT`: the command line of the offline quantizer (dsq.quantize.run does the work)."""

from __future__ import annotations

import re
import signal
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from dsq.errors import DsqError

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
         "GIB": 2**30, "TIB": 2**40}


class Terminated(KeyboardInterrupt):
    """SIGTERM (from `timeout`, a job scheduler, `kill`), taken as Ctrl-C is: the finished shards are kept, the
    lock and the partial shard go, and the user is told how to resume."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def parse_size(text: str) -> int:
    """'5GB', '500MB', '1.5GiB' or a byte count -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m[2].upper() not in UNITS or float(m[1]) * UNITS[m[2].upper()] < 1:
        raise DsqError(f"--shard-size {text!r}: give a positive size such as 5GB, 500MB or 2GiB")
    return int(float(m[1]) * UNITS[m[2].upper()])


def quantize(
    src: Annotated[str, typer.Argument(help="The BF16 checkpoint: a model folder or a Hub repo id (owner/name).")],
    out: Annotated[Path, typer.Argument(help="The output folder (created; resumed if it holds an unfinished run).")],
    experts: Annotated[str, typer.Option(help="Routed experts: int4, fp8 or bf16.")] = "int4",
    shared: Annotated[str, typer.Option(help="Shared experts: fp8 or bf16.")] = "fp8",
    dense: Annotated[str, typer.Option(help="MLP of the dense (first) layers: fp8 or bf16.")] = "fp8",
    attention: Annotated[str, typer.Option(help="Attention projections: fp8 or bf16.")] = "fp8",
    lm_head: Annotated[str, typer.Option(help="Output head: bf16 or fp8.")] = "bf16",
    group_size: Annotated[int, typer.Option(help="INT4 group size along the input: 32, 64 or 128.")] = 128,
    asymmetric: Annotated[bool, typer.Option("--asymmetric", help="INT4 with zero points.")] = False,
    clip_search: Annotated[bool, typer.Option(help="INT4: per-group MSE-optimal clipping (else plain "
                                                   "round-to-nearest over the full range).")] = True,
    fp8_scales: Annotated[str, typer.Option(help="FP8 weight scales: channel (one per output row) or "
                                                 "block (128x128).")] = "channel",
    keep_dtype: Annotated[bool, typer.Option("--keep-dtype", help="Keep fp32 unquantized tensors fp32 "
                                                                  "(default: cast them to bf16).")] = False,
    shard_size: Annotated[str, typer.Option(help="Largest output shard, e.g. 5GB, 500MB.")] = "5GB",
    device: Annotated[str, typer.Option(help="Where to quantize: cpu, cuda or cuda:N.")] = "cpu",
    revision: Annotated[Optional[str], typer.Option(help="Hub revision of SRC.")] = None,  # noqa: UP045
    force: Annotated[bool, typer.Option("--force", help="Replace the weights in an existing OUT that is not "
                                                        "a dsq output of the same source and options.")] = False,
) -> None:
    """Quantize a DeepSeek-V2 checkpoint: FP8 W8A8 attention / dense / shared experts, INT4 routed experts,
    written as a Hugging Face folder in the compressed-tensors format. dsq loads every option, transformers and
    vLLM the defaults; it warns, after the report, about options that keep one of them out."""
    from dsq.quantize.run import quantize as run
    from dsq.quantize.scheme import Options, reader_warnings

    if fp8_scales not in ("channel", "block"):
        raise DsqError(f"--fp8-scales {fp8_scales!r}: not one of channel, block")
    if asymmetric and experts != "int4":  # zero points exist only in the INT4 format
        raise DsqError(f"--asymmetric: applies to INT4 experts only, not --experts {experts}; drop it or use "
                       "--experts int4")
    opts = Options(experts=experts, shared=shared, dense=dense, attention=attention, head=lm_head,
                   group_size=group_size, symmetric=not asymmetric, clip_search=clip_search,
                   fp8_block=fp8_scales == "block", keep_dtype=keep_dtype)
    console = Console()
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        report = run(src, out, opts, revision=revision, shard_size=parse_size(shard_size), device=device,
                     force=force, console=console)
    except KeyboardInterrupt as e:  # every finished shard is kept: the same command picks up from there
        what = "terminated" if isinstance(e, Terminated) else "interrupted"
        Console(stderr=True).print(f"[yellow]{what}:[/] the finished shards in {out} are kept; run the same "
                                   "command again to resume", soft_wrap=True, highlight=False)
        raise typer.Exit(128 + signal.SIGTERM if isinstance(e, Terminated) else 130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    console.print(report.table())
    for warning in reader_warnings(opts):
        console.print(f"[yellow]warning:[/] {warning}", soft_wrap=True, highlight=False)
