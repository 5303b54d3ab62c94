"""GEMM and fused-MoE kernel benchmark (issue 4), on CUDA only.

    python bench/kernels.py [--out DIR] [--quick] [--budget SECONDS] [--sweep]

Convention for every bench/*.py script: `--out DIR` (default $OUT, else ./bench-out) receives <name>.json
(every measurement) and <name>.md (tables); `--quick` runs a reduced set; without CUDA the script prints
one line and exits 0. bench/gpu_check.sh runs them all.

GEMMs: for the V2-Lite and V2 attention, dense, shared-expert and routed-expert projections at M in
{1, ..., 8192}: dsq's FP8 W8A8 GEMM (channel and 128x128 block scales, activation quantization included),
its GEMM alone on pre-quantized activations against torch._scaled_mm (row-wise scales), dsq's INT4 W4A16
GEMM (group 128, 64 where K needs it), bf16 cuBLAS (F.linear) and bitsandbytes NF4 where it imports.
Fused MoE: V2-Lite and V2 routed experts (INT4 g128 and FP8) at batch 1 (decode path) and 64 (grouped path)
against a bf16 torch loop over experts.
Router: V2-Lite's and V2's, route with the logits in its kernel against route after a torch GEMM (its path
above FUSED_MAX_TOKENS), at M in {1, 8, 64, 512}: the data to set that threshold, or to split the weight.

--sweep runs only a tile sweep at M in {1, 16} (FP8 and INT4 configs against the heuristics' picks) and
writes kernels_sweep.json / .md: the data to retune fp8_config and int4_config.

Timing: a call is captured `reps` times into a CUDA graph (no Python launch cost in the number), the graph
is replayed and timed with CUDA events, and the median per call is kept. The calls rotate over enough
weight copies (and, for MoE, routings) to exceed the L2 cache, so weights stream from HBM as in a model
forward. GB/s counts the bytes a kernel must move (weights + scales + activations in + output out);
"HBM %" is that over 4.8 TB/s.
"""

from __future__ import annotations

import argparse
import functools
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable

import report
import torch
import torch.nn.functional as F
import triton

from dsq.kernels import GemmConfig, act_quant, fp8_gemm, fp8_gemm_q, fused_moe, int4_gemm, route
from dsq.kernels import router as router_mod
from dsq.quant import fp8_quantize_weight, int4_quantize

HBM = 4.8e12  # H200 HBM3e bytes/s
ROTATE_BYTES = 256 << 20  # weight bytes cycled through per measurement: several times the L2
DEV = "cuda"

SHAPES = [  # model, projection, N (out), K (in)
    ("V2-Lite", "q_proj", 3072, 2048),
    ("V2-Lite", "kv_a_proj", 576, 2048),
    ("V2-Lite", "kv_b_proj", 4096, 512),
    ("V2-Lite", "o_proj", 2048, 2048),
    ("V2-Lite", "dense gate/up", 10944, 2048),
    ("V2-Lite", "dense down", 2048, 10944),
    ("V2-Lite", "shared gate/up", 2816, 2048),
    ("V2-Lite", "shared down", 2048, 2816),
    ("V2-Lite", "expert gate/up", 1408, 2048),
    ("V2-Lite", "expert down", 2048, 1408),
    ("V2", "q_a_proj", 1536, 5120),
    ("V2", "q_b_proj", 24576, 1536),
    ("V2", "kv_a_proj", 576, 5120),
    ("V2", "kv_b_proj", 32768, 512),
    ("V2", "o_proj", 5120, 16384),
    ("V2", "dense gate/up", 12288, 5120),
    ("V2", "dense down", 5120, 12288),
    ("V2", "shared gate/up", 3072, 5120),
    ("V2", "shared down", 5120, 3072),
    ("V2", "expert gate/up", 1536, 5120),
    ("V2", "expert down", 5120, 1536),
]
QUICK_SHAPES = {("V2-Lite", "q_proj"), ("V2-Lite", "dense down"), ("V2-Lite", "expert gate/up"),
                ("V2-Lite", "expert down"), ("V2", "q_b_proj")}
MS = [1, 2, 4, 8, 16, 32, 64, 128, 512, 2048, 8192]
QUICK_MS = [1, 16, 128, 2048]
MOE = [("V2-Lite", 64, 6, 2048, 1408), ("V2", 160, 6, 5120, 1536)]  # model, experts, top-k, hidden, inter
ROUTERS = [("V2-Lite", 64, 2048, 1, 1, 1.0), ("V2", 160, 5120, 8, 3, 16.0)]  # experts, hidden, groups, kept, scale


