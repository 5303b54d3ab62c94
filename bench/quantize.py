"""Throughput (MB/s of BF16 source) and peak RSS of `dsq quantize` on a synthetic checkpoint with real
DeepSeek-V2-Lite layer shapes (one dense layer, two MoE layers of 64 experts, the 102400-token embedding
and head: 3.3 GB), on the CPU and, when CUDA is there, on the GPU. Each run is its own process, so its peak
RSS (VmHWM) is its own. Also times the per-tensor maths alone on one expert weight, which says what bounds the CPU
path. A measurement for docs/benchmarks.md, not a test.

    python bench/quantize.py [--out DIR] [--layers 3] [--experts 64] [--keep]
    python bench/quantize.py --sqnr    # what the INT4 clip search gains, for docs/quantization.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import report
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

CHILD = """import json, re, resource, sys, time
from rich.console import Console
from dsq.quantize.run import quantize
from dsq.quantize.scheme import Options
src, out, device, search = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
t0 = time.perf_counter()
report = quantize(src, out, Options(clip_search=search), device=device, console=Console(stderr=True))
seconds = time.perf_counter() - t0
use = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"seconds": seconds, "bytes": report.bytes_done, "cpu_seconds": use.ru_utime + use.ru_stime,
                  "peak_rss": int(re.search(r"VmHWM:\\s*(\\d+)", open("/proc/self/status").read())[1]) * 1024,
                  "out_bytes": sum(r["out"] for r in report.roles.values())}))
