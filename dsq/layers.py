"""The seam every weight matmul goes through: a linear module per weight format, and routed experts.

A linear module holds its weight in the on-disk form (compressed-tensors names: `weight`, or
`weight_packed` + `weight_scale` + ...), optionally stacked over a leading expert dim. Its two methods are
`quantize(w)` (a float [out, in] weight -> its stored tensors: quantize-on-load, benchmarks) and
`forward(x, expert=None)`; `dequantize(expert=None)` gives the float weight back. The model is built with
plain `Linear` and `Experts(Linear)`; the loader swaps in the formats a checkpoint declares (`swap_formats`). `backend`
picks the maths: "torch" (the dsq.quant references, any device) or "triton" (dsq.kernels).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dsq import quant
from dsq.errors import DsqError


class Linear(nn.Module):
    """Unquantized weight [out, in] in the model dtype (BF16 on GPU, FP32 for the CPU reference)."""

    def __init__(self, in_features: int, out_features: int, n_experts: int = 0, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features, self.n_experts = in_features, out_features, n_experts
        self.backend = "torch"
        lead = (n_experts,) if n_experts else ()
        for name, (shape, dt) in self.spec(dtype).items():
            self.register_buffer(name, torch.empty(*lead, *shape, dtype=dt))

    def spec(self, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The stored tensors of one weight: name -> (shape, dtype)."""
        return {"weight": ((self.out_features, self.in_features), dtype)}

    def tensors(self, expert: int | None = None) -> dict[str, torch.Tensor]:
        return {n: (b if expert is None else b[expert]) for n, b in self.named_buffers(recurse=False)}

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"weight": w}

    def dequantize(self, expert: int | None = None) -> torch.Tensor:
        return self.tensors(expert)["weight"]

    def forward(self, x: torch.Tensor, expert: int | None = None) -> torch.Tensor:
        return F.linear(x, self.dequantize(expert).to(x.dtype))

    def extra_repr(self) -> str:
        experts = f", experts={self.n_experts}" if self.n_experts else ""
        return f"{type(self).__name__}(in={self.in_features}, out={self.out_features}{experts})"