# --- timing ---------------------------------------------------------------------------------------------
def gpu_time(calls: list[Callable[[], object]], graph: bool = True) -> float:
    """Median seconds per call, cycling through `calls` (each one reads different weights)."""
    for c in calls[:2]:
        c()  # compile and warm up
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    calls[0]()
    end.record()
    end.synchronize()
    one = max(start.elapsed_time(end) * 1e-3, 2e-6)
    reps = max(int(min(max(3e-3 / one, 3), 256)), min(len(calls), 256))

    def run() -> None:
        for i in range(reps):
            calls[i % len(calls)]()

    if graph:
        try:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                run()
            run = g.replay
        except Exception:  # not capturable (host sync, bitsandbytes): time the eager loop
            torch.cuda.synchronize()
    times = []
    for _ in range(7):
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3 / reps)
    return statistics.median(times)


def copies(nbytes: int) -> int:
    """How many copies of a weight to rotate through so that the set exceeds the L2 cache."""
    return max(1, min(256, math.ceil(ROTATE_BYTES / max(nbytes, 1))))


def nbytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


# --- GEMMs ----------------------------------------------------------------------------------------------
def bnb_nf4() -> Callable | None:
    """(weight bf16) -> (quantized, call(x)) through bitsandbytes NF4, or None where it does not import."""
    try:
        import bitsandbytes as bnb
        from bitsandbytes.functional import quantize_4bit
    except Exception:
        return None

    def make(w: torch.Tensor) -> tuple[int, Callable[[torch.Tensor], torch.Tensor]]:
        q, state = quantize_4bit(w, quant_type="nf4")
        return w.numel() // 2 + w.numel() // 64 * 4, lambda x: bnb.matmul_4bit(x, q.t(), quant_state=state)

    return make


PLAN = {  # variant -> (call(weights, x, x_fp8, x_scales), activation bytes per element of x)
    "bf16": (lambda t, x, xq, xs: F.linear(x, t[0]), 2),
    "fp8": (lambda t, x, xq, xs: fp8_gemm(x, t[0], t[1]), 2),
    "fp8_block": (lambda t, x, xq, xs: fp8_gemm(x, t[0], t[1]), 2),
    "fp8_q": (lambda t, x, xq, xs: fp8_gemm_q(xq, xs, t[0], t[1]), 1),
    "scaled_mm": (lambda t, x, xq, xs: torch._scaled_mm(xq, t[0].t(), scale_a=xs, scale_b=t[1].view(1, -1),
                                                        out_dtype=torch.bfloat16), 1),
    "int4": (lambda t, x, xq, xs: int4_gemm(x, t[0], t[1]), 2),
}


