"""`dsq serve`: the model behind the OpenAI-compatible server (dsq/server.py), on the serving engine.

The flags are checked first (a taken port included), then the model is loaded once, one latent-cache page
pool is allocated for it (ModelRunner), and the engine's loop thread runs under uvicorn until SIGINT or
SIGTERM (docs/serving.md). With --tp N this process is rank 0: it serves and runs the engine, the other ranks
only compute its steps."""

from __future__ import annotations

import errno
import socket
from pathlib import Path

from rich.console import Console

from dsq.config import Config
from dsq.errors import DsqError
from dsq.memory import CONTEXT, CPU_SERVE_SEQUENCES


def check_flags(kv_cache_dtype: str, gpu_memory_utilization: float, host: str, port: int) -> None:
    from dsq.cache import KV_CACHE_DTYPES

    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise DsqError(f"--kv-cache-dtype {kv_cache_dtype}: give one of {', '.join(KV_CACHE_DTYPES)}")
    if not 0 < gpu_memory_utilization <= 1:  # NaN fails this too
        raise DsqError(f"--gpu-memory-utilization {gpu_memory_utilization}: give a number in (0, 1]")
    check_port(host, port)


def check_port(host: str, port: int) -> None:
    """Fail before loading the model, not after, when the address cannot be bound."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise DsqError(f"--host {host}: not an address or a name this machine resolves") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            why = "is in use; pick another --port" if e.errno == errno.EADDRINUSE else f"cannot be bound ({e.strerror})"
            raise DsqError(f"--host {host} --port {port}: {why}") from None


def pool_pages(net, max_model_len: int) -> int:
    """Pages of the pool: on a GPU, what the memory planner left for the cache at load (net.cache_tokens);
    on CPU, room for CPU_SERVE_SEQUENCES sequences of max_model_len tokens."""
    from dsq.cache import PAGE_SIZE
    from dsq.engine.runner import planned_pages

    pages = planned_pages(net, CPU_SERVE_SEQUENCES * max_model_len)
    if pages * PAGE_SIZE < max_model_len:
        raise DsqError(f"--max-model-len {max_model_len}: the cache holds only {pages * PAGE_SIZE:,} tokens; "
                       "give a smaller --max-model-len or a higher --gpu-memory-utilization")
    return pages


def run_serve(folder: Path, cfg: Config, model: str, host: str, port: int, max_model_len: int | None,
              kv_cache_dtype: str, gpu_memory_utilization: float, served_model_name: str, api_key: str | None,
              device: str, tp: int, console: Console) -> None:
    """Load the model (config `cfg` read from `folder`) and serve it until SIGINT or SIGTERM."""
    from dsq import load_quantized
    from dsq.engine import Engine
    from dsq.engine.runner import ModelRunner
    from dsq.launch import check_tp
    from dsq.server import serve

    if max_model_len is not None and max_model_len > cfg.max_position_embeddings:
        raise DsqError(f"--max-model-len {max_model_len} is above this model's maximum of "
                       f"{cfg.max_position_embeddings} tokens (max_position_embeddings)")
    max_model_len = max_model_len or min(CONTEXT, cfg.max_position_embeddings)
    if tp > 1:
        check_tp(tp, folder, device)
    with console.status("loading model"):  # on --tp N this process is rank 0 (engine and server) and starts the rest
        m = load_quantized(folder, device=device, max_seq_len=max_model_len, kv_cache_dtype=kv_cache_dtype,
                           gpu_memory_utilization=gpu_memory_utilization, tp=tp)
    if m.tokenizer is None:
        raise DsqError(f"{model}: no tokenizer.json; the server encodes text and chat messages with it")
    runner = ModelRunner(m.net, pool_pages(m.net, max_model_len))
    engine = Engine(runner)
    url = f"http://{host}:{port}/v1"
    console.print(f"dsq serve: {served_model_name} at {url} ({runner.num_pages * runner.page_size:,} cache tokens, "
                  f"context {max_model_len:,}); Ctrl-C stops", highlight=False, soft_wrap=True)
    auth = f' -H "Authorization: Bearer {api_key}"' if api_key else ""
    console.print(f"  try: curl {url}/models{auth}\n"
                  f'  or:  OpenAI(base_url="{url}", api_key="{api_key or "none"}").chat.completions.create('
                  f'model="{served_model_name}", messages=[{{"role": "user", "content": "Hi"}}])',
                  markup=False, highlight=False, soft_wrap=True)
    with m:
        serve(engine, m.tokenizer, served_model_name, host, port, api_key, max_model_len)