class FP8Linear(Linear):
    """FP8 e4m3 weight with per-channel or 128x128 block scales; activations quantized per token at run time."""

    def __init__(self, in_features: int, out_features: int, n_experts: int = 0, dtype: torch.dtype = torch.bfloat16,
                 block: bool = False):
        self.block = block
        super().__init__(in_features, out_features, n_experts, dtype)

    def spec(self, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        o, i, b = self.out_features, self.in_features, quant.BLOCK
        scale = (-(-o // b), -(-i // b)) if self.block else (o, 1)
        return {"weight": ((o, i), quant.FP8), "weight_scale": (scale, torch.float32)}

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        q, scale = quant.fp8_quantize_weight(w, self.block)
        return {"weight": q, "weight_scale": scale}

    def dequantize(self, expert: int | None = None) -> torch.Tensor:
        t = self.tensors(expert)
        return quant.fp8_dequantize_weight(t["weight"], t["weight_scale"])

    def forward(self, x: torch.Tensor, expert: int | None = None) -> torch.Tensor:
        t = self.tensors(expert)
        if self.backend == "triton":
            from dsq.kernels import fp8_gemm

            return fp8_gemm(x.reshape(-1, x.shape[-1]), t["weight"], t["weight_scale"]).view(*x.shape[:-1], -1)
        return quant.fp8_linear(x, t["weight"], t["weight_scale"])


class Int4Linear(Linear):
    """INT4 weight, group-wise scales (and zero points when asymmetric); BF16/FP32 activations (W4A16)."""

    def __init__(self, in_features: int, out_features: int, n_experts: int = 0, dtype: torch.dtype = torch.bfloat16,
                 group: int = 128, symmetric: bool = True):
        if in_features % group or in_features % 8:
            raise DsqError(f"INT4 group size {group} does not divide in_features={in_features}")
        self.group, self.symmetric = group, symmetric
        super().__init__(in_features, out_features, n_experts, dtype)

    def spec(self, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        o, i, g = self.out_features, self.in_features, self.group
        spec = {"weight_packed": ((o, i // 8), torch.int32), "weight_scale": ((o, i // g), torch.bfloat16),
                "weight_shape": ((2,), torch.int64)}
        if not self.symmetric:
            spec["weight_zero_point"] = ((-(-o // 8), i // g), torch.int32)
        return spec

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """Round-to-nearest with the quantizer's per-group MSE clip search."""
        from dsq.quantize.search import int4_search

        r = int4_search(w, self.group, self.symmetric)
        out = {"weight_packed": quant.int4_pack(r.q), "weight_scale": r.scale,
               "weight_shape": torch.tensor(w.shape, dtype=torch.int64)}
        if r.zero is not None:
            out["weight_zero_point"] = quant.int4_pack(r.zero, dim=0)
        return out

    def dequantize(self, expert: int | None = None) -> torch.Tensor:
        t = self.tensors(expert)
        return quant.int4_dequantize(t["weight_packed"], t["weight_scale"], t.get("weight_zero_point"))

    def forward(self, x: torch.Tensor, expert: int | None = None) -> torch.Tensor:
        if self.backend == "triton":
            from dsq.kernels import int4_gemm

            t = self.tensors(expert)
            y = int4_gemm(x.reshape(-1, x.shape[-1]), t["weight_packed"], t["weight_scale"],
                          t.get("weight_zero_point"))
            return y.view(*x.shape[:-1], -1)
        return F.linear(x, self.dequantize(expert).to(x.dtype))


class Experts(nn.Module):
    """E routed SwiGLU experts: y[n] = sum_j w[n, j] * down_e(silu(gate_e x[n]) * up_e x[n]), e = idx[n, j].

    w1 (gate), w2 (down), w3 (up) are linear modules of one format stacked over the experts."""

    def __init__(self, n_experts: int, dim: int, inter: int, make: Callable[..., Linear] = Linear,
                 dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.n_experts = n_experts
        self.backend = "torch"
        self.w1 = make(dim, inter, n_experts=n_experts, dtype=dtype)
        self.w2 = make(inter, dim, n_experts=n_experts, dtype=dtype)
        self.w3 = make(dim, inter, n_experts=n_experts, dtype=dtype)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.backend == "triton" and type(self.w1) is not Linear:
            from dsq.kernels import fused_moe

            return fused_moe(x, idx, weight, self.w1.tensors(), self.w2.tensors(), self.w3.tensors())
        n, k = idx.shape
        flat = idx.flatten()
        order = flat.argsort()  # (token, slot) pairs grouped by expert
        counts = torch.bincount(flat, minlength=self.n_experts).tolist()
        h = x.new_empty(n * k, x.shape[1])
        start = 0
        for e, count in enumerate(counts):  # reference path: one expert at a time, only experts with tokens
            if count:
                sel = order[start:start + count]
                xe = x[sel // k]
                h[sel] = self.w2(F.silu(self.w1(xe, e)) * self.w3(xe, e), e)
                start += count
        return (h.view(n, k, -1).float() * weight[..., None]).sum(dim=1).to(x.dtype)


# --- formats declared by a checkpoint's quantization_config (compressed-tensors) -----------------------
def linear_format(weights: dict[str, Any] | None, where: str) -> Callable[..., Linear]:
    """The module class for a compressed-tensors `weights` args dict (None: unquantized)."""
    if weights is None:
        return Linear
    bits, kind, strategy = weights.get("num_bits"), weights.get("type"), weights.get("strategy")
    if bits == 8 and kind == "float" and strategy in ("channel", "block"):
        if strategy == "block" and list(weights.get("block_structure") or [128, 128]) != [128, 128]:
            raise DsqError(f"{where}: FP8 block_structure {weights['block_structure']} is not supported (128x128)")
        return partial(FP8Linear, block=strategy == "block")
    if bits == 4 and kind == "int" and strategy == "group":
        return partial(Int4Linear, group=int(weights["group_size"]), symmetric=bool(weights.get("symmetric", True)))
    raise DsqError(f"{where}: weight scheme {bits}-bit {kind} {strategy} is not supported "
                   "(FP8 channel/block, INT4 group)")


class Scheme:
    """Which format each module of a checkpoint has, from config.json's `quantization_config`.

    Matching follows compressed-tensors: `ignore` first; then a group naming the module exactly; then one
    whose `re:` regex matches it (re.match: anchored at the start, as compressed-tensors and vLLM read it);
    then a group targeting the class `Linear`."""

    def __init__(self, qcfg: dict[str, Any] | None, where: str = "config.json"):
        self.where = where
        self.groups: list[tuple[list[str], dict[str, Any] | None]] = []
        self.ignore: list[str] = []
        if qcfg is None:
            return
        method = qcfg.get("quant_method")
        if method != "compressed-tensors":
            raise DsqError(f"{where}: quant_method {method!r} is not supported; dsq reads compressed-tensors "
                           "folders (made by `dsq quantize`) or unquantized ones")
        for name, group in qcfg.get("config_groups", {}).items():
            acts = group.get("input_activations")
            if acts is not None and not acts.get("dynamic", False):
                raise DsqError(f"{where}: group {name} has static activation scales; only dynamic ones are supported")
            self.groups.append((list(group.get("targets", [])), group.get("weights")))
        self.ignore = list(qcfg.get("ignore", []))

    @staticmethod
    def _match(target: str, module: str) -> bool:
        return bool(re.match(target[3:], module)) if target.startswith("re:") else target == module

    def format(self, module: str) -> Callable[..., Linear]:
        """The module class for the HF linear module named `module`."""
        if any(self._match(t, module) for t in self.ignore):
            return Linear
        for matches in (lambda t: t == module, lambda t: t.startswith("re:") and self._match(t, module),
                        lambda t: t == "Linear"):
            for targets, weights in self.groups:
                if any(matches(t) for t in targets):
                    return linear_format(weights, f"{self.where}: {module}")
        return Linear
