"""End to end on one GPU: DeepSeek-V2-Lite (or V2) at its real shapes with random weights quantized on the
device (no download), against the same model in BF16 eager PyTorch in the same run and the batch-1 roofline.

    python bench/e2e.py [--model deepseek-v2-lite|deepseek-v2] [--quick] [--out DIR]

Reports prefill tok/s (512 and 8K-token prompts), decode tok/s at batch 1, 8, 32, 128, peak GPU memory,
and the memory of a 32K-token context. Writes e2e.json and e2e.md into --out ($OUT, else ./bench-out).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import report
import torch

HBM = 4.8e12  # H200 bytes/s (NVIDIA's H200 datasheet: 4.8 TB/s HBM3e)


def fill_random(net, std: float = 0.02, seed: int = 0) -> None:
    """Random weights straight into every module, quantized on the device by the module's own format."""
    from dsq.layers import Embedding, Linear, RMSNorm
    from dsq.model import Gate

    torch.manual_seed(seed)
    for m in net.modules():
        if isinstance(m, RMSNorm):
            m.weight.fill_(1.0)
        elif isinstance(m, (Embedding, Gate)):
            m.weight.normal_(0, std)
        elif isinstance(m, Linear):
            for e in range(m.n_experts) if m.n_experts else [None]:
                dst = m.tensors(e)
                w = torch.randn(m.out_features, m.in_features, device=next(iter(dst.values())).device) * std
                for k, v in m.quantize(w).items():
                    dst[k].copy_(v)


def build(preset: str, quantized: bool, device: str):
    """A Transformer of the preset's shapes: FP8 + INT4 g128 experts (dsq quantize's default), or BF16."""
    from dsq.config import Config
    from dsq.formats import Scheme
    from dsq.model import Transformer
    from dsq.quantize.scheme import Options, quantization_config

    cfg = Config.preset(preset)
    scheme = Scheme(quantization_config(Options())) if quantized else None
    with torch.device("meta"):
        net = Transformer(cfg, torch.bfloat16, scheme=scheme, backend="triton" if quantized else "torch",
                          kv_cache_dtype="fp8" if quantized else "bf16")
    net.to_empty(device=device)
    net.init_rope()
    fill_random(net)
    net.prepare()
    return net.eval()


def timed(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def one_step(net, n: int, context: int):
    """A runner whose pool holds `context` tokens of one sequence, and the step of its last `n` tokens."""
    from dsq.engine import SeqSlice, StepBatch
    from dsq.engine.runner import ModelRunner

    page = 64
    pages = list(range(-(-context // page)))
    positions = list(range(context - n, context))
    ids = torch.randint(0, net.cfg.vocab_size, (n,)).tolist()
    step = StepBatch(ids, positions, [pages[p // page] * page + p % page for p in positions],
                     [SeqSlice(0, n, context, pages, True)])
    return ModelRunner(net, len(pages), page), step


def prefill_tok_s(net, n: int) -> float:
    runner, step = one_step(net, n, n)
    run = lambda: runner.forward(step)
    run()
    return n / min(timed(run) for _ in range(2))


def decode_tok_s(net, batch: int, new: int) -> float:
    """Decode tokens/s of `batch` 64-token prompts through the engine, from the step after every prompt's
    first token (the prefill) to the last token."""
    from dsq.engine import Engine, SamplingParams
    from dsq.engine.runner import ModelRunner

    engine = Engine(ModelRunner(net, batch * -(-(64 + new) // 64), 64), max_seqs=batch)
    prompts = [[1 + (i * 7 + j) % 1000 for j in range(64)] for i in range(batch)]
    reqs = [engine.add_request(p, SamplingParams(max_tokens=new)) for p in prompts]
    while any(len(r.tokens) == r.num_prompt for r in reqs):  # the prefill steps
        engine.step()
    torch.cuda.synchronize()
    t0, done = time.perf_counter(), sum(len(r.tokens) - r.num_prompt for r in reqs)
    while not all(r.done.is_set() for r in reqs):
        engine.step()
    torch.cuda.synchronize()
    return (sum(len(r.tokens) - r.num_prompt for r in reqs) - done) / (time.perf_counter() - t0)


def long_context_gb(net, context: int) -> float:
    """Peak memory of one decode step at the end of a `context`-token cache (weights included)."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    runner, step = one_step(net, 1, context)
    runner.forward(step)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="deepseek-v2-lite", choices=["deepseek-v2-lite", "deepseek-v2"])
    ap.add_argument("--quick", action="store_true")
    report.add_out(ap)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/e2e.py: no CUDA device; nothing to measure")
        return
    lite = args.model == "deepseek-v2-lite"
    batches = [1, 8] if args.quick else [1, 8, 32, 128]
    new = 32 if args.quick else 64
    rows, result = [], {"model": args.model, "gpu": torch.cuda.get_device_name(), **report.stamp()}
    variants = [("dsq fp8+int4", True)] + ([("bf16 eager", False)] if lite else [])
    for name, quantized in variants:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        net = build(args.model, quantized, "cuda")
        weights = torch.cuda.memory_allocated() / 1e9
        r = {"build_s": time.perf_counter() - t0, "weights_gb": weights}
        for n in ([512] if args.quick or not lite else [512, 8192]):
            r[f"prefill_{n}_tok_s"] = prefill_tok_s(net, n)
        for b in batches if quantized else batches[:2]:
            r[f"decode_b{b}_tok_s"] = decode_tok_s(net, b, new)
        r["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
        if quantized and lite:
            r["context_32k_gb"] = long_context_gb(net, 32768)
        result[name] = r
        print(name, json.dumps(r), flush=True)
        del net
    # bytes read per decoded token at batch 1: the active parameters (2.4B / 21B, the DeepSeek-V2 paper) in
    # FP8 + INT4 experts (bench/census.py derives V2-Lite's exactly from the model: 2.04 GB, 1.5% more)
    active = 2.01e9 if lite else 12e9
    roof = HBM / active
    q = result["dsq fp8+int4"]
    rows.append(f"## e2e: {args.model} on {result['gpu']} ({result['date']}, commit {result['commit']})")
    rows.append("| metric | dsq fp8+int4 | bf16 eager | ratio |")
    rows.append("| --- | --- | --- | --- |")
    base = result.get("bf16 eager", {})
    for key in q:
        b = base.get(key)
        ratio = f"{q[key] / b:.2f}x" if b else ""
        rows.append(f"| {key} | {q[key]:,.2f} | {'' if b is None else f'{b:,.2f}'} | {ratio} |")
    rows.append(f"| batch-1 decode vs roofline ({roof:,.0f} tok/s at {HBM / 1e12:.1f} TB/s) | "
                f"{q['decode_b1_tok_s'] / roof:.1%} | | |")
    report.save(args.out, "e2e" if lite else "e2e_v2", result, "\n".join(rows))
    print("\n".join(rows))


if __name__ == "__main__":
    sys.exit(main())
