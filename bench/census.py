"""Census of a decode step (and a prefill chunk) as an H200 would run it, counted on the CPU.

    python bench/census.py [--model deepseek-v2-lite] [--layers 3] [--context 1024] [--out DIR]

At real shapes on the first `--layers` layers (layer 0 dense, the rest MoE), random weights in `dsq quantize`'s
default formats (FP8 W8A8 + INT4 g128 experts), FP8 latent cache, Triton backend, for a decode step at batch 1
and 64 and a 512-token prefill chunk:
- kernels per layer: Triton launches, plus torch ops that are GPU kernels (every aten op that is not a view,
  an allocation or a host read);
- bytes read per step: of weights (each launch's or op's model tensors; of stacked experts only the experts the
  step routes to; of the embedding the rows of the step's tokens) and of the cache (what attention reads; the
  cache write stores the new tokens and reads none of it), against the ideal (every weight of the step read
  once, active experts only, plus the cache in use);
- weight-sized temporaries: op outputs at least as large as the smallest weight matrix;
- host syncs: reads of device values by the host (`.item()`, `bool(t)`, `.tolist()`, `nonzero`, ...).
Triton launches are recorded, not run (no GPU here: their outputs stay unwritten, so values downstream are
garbage, which counting does not mind), with the wrappers choosing what they would on a 132-SM H200.
Sampling and the host's read of the sampled ids are counted with the step (outside the layers).
The per-token figures scale the measured layers to the whole model (the ideal at batch 1: ~2.04 GB per V2-Lite
token, its 2.4B active parameters in FP8 + INT4).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import pkgutil
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace

import report
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

H200_SMS = 132
NOT_KERNELS = {"item", "is_nonzero", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
               "_local_scalar_dense", "lift_fresh", "alias", "detach", "detach_", "set_"}
HOST_FACTORIES = {"lift_fresh", "lift_fresh_copy", "scalar_tensor"}  # torch.tensor(a Python number): on the host
CACHE_WRITES = {"_cache_write_kernel"}  # store the step's new tokens in the pool; read none of it
SYNCS = {"item", "is_nonzero", "_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_consecutive",
         "unique_dim", "bincount", "repeat_interleave"}  # bincount/repeat_interleave: an output size the host must read


@dataclass
class Tally:
    """What one layer (or the model outside the layers) did in one step."""

    triton: Counter = field(default_factory=Counter)
    torch: Counter = field(default_factory=Counter)
    weight_bytes: int = 0
    cache_bytes: int = 0
    temporaries: list = field(default_factory=list)  # (op, bytes)
    syncs: Counter = field(default_factory=Counter)

    @property
    def kernels(self) -> int:
        return sum(self.triton.values()) + sum(self.torch.values())


class Census(TorchDispatchMode):
    """Counts torch ops (by dispatch) and Triton launches (by patching JITFunction.run), per layer."""

    def __init__(self, model: torch.nn.Module, cache, temp_threshold: int):
        super().__init__()
        self.layer = "model"
        self.tallies: dict[str, Tally] = defaultdict(Tally)
        self.threshold = temp_threshold
        self.weights = {}  # storage pointer -> (stored bytes, experts stacked or 0)
        for _, t in [*model.named_parameters(), *model.named_buffers()]:
            self.weights[t.untyped_storage().data_ptr()] = t
        self.cache_ptrs = {t.untyped_storage().data_ptr(): t for pool in cache.pools for t in _tensors(pool)}
        self.cache_tokens = 0  # tokens in use per sequence set by the caller: what a kernel reads of the pool
        self.cache_seqs = 0
        self.routed: set[int] = set()  # experts routed to in the current layer
        self.host: set[int] = set()  # storages of tensors made from Python values: they stay on the host on a GPU

    def tally(self) -> Tally:
        return self.tallies[self.layer]

    def reads(self, tensors, cache_tokens: int | None = None) -> None:
        """Charge the step for the model and cache tensors a kernel reads (`cache_tokens` per sequence of the
        cache: by default the tokens in use, all of which attention reads)."""
        seen = set()
        for t in tensors:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                continue
            seen.add(ptr)
            if ptr in self.weights:
                w = self.weights[ptr]
                nbytes = t.numel() * t.element_size()
                if w.dim() == 3 and t.dim() == 3 and t.shape[0] == w.shape[0] and self.routed:
                    nbytes = nbytes * len(self.routed) // w.shape[0]  # stacked experts: the routed ones
                self.tally().weight_bytes += nbytes
            elif ptr in self.cache_ptrs:
                part = self.cache_ptrs[ptr]  # [pages, page_size, ...]: what the sequences' tokens use of it
                per_token = part[0, 0].numel() * part.element_size()
                self.tally().cache_bytes += per_token * (self.cache_tokens * self.cache_seqs if cache_tokens is None
                                                         else cache_tokens)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        flat = [*_flat(args), *_flat(kwargs)]
        outs = [t for t in _flat(out) if isinstance(t, torch.Tensor)]
        inputs = [t for t in flat if isinstance(t, torch.Tensor)]
        if all(o.dim() == 0 for o in outs) and (name in HOST_FACTORIES or (
                inputs and all(t.untyped_storage().data_ptr() in self.host for t in inputs))):
            self.host.update(o.untyped_storage().data_ptr() for o in outs)  # host scalar arithmetic: no kernel
            return out
        if name in SYNCS:
            self.tally().syncs[name] += 1
        views = outs and all(any(o.untyped_storage().data_ptr() == i.untyped_storage().data_ptr()
                                 for i in flat if isinstance(i, torch.Tensor)) for o in outs) and not name.endswith("_")
        if name in NOT_KERNELS or (views and name != "copy_"):
            return out
        self.tally().torch[name] += 1
        if name == "embedding":  # a gather: the rows of the step's tokens, not the table
            weight, ids = args[:2]
            self.tally().weight_bytes += ids.numel() * weight.shape[-1] * weight.element_size()
        else:
            self.reads(flat)
        for o in outs:
            nbytes = o.numel() * o.element_size()
            if nbytes >= self.threshold and o.untyped_storage().data_ptr() not in self.weights and \
                    not self.activation(o):
                self.tally().temporaries.append((name, nbytes))
        return out

    def activation(self, t: torch.Tensor) -> bool:
        """A tensor laid out by token ([batch, tokens, ...], [batch * tokens, ...], or one sequence's heads first
        as attention lays them out, [heads, tokens, dim]): an activation, not a weight-sized temporary, however
        large."""
        per_seq = self.tokens // self.batch
        return t.dim() > 0 and (t.shape[0] == self.tokens or t.shape[:2] == (self.batch, per_seq)
                                or (t.dim() == 3 and t.shape[1] == per_seq > 1))

    def launch(self, fn, args, kwargs) -> None:
        t = self.tally()
        name = getattr(fn, "__name__", str(fn))
        t.triton[name] += 1
        self.reads([*args, *kwargs.values()], self.tokens if name in CACHE_WRITES else None)


def _tensors(pool) -> list[torch.Tensor]:
    """The tensors of one layer's cache pool (a tuple of [pages, page_size, ...] parts)."""
    return [t for t in pool if isinstance(t, torch.Tensor)]


