"""Decode-attention benchmark over the paged MLA latent cache (issue 5), on CUDA only.

    python bench/mla.py [--out DIR] [--quick]

First the absorbed projections around it (kernels/mla_absorb.py: q_nope W_UK with the q rope, and o_lat W_UV^T,
reading kv_b's FP8 weight as stored) at V2-Lite's and V2's heads, batch 1/8/64, against the torch backend's
two einsums over BF16 W_UK / W_UV copies, and kv_b's FP8 bytes per second against HBM. Then, for each cache
layout (fp8, bf16), context (1K, 8K, 32K, 128K), batch (1, 8, 64) and head count (16 for
V2-Lite, 128 for V2): the kernel's median time (CUDA events, L2 flushed between calls), the cache bytes
it reads per second against the H200's 4.8 TB/s, its bf16 TFLOP/s, and the speed of the torch reference
(gather, dequantize, matmul, softmax) where that fits in memory. Writes mla.json and mla.md into the out
dir (default $OUT or ./bench-out).

Decode reads 656 B (fp8) per token and does 2 (C + R) + 2 C = 2,176 FLOP per token and head: at 16 heads
that is 53 FLOP/B, memory-bound on an H200 (ridge ~206 FLOP/B at 989 bf16 TFLOP/s); at 128 heads 424
FLOP/B, compute-bound. "roofline" is the time either bound allows over the time measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import report
import torch

from dsq.kernels.mla_absorb import absorb_o, absorb_q
from dsq.kernels.mla_decode import mla_decode
from dsq.latent import LatentPool, alloc_pool, cache_bytes_per_token, mla_decode_ref

HBM_GBPS = 4800.0  # H200 HBM3e
PEAK_TFLOPS = 989.0  # H200 dense bf16 tensor cores
C, R, PAGE = 512, 64, 64
SCALE = 0.1147  # (128 + 64) ** -0.5 * 1.5896
BUDGET_S = 80.0  # stop starting new measurements after this (the issue allows ~90 s)
REF_BYTES_MAX = 24e9  # skip the torch reference when its fp32 intermediates would exceed this
# tile alternatives to mla_decode's default (16 heads x 32 tokens, 8 warps, 2 stages), timed once each
SWEEP = [dict(block_n=64), dict(num_warps=4), dict(num_stages=3), dict(block_h=32), dict(block_h=64)]


def _fill(pool: LatentPool) -> None:
    """Finite random content (timing does not depend on it, NaN bytes would only obscure the check)."""
    if pool.scale is not None:
        pool.kv.view(torch.uint8).random_(0, 0x70)
        pool.scale.uniform_(1e-3, 1e-2)
    else:
        pool.kv.normal_()
    pool.pe.normal_()


def _time_us(fn: Callable[[], object], iters: int, flush: torch.Tensor) -> float:
    times = []
    for _ in range(iters):
        flush.zero_()  # evict the cache from L2 so small contexts are not served from it
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def _table(batch: int, ctx: int, num_pages: int, gen: torch.Generator) -> torch.Tensor:
    """Each sequence gets ctx / PAGE pages scattered over the whole pool."""
    need = batch * ctx // PAGE
    return torch.randperm(num_pages, generator=gen)[:need].view(batch, -1).int().cuda()


def _measure(pool: LatentPool, kind: str, h: int, batch: int, ctx: int, iters: int, flush: torch.Tensor,
             gen: torch.Generator, with_ref: bool, **cfg: int) -> dict:
    table = _table(batch, ctx, pool.kv.shape[0], gen)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    q = (torch.randn(batch, h, C, generator=gen) * 0.5).bfloat16().cuda()
    qp = (torch.randn(batch, h, R, generator=gen) * 0.3).bfloat16().cuda()
    run = lambda: mla_decode(q, qp, pool, table, lens, SCALE, max_seq_len=ctx, **cfg)
    out = run()  # compiles
    us = _time_us(run, iters, flush)
    nbytes = batch * ctx * cache_bytes_per_token(kind)
    flops = batch * h * ctx * (4 * C + 2 * R)
    ideal_us = max(nbytes / (HBM_GBPS * 1e3), flops / (PEAK_TFLOPS * 1e6))
    rec = {"layout": kind, "heads": h, "batch": batch, "context": ctx, **cfg, "us": round(us, 2),
           "gbps": round(nbytes / us / 1e3, 1), "hbm_pct": round(100 * nbytes / us / 1e3 / HBM_GBPS, 1),
           "tflops": round(flops / us / 1e6, 1), "roofline_pct": round(100 * ideal_us / us, 1)}
    ref_bytes = 4 * batch * ctx * (C + R) * 3 + 4 * batch * h * ctx * 3
    if with_ref and ref_bytes < REF_BYTES_MAX:
        ref = lambda: mla_decode_ref(q, qp, pool, table, lens, SCALE, max_len=ctx)
        want = ref()
        rec["ref_us"] = round(_time_us(ref, 3, flush), 1)
        rec["speedup"] = round(rec["ref_us"] / us, 1)
        rec["rel_err"] = float(f"{((out.float() - want).norm() / want.norm()).item():.2e}")
    return rec


def _absorb(h: int, batch: int, iters: int, flush: torch.Tensor) -> dict:
    """absorb_q + absorb_o against the BF16 einsums of the torch backend, at DeepSeek-V2's head dims."""
    nope, rope, v = 128, 64, 128
    w = (torch.randn(h, nope + v, C, device="cuda") / C**0.5).to(torch.float8_e4m3fn)
    s = torch.rand(h, nope + v, 1, device="cuda") * 1e-2
    (uk, uv), (uk_s, uv_s) = w.split([nope, v], 1), s.split([nope, v], 1)
    w_uk, w_uv = ((x.float() * y).bfloat16() for x, y in ((uk, uk_s), (uv, uv_s)))
    q = torch.randn(batch, h, nope + rope, device="cuda").bfloat16()
    cos, sin = torch.rand(batch, rope // 2, device="cuda"), torch.rand(batch, rope // 2, device="cuda")
    o_lat = torch.randn(batch, h, C, device="cuda")

    def kernels() -> None:
        absorb_q(q, cos, sin, uk, uk_s)
        absorb_o(o_lat, uv, uv_s, torch.bfloat16)

    def einsums() -> None:
        torch.einsum("bhp,hpc->bhc", q[..., :nope], w_uk)
        torch.einsum("bhc,hvc->bhv", o_lat.bfloat16(), w_uv)

    kernels(), einsums()  # compile
    us, ref_us = _time_us(kernels, iters, flush), _time_us(einsums, iters, flush)
    return {"heads": h, "batch": batch, "us": round(us, 1), "gbps": round(w.numel() / us / 1e3, 1),
            "hbm_pct": round(100 * w.numel() / us / 1e3 / HBM_GBPS, 1), "bf16_einsum_us": round(ref_us, 1),
            "speedup": round(ref_us / us, 2)}


def _markdown(records: list[dict], sweep: list[dict], absorbed: list[dict]) -> str:
    lines = [
        "# Absorbed MLA projections (bench/mla.py)", "",
        "kv_b's FP8 weight read by absorb_q + absorb_o, against two einsums over BF16 W_UK / W_UV.", "",
        "| heads | batch | us | GB/s | % HBM | BF16 einsums us | speedup |", "|" + " --- |" * 7,
        *(f"| {r['heads']} | {r['batch']} | {r['us']} | {r['gbps']} | {r['hbm_pct']} | {r['bf16_einsum_us']} |"
          f" {r['speedup']} |" for r in absorbed), "",
        "# MLA decode attention (bench/mla.py)", "",
        f"GPU: {torch.cuda.get_device_name()}. Cache bytes per token per layer: fp8 {cache_bytes_per_token('fp8')} B,"
        f" bf16 {cache_bytes_per_token('bf16')} B (all layers, fp8: V2-Lite {27 * 656 / 1e3:.1f} KB,"
        f" V2 {60 * 656 / 1e3:.1f} KB).", "",
        "| layout | heads | batch | context | us | GB/s | % HBM | TFLOP/s | % roofline | torch us | speedup"
        " | rel err |",
        "|" + " --- |" * 12,
    ]
    for r in records:
        lines.append(f"| {r['layout']} | {r['heads']} | {r['batch']} | {r['context']} | {r['us']} | {r['gbps']} |"
                     f" {r['hbm_pct']} | {r['tflops']} | {r['roofline_pct']} | {r.get('ref_us', '-')} |"
                     f" {r.get('speedup', '-')} | {r.get('rel_err', '-')} |")
    if sweep:
        lines += ["", "Tile alternatives (fp8, 8 x 32K; default first):", "",
                  "| heads | config | us | % roofline |", "| --- | --- | --- | --- |"]
        lines += [f"| {r['heads']} | {r['config']} | {r['us']} | {r['roofline_pct']} |" for r in sweep]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    report.add_out(parser)
    parser.add_argument("--quick", action="store_true", help="fp8 only, contexts up to 32K, fewer iterations")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/mla.py: needs a CUDA GPU; none found, nothing measured")
        return
    t0 = time.time()
    kinds = ["fp8"] if args.quick else ["fp8", "bf16"]
    contexts = [1024, 8192, 32768] if args.quick else [1024, 8192, 32768, 131072]
    batches, heads, iters = [1, 8, 64], [16, 128], 10 if args.quick else 20
    gen = torch.Generator().manual_seed(0)
    flush = torch.empty(64 << 20, dtype=torch.int32, device="cuda")  # 256 MB > the 50 MB L2
    records, sweep, skipped = [], [], 0
    absorbed = [_absorb(h, batch, iters, flush) for h in heads for batch in batches]
    for rec in absorbed:
        print(json.dumps(rec), flush=True)
    for kind in kinds:
        pool = alloc_pool(max(batches) * max(contexts) // PAGE, PAGE, kind, "cuda")
        _fill(pool)
        for ctx in contexts:
            for batch in batches:
                for h in heads:
                    if time.time() - t0 > BUDGET_S:
                        skipped += 1
                        continue
                    rec = _measure(pool, kind, h, batch, ctx, iters, flush, gen, with_ref=ctx <= 32768)
                    records.append(rec)
                    print(json.dumps(rec), flush=True)
        if kind == "fp8" and not args.quick:
            for h in heads:
                for cfg in [{}, *(c for c in SWEEP if c.get("block_h", 16) <= h)]:
                    if time.time() - t0 > BUDGET_S:
                        break
                    rec = _measure(pool, kind, h, 8, 32768, iters, flush, gen, with_ref=False, **cfg)
                    sweep.append({"heads": h, "config": cfg or "default", "us": rec["us"],
                                  "roofline_pct": rec["roofline_pct"]})
                    print(json.dumps(sweep[-1], default=str), flush=True)
        del pool
        torch.cuda.empty_cache()
    result = {"gpu": torch.cuda.get_device_name(), **report.stamp(), "hbm_gbps": HBM_GBPS, "peak_tflops": PEAK_TFLOPS,
              "bytes_per_token": {k: cache_bytes_per_token(k) for k in ("fp8", "bf16")},
              "absorbed": absorbed, "decode": records, "tile_sweep": sweep, "skipped_for_time": skipped,
              "seconds": round(time.time() - t0, 1)}
    report.save(args.out, "mla", result, _markdown(records, sweep, absorbed))
    print(_markdown(records, sweep, absorbed))
    print(f"bench/mla.py: {len(records)} shapes in {result['seconds']} s ({skipped} skipped for time) -> {args.out}")


if __name__ == "__main__":
    main()