def bench_shape(model: str, name: str, n: int, k: int, ms: list[int], nf4: Callable | None) -> list[dict]:
    w = torch.randn(n, k, device=DEV) / k**0.5
    wb = w.to(torch.bfloat16)
    q_ch, s_ch = fp8_quantize_weight(w)
    q_bl, s_bl = fp8_quantize_weight(w, block=True)
    group = 128 if k % 128 == 0 else 64
    i4 = int4_quantize(w, group)
    del w
    variants: dict[str, tuple[int, list]] = {}  # name -> (weight bytes, [weights per copy])

    def rotate(key: str, *ts: torch.Tensor) -> None:
        size = nbytes(*ts)
        variants[key] = (size, [ts] + [tuple(t.clone() for t in ts) for _ in range(copies(size) - 1)])

    rotate("bf16", wb)
    rotate("fp8", q_ch, s_ch)
    rotate("fp8_block", q_bl, s_bl)
    rotate("int4", i4["weight_packed"], i4["weight_scale"])
    nf4_calls = None
    if nf4 is not None:
        made = [nf4(wb) for _ in range(copies(n * k // 2))]
        nf4_calls = (made[0][0], [f for _, f in made])
    rows = []
    for m in ms:
        x = torch.randn(m, k, device=DEV).to(torch.bfloat16)
        xq, xs = act_quant(x)
        out_bytes = 2 * m * n
        for key, (fn, act_bytes) in PLAN.items():
            wbytes, sets = variants["fp8" if key in ("fp8_q", "scaled_mm") else key]
            try:
                sec = gpu_time([functools.partial(fn, t, x, xq, xs) for t in sets])
            except Exception as e:  # record and go on: one failing variant must not hide the others
                rows.append(dict(model=model, proj=name, n=n, k=k, m=m, variant=key, error=repr(e)[:300]))
                continue
            rows.append(_row(model, name, n, k, m, key, sec, wbytes + act_bytes * m * k + out_bytes))
        if nf4_calls is not None:
            try:
                sec = gpu_time([functools.partial(f, x) for f in nf4_calls[1]], graph=False)
                rows.append(_row(model, name, n, k, m, "nf4", sec, nf4_calls[0] + 2 * m * k + out_bytes))
            except Exception as e:
                rows.append(dict(model=model, proj=name, n=n, k=k, m=m, variant="nf4", error=repr(e)[:300]))
    return rows


def _row(model: str, proj: str, n: int, k: int, m: int, variant: str, sec: float, moved: int) -> dict:
    return dict(model=model, proj=proj, n=n, k=k, m=m, variant=variant, us=sec * 1e6,
                tflops=2 * m * n * k / sec / 1e12, gbps=moved / sec / 1e9, hbm=moved / sec / HBM)


# --- fused MoE ------------------------------------------------------------------------------------------
def random_experts(e: int, n: int, k: int, fmt: str) -> dict[str, torch.Tensor]:
    """Random stacked expert tensors in the on-disk formats (values do not matter for timing)."""
    if fmt == "int4":
        packed = torch.randint(-(2**31), 2**31 - 1, (e, n, k // 8), dtype=torch.int32, device=DEV)
        scale = (torch.rand(e, n, k // 128, device=DEV) * 0.01 + 1e-3).to(torch.bfloat16)
        return {"weight_packed": packed, "weight_scale": scale}
    w = (torch.randn(e, n, k, device=DEV) * 0.1).to(torch.float8_e4m3fn)
    return {"weight": w, "weight_scale": torch.rand(e, n, 1, device=DEV) * 0.01 + 1e-3}


def moe_bf16_loop(x: torch.Tensor, ids: torch.Tensor, tw: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                  w3: torch.Tensor) -> torch.Tensor:
    """The bf16 torch baseline: sort pairs by expert, then one gate/up/down per expert that has tokens."""
    k = ids.shape[1]
    flat = ids.flatten()
    order = torch.argsort(flat)
    counts = torch.bincount(flat, minlength=w1.shape[0]).tolist()
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        pairs = order[start:start + c]
        start += c
        xe = x[pairs // k]
        h = F.silu(F.linear(xe, w1[e])) * F.linear(xe, w3[e])
        out.index_add_(0, pairs // k, (F.linear(h, w2[e]) * tw.flatten()[pairs, None]).float())
    return out.to(x.dtype)


def bench_moe(model: str, e: int, top_k: int, hidden: int, inter: int, quick: bool) -> list[dict]:
    rows = []
    gen = torch.Generator(device=DEV).manual_seed(0)
    bf16 = None
    for fmt in ("int4",) if quick else ("int4", "fp8"):
        w1, w3 = random_experts(e, inter, hidden, fmt), random_experts(e, inter, hidden, fmt)
        w2 = random_experts(e, hidden, inter, fmt)
        per_expert = sum(nbytes(*d.values()) for d in (w1, w2, w3)) // e
        for m in (1, 64):
            x = torch.randn(m, hidden, device=DEV).to(torch.bfloat16)
            routings = [torch.rand(m, e, device=DEV, generator=gen).topk(top_k, dim=1).indices.to(torch.int32)
                        for _ in range(16)]  # rotate routings so that the touched experts are not in L2
            tw = torch.rand(m, top_k, device=DEV)
            touched = statistics.mean(len(set(r.flatten().tolist())) for r in routings)
            moved = touched * per_expert + 2 * m * hidden * 2
            calls = [functools.partial(fused_moe, x, r, tw, w1, w2, w3) for r in routings]
            for graph in (True, False):
                sec = gpu_time(calls, graph=graph)
                rows.append(dict(model=model, fmt=fmt, m=m, variant="dsq graph" if graph else "dsq eager",
                                 us=sec * 1e6, experts_touched=touched, gbps=moved / sec / 1e9,
                                 hbm=moved / sec / HBM))
            if fmt == "int4":
                if bf16 is None:
                    bf16 = [torch.randn(e, n, kk, device=DEV).to(torch.bfloat16) * 0.02
                            for n, kk in ((inter, hidden), (hidden, inter), (inter, hidden))]
                sec = gpu_time([functools.partial(moe_bf16_loop, x, r, tw, *bf16) for r in routings], graph=False)
                moved_bf16 = touched * 3 * inter * hidden * 2 + 2 * m * hidden * 2
                rows.append(dict(model=model, fmt="bf16", m=m, variant="torch loop (eager)", us=sec * 1e6,
                                 experts_touched=touched, gbps=moved_bf16 / sec / 1e9, hbm=moved_bf16 / sec / HBM))
    return rows


# --- router ---------------------------------------------------------------------------------------------
def bench_router(model: str, e: int, hidden: int, groups: int, kept: int, scale: float) -> list[dict]:
    """route at decode and prefill sizes, logits in the kernel ("fused") or by a torch GEMM first ("gemm");
    the fp32 weight (as dsq.model.Gate holds it) rotated past L2."""
    rows = []
    ws = [torch.randn(e, hidden, device=DEV) for _ in range(copies(e * hidden * 4))]
    fused_max = router_mod.FUSED_MAX_TOKENS
    for m in (1, 8, 64, 512):
        x = torch.randn(m, hidden, device=DEV).to(torch.bfloat16)
        for variant, limit in (("fused", max(m, fused_max)), ("gemm", 0)):
            router_mod.FUSED_MAX_TOKENS = limit
            try:
                sec = gpu_time([functools.partial(route, x, w, 6, groups, kept, False, scale) for w in ws])
            finally:
                router_mod.FUSED_MAX_TOKENS = fused_max
            moved = e * hidden * 4 + m * hidden * 2
            rows.append(dict(model=model, m=m, variant=variant, us=sec * 1e6, gbps=moved / sec / 1e9))
    return rows


# --- tile sweep (--sweep): data for retuning fp8_config / int4_config at decode sizes --------------------
SWEEP_SHAPES = [("V2-Lite", "q_proj", 3072, 2048), ("V2-Lite", "dense down", 2048, 10944),
                ("V2-Lite", "expert gate/up", 1408, 2048), ("V2", "q_b_proj", 24576, 1536)]


def tile_sweep(budget: float) -> list[dict]:
    """M in {1, 16}: each FP8 (channel) and INT4 (g128) tile config against the heuristic's pick."""
    rows, t0 = [], time.time()
    fp8_cfgs = [GemmConfig(16, bn, 128, split, 8, 4, stages)
                for bn in (16, 32, 64) for split in (1, 4) for stages in (3, 5)]
    int4_cfgs = [GemmConfig(16, bn, 128 * slices, split, 8, slices, 3)  # int4_dot: one warp per 128-column slice
                 for bn in (16, 32, 64) for split in (1, 4, 8) for slices in (1, 2, 4)]
    for model, name, n, k in SWEEP_SHAPES:
        if time.time() - t0 > budget:
            break
        w = torch.randn(n, k, device=DEV) / k**0.5
        q, s = fp8_quantize_weight(w)
        i4 = int4_quantize(w, 128)
        fp8_sets = [(q, s)] + [(q.clone(), s.clone()) for _ in range(copies(nbytes(q, s)) - 1)]
        i4_sets = [(i4["weight_packed"], i4["weight_scale"])]
        i4_sets += [tuple(t.clone() for t in i4_sets[0]) for _ in range(copies(nbytes(*i4_sets[0])) - 1)]
        for m in (1, 16):
            x = torch.randn(m, k, device=DEV).to(torch.bfloat16)
            plans = (("fp8", fp8_cfgs, fp8_sets, fp8_gemm), ("int4", int4_cfgs, i4_sets, int4_gemm))
            for kind, cfgs, sets, fn in plans:
                for cfg in [None, *cfgs]:
                    calls = [functools.partial(fn, x, *t, config=cfg) for t in sets]
                    try:
                        sec = gpu_time(calls)
                    except Exception as e:
                        rows.append(dict(model=model, proj=name, m=m, kind=kind, cfg=str(cfg), error=repr(e)[:200]))
                        continue
                    moved = nbytes(*sets[0]) + 2 * m * (k + n)
                    rows.append(dict(model=model, proj=name, n=n, k=k, m=m, kind=kind,
                                     cfg="heuristic" if cfg is None else str(cfg), us=sec * 1e6, hbm=moved / sec / HBM))
        print(f"sweep {model} {name} done at {time.time() - t0:.0f}s", flush=True)
    return rows


def sweep_markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# dsq tile sweep — {meta['gpu']}", "", f"{meta['date']}, commit {meta['commit']}", "",
             "| model | proj | M | kernel | heuristic us | best us | best config | best HBM % |", "|" + "---|" * 8]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if "us" in r:
            groups.setdefault((r["model"], r["proj"], r["m"], r["kind"]), []).append(r)
    for (model, proj, m, kind), rs in groups.items():
        best = min(rs, key=lambda r: r["us"])
        heur = next((r["us"] for r in rs if r["cfg"] == "heuristic"), float("nan"))
        lines.append(f"| {model} | {proj} | {m} | {kind} | {heur:.1f} | {best['us']:.1f} | {best['cfg']} | "
                     f"{100 * best['hbm']:.0f}% |")
    return "\n".join(lines) + "\n"


# --- report ---------------------------------------------------------------------------------------------
def _cell(r: dict | None, ref: dict | None = None, hbm: bool = False) -> str:
    """'time' or 'time (speed-up over ref[, HBM %])'."""
    if r is None:
        return "-"
    if ref is None:
        return f"{r['us']:.1f}"
    extra = f", {100 * r['hbm']:.0f}%" if hbm else ""
    return f"{r['us']:.1f} ({ref['us'] / r['us']:.2f}x{extra})"


def markdown(meta: dict, gemm: list[dict], moe: list[dict], router: list[dict]) -> str:
    lines = [f"# dsq kernel benchmark — {meta['gpu']}", "",
             f"{meta['date']}, commit {meta['commit']}, torch {meta['torch']}, triton {meta['triton']}; "
             f"HBM roofline {HBM / 1e12:.1f} TB/s; times are medians per call in us (CUDA graph, weights "
             "rotated past L2); (Nx) = speed-up of the dsq kernel over the baseline named in the header.", ""]
    lines += ["bitsandbytes does not import here: no NF4 column." if not meta["nf4"] else
              "nf4 (bitsandbytes) is timed as an eager loop, launch overhead included.", ""]
    by = {(r["model"], r["proj"], r["m"], r["variant"]): r for r in gemm if "us" in r}
    lines += ["## GEMMs", "",
              "| model | proj (N x K) | M | bf16 | fp8 (x bf16) | fp8 block (x bf16) | fp8 GEMM only "
              "(x scaled_mm) | int4 (x bf16, HBM %) | nf4 |", "|" + "---|" * 9]
    for model, proj, n, k, m in dict.fromkeys((r["model"], r["proj"], r["n"], r["k"], r["m"]) for r in gemm):
        g = {v: by.get((model, proj, m, v)) for v in ("bf16", "fp8", "fp8_block", "fp8_q", "scaled_mm",
                                                       "int4", "nf4")}
        lines.append(f"| {model} | {proj} ({n} x {k}) | {m} | {_cell(g['bf16'])} | {_cell(g['fp8'], g['bf16'])} | "
                     f"{_cell(g['fp8_block'], g['bf16'])} | {_cell(g['fp8_q'], g['scaled_mm'])} | "
                     f"{_cell(g['int4'], g['bf16'], hbm=True)} | {_cell(g['nf4'])} |")
    lines += ["", "## Targets (issue 4; reported, not asserted)", "", *targets(gemm)]
    if router:
        lines += ["", "## Router (fp32 weight; fused: logits in the kernel, gemm: torch GEMM, then the kernel)",
                  "", "| model | M | variant | us | GB/s |", "|" + "---|" * 5]
        lines += [f"| {r['model']} | {r['m']} | {r['variant']} | {r['us']:.1f} | {r['gbps']:.0f} |" for r in router]
    if moe:
        lines += ["", "## Fused MoE (routed experts only)", "",
                  "| model | weights | batch | variant | us | experts touched | GB/s | HBM % |", "|" + "---|" * 8]
        lines += [f"| {r['model']} | {r['fmt']} | {r['m']} | {r['variant']} | {r['us']:.1f} | "
                  f"{r['experts_touched']:.1f} | {r['gbps']:.0f} | {100 * r['hbm']:.0f}% |" for r in moe]
        lines.append("")
        for model in dict.fromkeys(r["model"] for r in moe):
            base = [r for r in moe if r["model"] == model and r["m"] == 64 and r["fmt"] == "bf16"]
            lines += [f"- {model} batch 64, int4 {r['variant']}: {base[0]['us'] / r['us']:.1f}x the bf16 torch loop "
                      "(target >= 2x)" for r in moe if base and r["model"] == model and r["m"] == 64
                      and r["fmt"] == "int4"]
            lines += [f"- {model} batch 1, int4 {r['variant']}: {100 * r['hbm']:.0f}% of HBM on the touched "
                      "experts' bytes (target >= 60%)" for r in moe
                      if r["model"] == model and r["m"] == 1 and r["fmt"] == "int4"]
    errors = [r for r in gemm if "error" in r]
    if errors:
        lines += ["", "## Errors", ""] + [f"- {r['model']} {r['proj']} M={r['m']} {r['variant']}: "
                                          f"`{r['error']}`" for r in errors]
    return "\n".join(lines) + "\n"


def targets(gemm: list[dict]) -> list[str]:
    """The issue's ratio targets, summarized over the shapes measured (reported, not asserted)."""
    by = {(r["model"], r["proj"], r["m"], r["variant"]): r for r in gemm if "us" in r}
    keys = {(r["model"], r["proj"], r["m"]) for r in gemm}
    out = []

    def ratios(variant: str, ref: str, ms: Callable[[int], bool]) -> list[float]:
        return [by[(*k, ref)]["us"] / by[(*k, variant)]["us"] for k in keys
                if ms(k[2]) and (*k, ref) in by and (*k, variant) in by]

    def summary(label: str, vals: list[float], goal: str) -> None:
        if vals:
            out.append(f"- {label}: min {min(vals):.2f}, median {statistics.median(vals):.2f}, "
                       f"max {max(vals):.2f} over {len(vals)} (target {goal})")

    summary("INT4 vs bf16 at M <= 16", ratios("int4", "bf16", lambda m: m <= 16), ">= 3.0x")
    hbm = [by[(*k, "int4")]["hbm"] for k in keys if k[2] <= 16 and (*k, "int4") in by]
    if hbm:
        out.append(f"- INT4 HBM fraction at M <= 16: min {min(hbm):.0%}, median {statistics.median(hbm):.0%} "
                   "(target >= 70%)")
    summary("FP8 (channel, incl. act quant) vs bf16 at M <= 16", ratios("fp8", "bf16", lambda m: m <= 16), ">= 1.7x")
    summary("FP8 GEMM vs torch._scaled_mm at M >= 2048", ratios("fp8_q", "scaled_mm", lambda m: m >= 2048),
            ">= 0.85x")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    report.add_out(ap)
    ap.add_argument("--quick", action="store_true", help="5 shapes, M in {1, 16, 128, 2048}, INT4 MoE for V2-Lite")
    ap.add_argument("--budget", type=float, default=200.0, help="seconds after which no new shape starts")
    ap.add_argument("--sweep", action="store_true", help="only the decode-size tile sweep -> kernels_sweep.*")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/kernels.py: no CUDA device here, nothing measured")
        sys.exit(0)
    nf4 = bnb_nf4()
    meta = dict(gpu=torch.cuda.get_device_name(), **report.stamp(), torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(), nf4=nf4 is not None, quick=args.quick)
    t0 = time.time()
    if args.sweep:
        rows = tile_sweep(args.budget)
        report.save(args.out, "kernels_sweep", dict(meta=meta, rows=rows), sweep_markdown(meta, rows))
        print(sweep_markdown(meta, rows))
        return
    moe: list[dict] = []
    gemm: list[dict] = []
    router: list[dict] = []

    def save() -> None:
        report.save(args.out, "kernels", dict(meta=meta, gemm=gemm, moe=moe, router=router),
                    markdown(meta, gemm, moe, router))

    for spec in ROUTERS[:1] if args.quick else ROUTERS:
        router += bench_router(*spec)
        print(f"router {spec[0]} done at {time.time() - t0:.0f}s", flush=True)
        save()

    for spec in MOE[:1] if args.quick else MOE:
        moe += bench_moe(*spec, quick=args.quick)
        print(f"moe {spec[0]} done at {time.time() - t0:.0f}s", flush=True)
        save()
    for model, name, n, k in SHAPES:
        if args.quick and (model, name) not in QUICK_SHAPES:
            continue
        if time.time() - t0 > args.budget:
            print(f"budget of {args.budget:.0f}s spent: skipping {model} {name} and the rest", flush=True)
            break
        gemm += bench_shape(model, name, n, k, QUICK_MS if args.quick else MS, nf4)
        torch.cuda.empty_cache()
        print(f"{model} {name} done at {time.time() - t0:.0f}s", flush=True)
        save()
    save()
    print(markdown(meta, gemm, moe, router))


if __name__ == "__main__":
    main()
