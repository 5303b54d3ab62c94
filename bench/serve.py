"""`dsq serve` under load: N concurrent clients (the `openai` client over real HTTP, one thread each) against
one server, and the same prompts one at a time, in one run: output tokens/s, time to first token (TTFT) and
inter-token latency (ITL) p50/p99, and the ratio. A measurement for docs/benchmarks.md, not a test.

    python bench/serve.py [--clients 8] [--new 32] [--model FOLDER | --preset deepseek-v2-lite --layers 4]
                          [--device cuda] [--out DIR]

Default: the demo model (dsq.demo, quantized with dsq quantize) on CPU. `--preset` writes a random-weight
checkpoint at a published model's real shapes with its first `--layers` layers (the whole V2-Lite is 31 GB to
write; a few layers give its per-layer costs, the embedding and head whole) and quantizes it on `--device`.
Greedy, so the concurrent answers must equal the one-at-a-time ones; the run says whether they do. ITL is
measured between streamed chunks, each one token (a chunk that held back part of a UTF-8 character carries two)."""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import report

NAME = "bench"
PROMPTS = ["The experts of DeepSeek-V2", "Hello! How are you today?", "Write a piece of quicksort code in C++",
           "The quick brown fox", "Numbers: 0 1 2 3", "Multi-head latent attention compresses",
           "Once upon a time", "A mixture of experts routes each token"]


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def one(client, prompt: str, new: int) -> dict:
    """One streamed completion: its text, completion tokens, TTFT and the gaps between chunks."""
    t0 = time.perf_counter()
    times, text, tokens = [], [], 0
    for chunk in client.completions.create(model=NAME, prompt=prompt, max_tokens=new, temperature=0, stream=True,
                                           stream_options={"include_usage": True}):
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].text:
            times.append(time.perf_counter())
            text.append(chunk.choices[0].text)
    return {"text": "".join(text), "tokens": tokens, "ttft": times[0] - t0,
            "itl": [b - a for a, b in itertools.pairwise(times)]}


def phase(client, prompts: list[str], new: int, clients: int) -> dict:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        runs = list(pool.map(lambda p: one(client, p, new), prompts))
    wall = time.perf_counter() - t0
    itl = [g for r in runs for g in r["itl"]]
    ttft = [r["ttft"] for r in runs]
    return {"seconds": wall, "tokens": sum(r["tokens"] for r in runs), "tok_s": sum(r["tokens"] for r in runs) / wall,
            "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
            "itl_p50": percentile(itl, 50), "itl_p99": percentile(itl, 99), "texts": [r["text"] for r in runs]}


def start_server(folder: Path, device: str, threads: int | None) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "dsq.cli.main", "serve", str(folder), "--port", str(port), "--device", device,
           "--served-model-name", NAME, "--max-model-len", "1024"] + (["--threads", str(threads)] if threads else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import httpx

    url = f"http://127.0.0.1:{port}"
    while True:  # ready once /health answers; the process exiting first is a failure
        if proc.poll() is not None:
            sys.exit(f"dsq serve exited with {proc.returncode}: run `{' '.join(cmd)}` to see why")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--new", type=int, default=32, help="tokens per completion")
    ap.add_argument("--model", type=Path, help="a model folder (default: the demo model, quantized)")
    ap.add_argument("--preset", choices=["deepseek-v2-lite", "deepseek-v2"], help="random weights at these shapes")
    ap.add_argument("--layers", type=int, default=4, help="with --preset: how many of its layers")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, help="the server's CPU threads")
    report.add_out(ap)
    args = ap.parse_args()
    import openai
    import torch

    from dsq.config import Config
    from dsq.demo import DEMO, write_demo_checkpoint
    from dsq.quantize.run import quantize

    prompts = [PROMPTS[i % len(PROMPTS)] + f" ({i})" for i in range(args.clients)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model
        if folder is None:
            shapes = replace(Config.preset(args.preset), num_hidden_layers=args.layers) if args.preset else DEMO
            write_demo_checkpoint(Path(tmp) / "bf16", shapes=shapes)
            quantize(Path(tmp) / "bf16", folder := Path(tmp) / "fp8-int4", device=args.device)
        proc, url = start_server(folder, args.device, args.threads)
        try:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
            one(client, prompts[0], 4)  # warm-up: first-call costs out of the measurement
            alone = phase(client, prompts, args.new, 1)
            together = phase(client, prompts, args.new, args.clients)
        finally:
            proc.terminate()
            proc.wait()
    ms = lambda s: f"{s * 1e3:,.0f}"
    result = {**report.stamp(), "device": args.device,
              "machine": torch.cuda.get_device_name() if args.device.startswith("cuda") else
              f"{platform.processor() or platform.machine()}, {args.threads or len(os.sched_getaffinity(0))} threads",
              "model": str(args.model or (f"{args.preset}, {args.layers} layers, random (fp8-int4)" if args.preset
                                          else "demo (fp8-int4)")), "clients": args.clients, "new": args.new,
              "equal_outputs": alone["texts"] == together["texts"],
              "ratio_tok_s": together["tok_s"] / alone["tok_s"],
              "one_at_a_time": {k: v for k, v in alone.items() if k != "texts"},
              "concurrent": {k: v for k, v in together.items() if k != "texts"}}
    lines = [f"| {args.clients} prompts x {args.new} tokens | output tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms |",
             "| --- | --- | --- | --- |"]
    for name, r in (("one at a time", alone), (f"{args.clients} concurrent", together)):
        lines.append(f"| {name} | {r['tok_s']:,.1f} | {ms(r['ttft_p50'])} / {ms(r['ttft_p99'])} | "
                     f"{ms(r['itl_p50'])} / {ms(r['itl_p99'])} |")
    lines.append(f"| ratio | {result['ratio_tok_s']:.2f}x | | |")
    lines.append(f"\ngreedy outputs equal one at a time and concurrent: {result['equal_outputs']}; "
                 f"{result['machine']}, commit {result['commit']}, {result['date']}")
    print("\n".join(lines))
    report.save(args.out, "serve", result, "\n".join(lines))


if __name__ == "__main__":
    main()
