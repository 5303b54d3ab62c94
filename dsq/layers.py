"""The seam every weight matmul goes through: a linear module (a storage format + a forward), routed experts,
and the RMSNorm that feeds them (one fused kernel with the residual add on the Triton backend).

A `Linear` holds its weight as its format's stored tensors (compressed-tensors names: `weight`, or
`weight_packed` + `weight_scale` + ...), optionally stacked over a leading expert dim; the maths is the
format's (dsq.formats). `backend` picks it: "torch" (the dsq.quant references, any device) or "triton"
(dsq.kernels); it is fixed when the module is built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsq.errors import DsqError
from dsq.formats import BF16, Format, FP8Channel, Scheme

BACKENDS = ("torch", "triton")


class Linear(nn.Module):
    """y = x W^T for a weight [out, in] stored in `fmt`; with `n_experts`, one such weight per expert."""

    def __init__(self, in_features: int, out_features: int, fmt: Format = BF16, n_experts: int = 0,
                 dtype: torch.dtype = torch.bfloat16, backend: str = "torch"):
        super().__init__()
        self.in_features, self.out_features, self.n_experts = in_features, out_features, n_experts
        self.fmt, self.backend = fmt, backend
        lead = (n_experts,) if n_experts else ()
        for name, s in fmt.spec(out_features, in_features, dtype).items():
            self.register_buffer(name, torch.empty(*lead, *s.shape, dtype=s.dtype))

    def tensors(self, expert: int | None = None) -> dict[str, torch.Tensor]:
        return {n: (b if expert is None else b[expert]) for n, b in self.named_buffers(recurse=False)}

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """A float [out, in] weight -> its stored tensors (quantize on load, benchmarks)."""
        return self.fmt.quantize(w).tensors

    def dequantize(self, expert: int | None = None) -> torch.Tensor:
        return self.fmt.dequantize(self.tensors(expert))

    def forward(self, x: torch.Tensor, expert: int | None = None) -> torch.Tensor:
        return self.fmt.linear(x, self.tensors(expert), self.backend)

    def extra_repr(self) -> str:
        experts = f", experts={self.n_experts}" if self.n_experts else ""
        return f"{self.fmt}, in={self.in_features}, out={self.out_features}{experts}, backend={self.backend}"


def project(x: torch.Tensor, *linears: Linear) -> list[torch.Tensor]:
    """The same input through several linear modules. FP8 ones of one format on the Triton backend share one
    activation quantization (act_quant once, then fp8_gemm_q per weight) when the batch is past the size
    where fp8_gemm quantizes inside the GEMM; the results are the same as calling each module."""
    fmt = linears[0].fmt
    if (len(linears) < 2 or not isinstance(fmt, FP8Channel) or any(m.fmt != fmt for m in linears)
            or linears[0].backend != "triton"):
        return [m(x) for m in linears]
    from dsq.kernels import act_quant, fp8_gemm_q
    from dsq.kernels.fp8_gemm import SMALL_M

    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] <= SMALL_M:
        return [m(x) for m in linears]
    xq, xs = act_quant(flat, fmt.act_group)
    return [fp8_gemm_q(xq, xs, m.weight, m.weight_scale, x.dtype).view(*x.shape[:-1], -1) for m in linears]


class Experts(nn.Module):
    """E routed SwiGLU experts: y[n] = sum_j w[n, j] * down_e(silu(gate_e x[n]) * up_e x[n]), e = idx[n, j].

    gate_proj, up_proj, down_proj are linear modules of one format stacked over the experts."""

    def __init__(self, n_experts: int, dim: int, inter: int, fmt: Format = BF16, dtype: torch.dtype = torch.bfloat16,
                 backend: str = "torch"):
        super().__init__()
        self.n_experts, self.fused = n_experts, backend == "triton" and fmt != BF16
        self.gate_proj = Linear(dim, inter, fmt, n_experts, dtype, backend)
        self.up_proj = Linear(dim, inter, fmt, n_experts, dtype, backend)
        self.down_proj = Linear(inter, dim, fmt, n_experts, dtype, backend)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor,
                add: torch.Tensor | None = None) -> torch.Tensor:
        """y [N, D], plus add [N, D] (the shared experts' output): in the fused kernel's last launch."""
        if self.fused:
            from dsq.kernels import fused_moe

            return fused_moe(x, idx, weight, self.gate_proj.tensors(), self.down_proj.tensors(), self.up_proj.tensors(),
                             add)
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
                h[sel] = self.down_proj(F.silu(self.gate_proj(xe, e)) * self.up_proj(xe, e), e)
                start += count
        y = (h.view(n, k, -1).float() * weight[..., None]).sum(dim=1).to(x.dtype)
        return y if add is None else y + add


class Build:
    """How the model's linear modules are made: each in the format `scheme` declares for its HF name, in
    `dtype` (unquantized weights), computing with `backend`."""

    def __init__(self, scheme: Scheme | None, dtype: torch.dtype, backend: str = "torch"):
        self.scheme, self.dtype, self.backend = scheme or Scheme(None), dtype, backend

    def linear(self, name: str, in_features: int, out_features: int) -> Linear:
        return Linear(in_features, out_features, self.scheme.format(name), dtype=self.dtype, backend=self.backend)

    def experts(self, name: str, experts: range, dim: int, inter: int) -> Experts:
        """This rank's routed experts of one layer, stacked; they must share one format."""
        fmts = {self.scheme.format(f"{name}.{e}.{p}_proj") for e in (experts or range(1))
                for p in ("gate", "up", "down")}
        if len(fmts) != 1:
            raise DsqError(f"{self.scheme.where}: the routed experts of {name} mix formats; "
                           "dsq needs one format for all experts of a layer")
        return Experts(len(experts), dim, inter, fmts.pop(), self.dtype, self.backend)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight, in fp32; on the Triton backend one kernel (kernels/norm.py)."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype, backend: str = "torch"):
        super().__init__()
        self.eps, self.backend = eps, backend
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "triton":
            from dsq.kernels import add_rms_norm

            return add_rms_norm(x, self.weight, self.eps).out
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + residual, its norm): one kernel on the Triton backend."""
        if self.backend == "triton":
            from dsq.kernels import add_rms_norm

            return add_rms_norm(x, self.weight, self.eps, residual)[:2]
        x = x + residual
        return x, self(x)
