"""CPU prefill and decode tokens/s of a tiny DeepSeek-V2: dsq's reference runtime vs transformers, same
checkpoint, same run. A measurement for docs/benchmarks.md, not a test.

    python bench/cpu.py [--prompt 256] [--new 64] [--out DIR]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import report
import torch


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--new", type=int, default=64)
    report.add_out(ap)
    args = ap.parse_args()
    from transformers import DeepseekV2ForCausalLM

    import dsq
    from dsq.demo import write_demo_checkpoint

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = write_demo_checkpoint(tmp)
        ours = dsq.load_quantized(tmp, dtype=torch.float32)
        ref = DeepseekV2ForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    ids = torch.randint(3, cfg.vocab_size, (1, args.prompt))
    gen_ref = lambda n: ref.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        rows = {
            "dsq": (best_of(lambda: ours.logits(ids)),
                    best_of(lambda: ours.generate(ids[0].tolist(), max_new_tokens=args.new), 1)),
            "transformers": (best_of(lambda: ref(ids)), best_of(lambda: gen_ref(args.new), 1)),
        }
    result = {**report.stamp(), "machine": f"{platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} threads", "prompt": args.prompt, "new": args.new, "rows": {}}
    lines = [f"| runtime | prefill tok/s ({args.prompt}) | decode tok/s (batch 1) |", "| --- | --- | --- |"]
    for name, (prefill, total) in rows.items():
        decode = (args.new - 1) / max(total - prefill, 1e-9)
        result["rows"][name] = {"prefill_tok_s": args.prompt / prefill, "decode_tok_s": decode}
        lines.append(f"| {name} | {args.prompt / prefill:,.0f} | {decode:,.1f} |")
    d = result["rows"]
    lines.append(f"| ratio dsq / transformers | {d['dsq']['prefill_tok_s'] / d['transformers']['prefill_tok_s']:.2f}x "
                 f"| {d['dsq']['decode_tok_s'] / d['transformers']['decode_tok_s']:.2f}x |")
    print("\n".join(lines))
    report.save(args.out, "cpu", result, "\n".join(lines))


if __name__ == "__main__":
    main()