"""


def run_case(src: Path, out: Path, device: str, search: bool) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out), device, str(int(search))],
                          capture_output=True, text=True, check=True)
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    return dict(r, device=device, clip_search=search, mb_per_s=r["bytes"] / r["seconds"] / 1e6,
                mb_per_cpu_s=r["bytes"] / r["cpu_seconds"] / 1e6)


def maths_only(device: str) -> dict[str, float]:
    """MB/s of the per-tensor maths alone (no I/O) on V2-Lite's expert and dense shapes, run as the pipeline
    runs it: on the CPU, 128-row blocks over one thread per core, each with one intra-op thread."""
    from dsq.quant import fp8_quantize_weight, int4_pack, int4_search

    threads = torch.get_num_threads()

    def rate(fn, w: torch.Tensor) -> float:
        def once() -> None:
            if device == "cuda":
                fn(w)
                return
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(lambda r0: fn(w[r0:r0 + 128]), range(0, w.shape[0], 128)))

        once()
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            once()
        if device == "cuda":
            torch.cuda.synchronize()
        return 5 * w.numel() * 2 / (time.perf_counter() - t0) / 1e6

    gen = torch.Generator().manual_seed(0)
    expert = (torch.randn(1408, 2048, generator=gen) * 0.02).to(torch.bfloat16).to(device)
    dense = (torch.randn(2048, 10944, generator=gen) * 0.02).to(torch.bfloat16).to(device)
    if device == "cpu":
        torch.set_num_threads(1)
    try:
        return {
            "int4_clip_search": rate(lambda w: int4_pack(int4_search(w).q), expert),
            "int4_round_to_nearest": rate(lambda w: int4_pack(int4_search(w, grid=(1.0,)).q), expert),
            "fp8_channel": rate(lambda w: fp8_quantize_weight(w), dense),
        }
    finally:
        torch.set_num_threads(threads)


def sqnr_table() -> list[str]:
    """SQNR (dB) of INT4 round-to-nearest vs the clip search, on the routed experts' real shapes with
    synthetic weights of four tail weights (real LLM weights sit between Gaussian and Student-t(3))."""
    from dsq.quant import GRID, int4_search

    gen = torch.Generator().manual_seed(0)
    tails = {"Gaussian": lambda n: torch.randn(n, generator=gen),
             "Laplace": lambda n: torch.randn(n, generator=gen) * torch.empty(n).exponential_(generator=gen).sqrt(),
             "Student-t(5)": lambda n: student_t(n, 5.0, gen), "Student-t(3)": lambda n: student_t(n, 3.0, gen)}
    shapes = {"V2-Lite gate/up 1408x2048": (1408, 2048), "V2-Lite down 2048x1408": (2048, 1408),
              "V2 gate/up 1536x5120": (1536, 5120), "V2 down 5120x1536": (5120, 1536)}
    schemes = {"RTN g128": dict(grid=(1.0,)), "search g128": {}, "search g128 asym": dict(symmetric=False),
               "search g64": dict(group=64), "search g32": dict(group=32)}
    lines = [f"| weights | shape | {' | '.join(schemes)} |", "| --- | --- |" + " --- |" * len(schemes)]
    for tail, draw in tails.items():
        for label, shape in shapes.items():
            w = (draw(shape[0] * shape[1]).view(shape) * 0.02).to(torch.bfloat16)
            cells = []
            for kw in schemes.values():
                r = int4_search(w, **kw)
                cells.append(f"{10 * math.log10(r.norm2 / r.err2):.2f}")
            lines.append(f"| {tail} | {label} | {' | '.join(cells)} |")
    lines.append(f"\nClip grid: {', '.join(map(str, GRID))}.")
    return lines


def student_t(n: int, df: float, gen: torch.Generator) -> torch.Tensor:
    chi2 = torch.distributions.Chi2(df).sample((n,))
    return torch.randn(n, generator=gen) / (chi2 / df).sqrt()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    report.add_out(ap)
    ap.add_argument("--layers", type=int, default=3, help="1 dense + (layers - 1) MoE layers")
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint and outputs")
    ap.add_argument("--sqnr", action="store_true", help="only print what the clip search gains (SQNR table)")
    args = ap.parse_args()
    if args.sqnr:
        print("\n".join(sqnr_table()))
        return
    from helpers_quant import write_synthetic

    from dsq.quant import GRID

    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "quantize-work"
    src = work / "src"
    if not (src / "config.json").exists():
        write_synthetic(src, layers=args.layers, experts=args.experts, shard_bytes=1 << 30)
    size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    load0 = os.getloadavg()[0]
    runs = []
    for device in devices:
        for search in (True, False):
            runs.append(run_case(src, work / f"out-{device}-{int(search)}", device, search))
            print(json.dumps(runs[-1]), flush=True)
    result = {
        **report.stamp(), "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_avg_1m_start": load0,
        "load_avg_1m": os.getloadavg()[0],
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "checkpoint": {"bytes": size, "layers": args.layers, "experts": args.experts},
        "runs": runs, "maths_only_mb_per_s": {d: maths_only(d) for d in devices},
    }
    lines = [f"# dsq quantize: {result['date']}, commit {result['commit']}, {result['cpus']} CPUs"
             + (f", {result['gpu']}" if result["gpu"] else ""),
             "", f"Synthetic V2-Lite slice: {args.layers} layers ({args.experts} experts), {size / 1e9:.2f} GB BF16; "
             f"1-minute load average at the start {load0:.1f}, at the end {result['load_avg_1m']:.1f} (a shared "
             "machine is slower than its cores; MB per CPU-second times the cores bounds an idle one).", "",
             "| device | clip search | MB/s of BF16 source | seconds | MB per CPU-second | peak RSS | output |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        lines.append(f"| {r['device']} | {'on' if r['clip_search'] else 'off'} | {r['mb_per_s']:.0f} | "
                     f"{r['seconds']:.1f} | {r['mb_per_cpu_s']:.0f} | {r['peak_rss'] / 1e9:.2f} GB | "
                     f"{r['out_bytes'] / 1e9:.2f} GB |")
    lines += ["", "Maths alone (MB/s of BF16, one tensor in memory, no I/O):", "",
              f"| device | INT4 + {len(GRID)}-ratio clip search | INT4 round-to-nearest | FP8 per channel |",
              "| --- | --- | --- | --- |"]
    for d, m in result["maths_only_mb_per_s"].items():
        lines.append(f"| {d} | {m['int4_clip_search']:.0f} | {m['int4_round_to_nearest']:.0f} | "
                     f"{m['fp8_channel']:.0f} |")
    report.save(args.out, "quantize", result, "\n".join(lines))
    print("\n".join(lines))
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