def _flat(x):
    if isinstance(x, (list, tuple)):
        for y in x:
            yield from _flat(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _flat(y)
    else:
        yield x


@contextlib.contextmanager
def as_on_an_h200(census: Census):
    """Let the kernel wrappers take their GPU path on CPU tensors: record each Triton launch instead of running
    it, and answer 132 SMs wherever a wrapper asks how many SMs there are."""
    import triton.runtime.jit as jit

    import dsq.kernels

    saved = []

    def patch(obj, name, value):
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def run(self, *args, grid, warmup, **kwargs):
        census.launch(self, args, kwargs)
        with _disable_current_modes():  # finite values downstream (the runner refuses NaN logits); not counted
            for t in [*args, *kwargs.values()]:
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.element_size() > 1 and \
                        t.untyped_storage().data_ptr() not in census.weights:
                    t.zero_()

    patch(jit.JITFunction, "run", run)
    for info in pkgutil.iter_modules(dsq.kernels.__path__):
        mod = importlib.import_module(f"dsq.kernels.{info.name}")
        for name, value in [("interpreted", lambda *a: False), ("sm_count", lambda *a: H200_SMS)]:
            if hasattr(mod, name):
                patch(mod, name, value)
        if hasattr(mod, "default_num_splits"):  # MLA decode asks for its split with the SM count of a GPU only
            real = mod.default_num_splits
            patch(mod, "default_num_splits", lambda b, h, s, sms, *a, real=real: real(b, h, s, H200_SMS, *a))
    real_tolist = torch.Tensor.tolist

    def tolist(t):
        if t.untyped_storage().data_ptr() not in census.host:
            census.tally().syncs["tolist"] += 1
        return real_tolist(t)

    patch(torch.Tensor, "tolist", tolist)
    try:
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


def build(model_name: str, layers: int):
    """A Transformer of the preset's shapes with `layers` layers in the default scheme, random stored tensors."""
    from dsq.config import Config
    from dsq.formats import SCHEMES, Scheme
    from dsq.model import Transformer

    cfg = replace(Config.preset(model_name), num_hidden_layers=layers)
    with torch.device("meta"):
        net = Transformer(cfg, torch.bfloat16, scheme=Scheme.by_role(SCHEMES["fp8-int4"], "census"),
                          backend="triton", kv_cache_dtype="fp8")
    net.to_empty(device="cpu")
    net.init_rope()
    g = torch.Generator().manual_seed(0)
    for name, t in [*net.named_parameters(), *net.named_buffers()]:
        if name.endswith("inv_freq"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            t.copy_((torch.randn(t.shape, generator=g) * 64).clamp(-448, 448).to(t.dtype))
        elif t.dtype in (torch.int32, torch.int64):
            t.copy_(torch.randint(-2**31, 2**31 - 1, t.shape, generator=g, dtype=torch.int64).to(t.dtype))
        elif "scale" in name:
            t.fill_(1e-3)
        elif "norm" in name:
            t.fill_(1.0)
        else:
            t.copy_(torch.randn(t.shape, generator=g) * 0.02)
    net.prepare()
    return net


def ideal_bytes(net, census: Census, batch: int, context: int) -> dict[str, int]:
    """Per layer: every weight of it read once (routed experts: the ones the step used) and the cache in use."""
    from dsq.loader import checkpoint_tensors

    out = {}
    for i, block in enumerate(net.model.layers):
        total = 0
        for name, t in checkpoint_tensors(block).items():  # the ideal reads kv_b, not W_UK / W_UV made from it
            nbytes = t.numel() * t.element_size()
            if ".experts." in f".{name}" and t.dim() >= 2:
                routed = census.routed_by_layer.get(f"layer {i}", set())
                nbytes = nbytes * len(routed) // t.shape[0]
            total += nbytes
        out[f"layer {i}"] = total
    per_token_layer = net.cfg.kv_lora_rank + 2 * net.cfg.qk_rope_head_dim + 4 * (net.cfg.kv_lora_rank // 128)
    out["cache per layer"] = per_token_layer * context * batch
    head = net.lm_head.weight
    out["model"] = head.numel() * head.element_size() + batch * net.cfg.hidden_size * 2
    return out


def step(net, batch: int, tokens: int, context: int, threshold: int) -> tuple[Census, dict[str, int]]:
    """One engine step through the model runner: `tokens` new tokens per sequence at positions
    [context, context + tokens) of `batch` sequences (decodes when tokens == 1: the absorbed path over a cache
    of `context` tokens), then the sampling of each sequence's next token and its read by the host."""
    from dsq.engine import SeqSlice, StepBatch, sample
    from dsq.engine.runner import ModelRunner

    page = 64
    per_seq = -(-(context + tokens) // page)
    runner = ModelRunner(net, batch * per_seq, page)
    seqs, slots, positions = [], [], []
    for i in range(batch):
        pages = list(range(i * per_seq, (i + 1) * per_seq))
        pos = list(range(context, context + tokens))
        seqs.append(SeqSlice(i * tokens, tokens, context + tokens, pages, True))
        slots += [pages[p // page] * page + p % page for p in pos]
        positions += pos
    ids = torch.randint(0, net.cfg.vocab_size, (batch * tokens,)).tolist()
    work = StepBatch(ids, positions, slots, seqs)
    census = Census(net, runner.cache, threshold)
    census.cache_tokens, census.cache_seqs = context + tokens, batch
    census.batch, census.tokens = batch, batch * tokens
    census.routed_by_layer = {}
    hooks = []
    g = torch.Generator().manual_seed(batch * 1000 + tokens)

    def route(gate, args, out):
        """Uniform random routing (the hidden states are garbage here), recorded: the experts the step reads."""
        weight, idx = out
        with _disable_current_modes():  # the census's own routing is not the step's work
            scores = torch.rand(idx.shape[0], gate.weight.shape[0], generator=g)
            idx = scores.argsort(dim=-1)[:, :idx.shape[1]].contiguous()
        census.routed.update(int(e) for e in idx.flatten().numpy())
        return weight, idx

    for i, block in enumerate(net.model.layers):
        def enter(module, args, i=i):
            census.layer, census.routed = f"layer {i}", set()

        def leave(module, args, output, i=i):
            census.routed_by_layer[f"layer {i}"] = set(census.routed)
            census.layer = "model"

        hooks += [block.register_forward_pre_hook(enter), block.register_forward_hook(leave)]
        gate = getattr(block.mlp, "gate", None)
        if gate is not None:
            hooks.append(gate.register_forward_hook(route))
    zeros, ones = torch.zeros(batch), torch.ones(batch)
    try:
        with as_on_an_h200(census), census:
            logits = runner.forward(work)
            # greedy, as the engine samples it; the host reads the ids
            sample(logits, zeros, zeros.long(), ones, torch.rand(batch), all_greedy=True).tolist()
    finally:
        for h in hooks:
            h.remove()
    return census, ideal_bytes(net, census, batch, context + tokens)


def summarize(name: str, census: Census, ideal: dict[str, int], full) -> dict:
    """Per-layer counts of the measured layers, and per-step bytes scaled to the `full` model's layers."""
    layers = [k for k in census.tallies if k.startswith("layer ")]
    moe = [k for k in layers if full.is_moe(int(k.split()[1]))]
    dense = [k for k in layers if k not in moe]
    t = census.tallies

    def mean(keys, f):
        return sum(f(t[k]) for k in keys) / max(len(keys), 1)

    per_layer = {k: {"triton": sum(t[k].triton.values()), "torch": sum(t[k].torch.values()),
                     "weight_bytes": t[k].weight_bytes, "cache_bytes": t[k].cache_bytes,
                     "ideal_bytes": ideal[k] + ideal["cache per layer"],
                     "temporaries": len(t[k].temporaries), "syncs": sum(t[k].syncs.values()),
                     "triton_kernels": dict(t[k].triton), "torch_ops": dict(t[k].torch.most_common())}
                 for k in layers}
    n, n_moe = full.num_hidden_layers, sum(full.is_moe(i) for i in range(full.num_hidden_layers))
    measured = (mean(dense, lambda x: x.weight_bytes + x.cache_bytes) * (n - n_moe)
                + mean(moe, lambda x: x.weight_bytes + x.cache_bytes) * n_moe + t["model"].weight_bytes)
    ideal_total = (sum(ideal[k] for k in dense) / max(len(dense), 1) * (n - n_moe)
                   + sum(ideal[k] for k in moe) / max(len(moe), 1) * n_moe
                   + ideal["cache per layer"] * n + ideal["model"])
    temps = [x for k in t for x in t[k].temporaries]
    return {
        "step": name,
        "kernels per MoE layer": mean(moe, lambda x: x.kernels),
        "triton launches per MoE layer": mean(moe, lambda x: sum(x.triton.values())),
        "torch kernels per MoE layer": mean(moe, lambda x: sum(x.torch.values())),
        "kernels per dense layer": mean(dense, lambda x: x.kernels),
        "kernels outside layers": t["model"].kernels,
        "bytes per step (whole model, scaled)": measured,
        "ideal bytes per step": ideal_total,
        "ratio to ideal": measured / ideal_total,
        "weight-sized temporaries per MoE layer": mean(moe, lambda x: len(x.temporaries)),
        "weight-sized temporaries (measured layers)": len(temps),
        "temporary bytes (measured layers)": sum(b for _, b in temps),
        "host syncs per step (measured layers + outside)": sum(sum(x.syncs.values()) for x in t.values()),
        "host syncs by op": dict(sum((x.syncs for x in t.values()), Counter())),
        "temporaries by op": [op for k in layers for op, _ in t[k].temporaries],
        "outside layers": {"triton_kernels": dict(t["model"].triton),
                           "torch_ops": dict(t["model"].torch.most_common())},
        "per layer": per_layer,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="deepseek-v2-lite")
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--context", type=int, default=1024)
    report.add_out(p)
    a = p.parse_args()
    # launches are recorded, never run; under the interpreter (set before dsq's kernels are imported) Triton
    # would run them instead, at real shapes, for many minutes
    os.environ.pop("TRITON_INTERPRET", None)
    torch.manual_seed(0)
    net = build(a.model, a.layers)
    from dsq.config import Config

    full = Config.preset(a.model)
    smallest = min(t.numel() * t.element_size() for n, t in net.named_buffers() if n.endswith("weight")
                   and t.dim() == 2)
    results = []
    for name, batch, tokens in (("decode batch 1", 1, 1), ("decode batch 64", 64, 1), ("prefill 512", 1, 512)):
        census, ideal = step(net, batch, tokens, a.context if tokens == 1 else 0, smallest)
        results.append(summarize(name, census, ideal, full))
    stamp = report.stamp()
    lines = [f"{stamp['date']}, commit {stamp['commit']}: {a.model}, {a.layers} layers measured, context "
             f"{a.context} for decode; per-step bytes scaled to {full.num_hidden_layers} layers", "",
             "| step | kernels / MoE layer (Triton + torch) | kernels / dense layer | bytes / step vs ideal | "
             "weight-sized temporaries / MoE layer | host syncs |", "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r['step']} | {r['kernels per MoE layer']:.1f} ({r['triton launches per MoE layer']:.1f} + "
                     f"{r['torch kernels per MoE layer']:.1f}) | {r['kernels per dense layer']:.0f} | "
                     f"{r['bytes per step (whole model, scaled)'] / 1e9:.3f} GB = {r['ratio to ideal']:.2f}x of "
                     f"{r['ideal bytes per step'] / 1e9:.3f} GB | {r['weight-sized temporaries per MoE layer']:.1f} | "
                     f"{r['host syncs per step (measured layers + outside)']} |")
    report.save(a.out, "census", {**stamp, "steps": results}, "\n".join(lines))
    print("\n".join(lines))

if __name__ == "__main__":
    sys.exit(main())
