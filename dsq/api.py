"""The Python API: `load_quantized()` and the model object it returns."""

from __future__ import annotations

import atexit
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, overload

import torch

from dsq.cache import KV_CACHE_DTYPES
from dsq.checkpoint import resolve
from dsq.engine import Engine, Request, SamplingError, SamplingParams
from dsq.engine.runner import ModelRunner, follow, full_forward, planned_pages, stop_followers
from dsq.errors import DsqError
from dsq.formats import SCHEMES, Scheme
from dsq.launch import Job, check_split, init, leave, spawn
from dsq.layers import check_backend
from dsq.loader import load_model
from dsq.memory import CONTEXT, CPU_MODEL_SEQUENCES, check_fits
from dsq.model import Transformer
from dsq.tokenizer import TextStream, Tokenizer

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}  # dtype="..."


def load_quantized(
    path_or_repo: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    max_seq_len: int | None = None,
    revision: str | None = None,
    backend: str | None = None,
    kv_cache_dtype: str = "fp8",
    gpu_memory_utilization: float = 0.9,
    tp: int = 1,
    quantize: str | None = None,
    **options: Any,
) -> Model:
    """Load a dsq-quantized folder, or an unquantized DeepSeek-V2 checkpoint as it is, from a local folder
    or a Hub repo id. dtype defaults to bfloat16 on GPU and float32 on CPU; backend to "triton" on GPU
    (the fused kernels) and "torch" elsewhere (the plain-torch reference maths). kv_cache_dtype is the MLA
    cache's layout: "fp8" (656 B per token and layer for V2), "bf16", or "fp32" (the exact reference).
    On a GPU the memory planner first checks that weights, activations and a cache of max_seq_len tokens
    (default dsq.memory.CONTEXT, 4096) fit in gpu_memory_utilization of the device, and says what to change if
    they don't. tp > 1: the model is split over tp ranks, each holding its share of the heads, experts and vocab
    (docs/parallel.md). This process is rank 0 and spawns the others (or, under torchrun, every process makes
    this call and only rank 0 returns: the others follow rank 0's steps and exit when it is done). Rank 0
    runs everything after; `Model.close()` (or its exit) ends the other ranks.
    quantize="fp8-int4" (dsq quantize's default scheme) or "fp8" (FP8 experts too) quantizes an unquantized
    checkpoint while loading it, tensor by tensor on the target device, for users who skip the offline step."""
    if options:
        raise DsqError(f"unknown option(s) {', '.join(sorted(options))} for load_quantized")
    device, dtype, backend, scheme = _options(device, dtype, backend, kv_cache_dtype, quantize, tp)
    folder = resolve(path_or_repo, revision)
    if tp > 1:  # every rank refuses a split the model cannot take at once, not after waiting for the others
        check_split(tp, folder, scheme, f"tp={tp}")
    again = dict(path_or_repo=str(folder), device=device.type, dtype=dtype, max_seq_len=max_seq_len, backend=backend,
                 kv_cache_dtype=kv_cache_dtype, gpu_memory_utilization=gpu_memory_utilization, tp=tp, quantize=quantize)
    job = spawn(tp, load_quantized, again) if tp > 1 else None  # ranks 1.. make this same call
    try:
        rank, device = init(tp, device) if tp > 1 else (0, device)
        fits = check_fits(folder, device, dtype, kv_cache_dtype, gpu_memory_utilization, max_seq_len or CONTEXT,
                          rank, tp, scheme, backend) if device.type == "cuda" else None
        net = load_model(folder, device, dtype, rank, tp, scheme, backend=backend, kv_cache_dtype=kv_cache_dtype,
                         cache_tokens=fits.cache_tokens if fits else None)
    except BaseException:
        if job is not None:
            job.kill()
        raise
    if rank > 0:  # a follower: it runs rank 0's steps until rank 0 is done, then this process ends
        follow(net)
        leave()
        raise SystemExit(0)
    tokenizer = Tokenizer(folder) if (folder / "tokenizer.json").exists() else None
    return Model(net, tokenizer, folder, max_seq_len, job)


def _options(device: str | torch.device, dtype: torch.dtype | str | None, backend: str | None, kv_cache_dtype: str,
             quantize: str | None, tp: int) -> tuple[torch.device, torch.dtype, str, Scheme | None]:
    """load_quantized's arguments refused in their names, before anything is read; the defaults that depend on
    the device filled in; the scheme `quantize` names (None: the checkpoint's own)."""
    device = check_device(device)
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise DsqError(f"tp={tp!r}: give an integer >= 1 (the number of ranks)")
    if isinstance(dtype, str):
        if dtype not in TORCH_DTYPES:
            raise DsqError(f"dtype {dtype!r} is not one of {', '.join(TORCH_DTYPES)}")
        dtype = TORCH_DTYPES[dtype]
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    backend = backend or ("triton" if device.type == "cuda" else "torch")
    check_backend(backend)  # before the folder is read or other ranks are spawned
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise DsqError(f"kv_cache_dtype {kv_cache_dtype!r} is not one of {', '.join(KV_CACHE_DTYPES)}")
    if quantize not in (None, *SCHEMES):
        raise DsqError(f"quantize={quantize!r} is not one of {', '.join(SCHEMES)}")
    return device, dtype, backend, Scheme.by_role(SCHEMES[quantize], f"quantize={quantize!r}") if quantize else None


def check_device(device: str | torch.device, cli: bool = False) -> torch.device:
    """The torch device `device` names, if dsq runs there: cpu, cuda or cuda:N of a visible GPU. A refusal
    names the argument as Python spells it (device='gpu'), or with `cli` as the flag (--device gpu)."""
    said, cpu = (f"--device {device}", "--device cpu") if cli else (f"device={device!r}", "device='cpu'")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        names = "cpu, cuda or cuda:N" if cli else "'cpu', 'cuda' or 'cuda:N'"
        raise DsqError(f"{said}: dsq runs on {names}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DsqError(f"{said}: no CUDA GPU is visible; use {cpu}")
    if dev.type == "cuda" and dev.index is not None and dev.index >= (n := torch.cuda.device_count()):
        raise DsqError(f"{said}: only {n} GPU(s) are visible (cuda:0 to cuda:{n - 1})")
    return dev


def check_stop(stop: list[str] | None) -> None:
    """Stop strings, as generate and chat cut the text at them."""
    if stop is not None and (isinstance(stop, str) or any(not isinstance(s, str) or not s for s in stop)):
        raise DsqError(f"stop={stop!r}: give a list of non-empty strings (an empty one would stop at once)")


class Model:
    """A loaded model: full-forward logits, batched generation, and chat in the model's template. Generation
    runs on one engine (dsq.engine) whose page pools are allocated on first use and kept."""

    def __init__(self, net: Transformer, tokenizer: Tokenizer | None, folder: Path, max_seq_len: int | None = None,
                 job: Job | None = None):
        self.net, self.tokenizer, self.folder, self.job = net, tokenizer, folder, job
        self.cfg = net.cfg
        self.max_seq_len = min(max_seq_len or net.cfg.max_position_embeddings, net.cfg.max_position_embeddings)
        self._cpu_tokens = CPU_MODEL_SEQUENCES * min(self.max_seq_len, max_seq_len or CONTEXT)
        self._engine: Engine | None = None
        self._open = True
        if net.dist.world > 1:
            atexit.register(self.close)

    def close(self) -> None:
        """On N ranks: stop the other ranks and leave the job (also at exit); the model is unusable after."""
        if not self._open or self.net.dist.world == 1:
            return
        self._open = False
        if self.net.dist.broken:  # a rank died or stalled: nothing can reach it, end the job as it is
            if self.job is not None:
                self.job.kill()
            return
        with contextlib.suppress(DsqError):
            stop_followers(self.net)
        if self.job is not None:
            self.job.close()
        else:  # ranks torchrun started: they leave on their own
            leave(ours_only=True)

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = Engine(ModelRunner(self.net, planned_pages(self.net, self._cpu_tokens)))
        return self._engine

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """float32 logits [B, T, vocab] of a full forward from an empty cache."""
        if input_ids.dim() != 2:
            raise DsqError(f"input_ids must be [batch, tokens], got shape {list(input_ids.shape)}")
        if input_ids.numel() and not 0 <= int(input_ids.min()) <= int(input_ids.max()) < self.cfg.vocab_size:
            raise DsqError(f"input_ids must be in [0, {self.cfg.vocab_size})")
        return full_forward(self.net, input_ids)

    def _checked(self, prompts: list[list[int]], params: SamplingParams) -> SamplingParams:
        """`params` for these prompts (every id in the vocabulary, prompt + max_tokens within the context),
        stopping at this model's eos too."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise DsqError("every prompt needs at least one token")
        vocab = self.cfg.vocab_size
        if any(not 0 <= t < vocab for p in prompts for t in p):
            raise DsqError(f"prompt token ids must be in [0, {vocab})")
        longest = max(len(p) for p in prompts)
        if longest + params.max_tokens > self.max_seq_len:
            raise DsqError(f"prompt ({longest} tokens) + max new tokens ({params.max_tokens}) exceeds the context of "
                           f"{self.max_seq_len} tokens; shorten the prompt or ask for fewer tokens")
        return replace(params, stop_token_ids=(*params.stop_token_ids, self.cfg.eos_token_id))

    @overload
    def generate(self, prompts: str, **kw: Any) -> str: ...
    @overload
    def generate(self, prompts: list[int], **kw: Any) -> list[int]: ...
    @overload
    def generate(self, prompts: list[str], **kw: Any) -> list[str]: ...
    @overload
    def generate(self, prompts: list[list[int]], **kw: Any) -> list[list[int]]: ...

    def generate(self, prompts, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, stop: list[str] | None = None, seed: int | None = None,
                 on_token: Callable[[int, int], None] | None = None):
        """Complete one prompt or a batch: token ids in, token ids out; text in, text out (needs a tokenizer).
        Greedy at temperature 0; stops at eos, at any `stop` string (cut from the text), or after
        max_new_tokens. `on_token(i, token_id)` streams every new token of prompt i."""
        params = _sampling(temperature, top_p, top_k, seed, max_new_tokens)
        check_stop(stop)
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int))
        batch = [prompts] if single else list(prompts)
        text = bool(batch) and isinstance(batch[0], str)
        if (text or stop) and self.tokenizer is None:
            raise DsqError(f"{self.folder}: no tokenizer.json, so text prompts and stop strings can't be used")
        ids = [self.tokenizer.encode(p) for p in batch] if text else batch
        params = self._checked(ids, params)

        def stream(i: int, req: Request, token: int | None) -> None:
            if token is None:
                return
            if on_token is not None:
                on_token(i, token)
            if stop and any(s in self.tokenizer.decode(req.output) for s in stop):
                self.engine.cancel(req)

        out = [r.output for r in self.engine.generate(ids, params, stream)]
        if text:
            out = [self._cut(self.tokenizer.decode(t), stop) for t in out]
        return out[0] if single else out

    def chat(self, messages: list[dict[str, str]], max_new_tokens: int = 512, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, stop: list[str] | None = None,
             seed: int | None = None) -> Iterator[str]:
        """Stream the assistant's reply to a conversation ([{"role": ..., "content": ...}]) as text pieces."""
        params = _sampling(temperature, top_p, top_k, seed, max_new_tokens)
        check_stop(stop)
        if self.tokenizer is None:
            raise DsqError(f"{self.folder}: no tokenizer.json, so chat is not possible")
        ids = self.tokenizer.encode_chat(messages)
        stream, text = TextStream(self.tokenizer), ""
        for token in self.stream(ids, params):
            piece = stream.push(token)
            if stop and any(s in text + piece for s in stop):
                yield self._cut(text + piece, stop)[len(text):]
                return
            text += piece
            yield piece

    def stream(self, prompt: list[int], params: SamplingParams) -> Iterator[int]:
        """One prompt's new tokens as the engine makes them, until eos (not included) or `params.max_tokens`;
        closing the iterator early cancels the request and frees its pages."""
        params = self._checked([prompt], params)
        made: list[int] = []
        engine, req = self.engine, None
        try:
            req = engine.add_request(prompt, params, lambda token: token is not None and made.append(token))
            while not req.done.is_set() or made:
                if not made:
                    engine.step()
                while made:
                    yield made.pop(0)
        finally:
            if req is not None and not req.done.is_set():
                engine.cancel(req)
                while not req.done.is_set():
                    engine.step()

    @staticmethod
    def _cut(text: str, stop: list[str] | None) -> str:
        for s in stop or []:
            text = text.split(s, 1)[0]
        return text


def _sampling(temperature: float, top_p: float, top_k: int, seed: int | None, max_new_tokens: int) -> SamplingParams:
    """SamplingParams of `generate` / `chat`, whose refusals name their arguments (max_new_tokens, not max_tokens)."""
    try:
        return SamplingParams(temperature, top_p, top_k, seed, max_new_tokens)
    except SamplingError as e:
        field = "max_new_tokens" if e.field == "max_tokens" else e.field
        raise DsqError(f"{field}={e.value!r}: give {e.rule}") from None

