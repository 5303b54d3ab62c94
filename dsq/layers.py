"""The seam every weight matmul goes through: a linear module (a storage format + a forward), routed experts,
the RMSNorm that feeds them (one fused kernel with the residual add on the Triton backend), and the
vocab-parallel token embedding.

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
from dsq.parallel import Dist
from dsq.quant import BLOCK

BACKENDS = ("torch", "triton")


def check_backend(backend: str) -> None:
    """Refuse an unknown backend, and "triton" where Triton is not installed: dsq installs it on Linux only, and
    the torch backend, which never imports it, runs everywhere."""
    if backend not in BACKENDS:
        raise DsqError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "triton":
        try:
            import triton  # noqa: F401
        except ImportError:
            raise DsqError("backend 'triton' needs Triton (pip install triton, Linux with an NVIDIA GPU); "
                           "backend 'torch' runs without it") from None


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


def join(*linears: Linear) -> None:
    """Store linear modules that read the same input (q_proj and kv_a_proj_with_mqa, gate_proj and up_proj) as
    one weight [sum of out, in], each module's tensors becoming row views of it, so that `project` runs them as
    one GEMM: one launch and one activation quantization instead of one each. Only where the rows concatenate
    in their format: one format, and under 128x128 block scales every module but the last a whole number of
    blocks. Call once their tensors are loaded and on their device (moving the model afterwards unjoins them)."""
    fmt = linears[0].fmt
    if any(m.fmt != fmt or m.n_experts for m in linears) or (getattr(fmt, "block", False) and any(
            m.out_features % BLOCK for m in linears[:-1])):
        return
    with torch.device("meta"):  # its tensors are set below
        whole = Linear(linears[0].in_features, sum(m.out_features for m in linears), fmt,
                       backend=linears[0].backend)
    for name in whole.tensors():
        parts = [m.tensors()[name] for m in linears]
        setattr(whole, name, torch.cat(parts))
        for m, view in zip(linears, getattr(whole, name).split([p.shape[0] for p in parts]), strict=True):
            setattr(m, name, view)
    linears[0].joined = (whole, linears)  # a plain attribute: not a submodule, not in the state dict


def fp8_input(*linears: Linear) -> FP8Channel | None:
    """The FP8 format of linear modules reading one input when they can share its activation quantization (one
    FP8 format, the Triton backend), else None."""
    fmt = linears[0].fmt if linears else None
    ok = isinstance(fmt, FP8Channel) and all(m.fmt == fmt and m.backend == "triton" for m in linears)
    return fmt if ok else None


def project(x: torch.Tensor, *linears: Linear, xq: tuple[torch.Tensor, torch.Tensor] | None = None
            ) -> list[torch.Tensor]:
    """The same input through several linear modules, as calling each: one GEMM over their joined weight when
    they were joined (`join`); FP8 ones share one activation quantization, `xq` (act_quant's (q, scale) of x,
    made by the norm before: kernels/norm.py) or one made here."""
    whole, parts = getattr(linears[0], "joined", (None, ()))
    mods = [whole] if parts == linears else list(linears)
    fmt = fp8_input(*linears)
    if fmt is None:
        outs = [m(x) for m in mods]
    else:
        from dsq.kernels import act_quant, fp8_gemm_q

        q, scale = xq if xq is not None else act_quant(x.reshape(-1, x.shape[-1]), fmt.act_group)
        outs = [fp8_gemm_q(q, scale, m.weight, m.weight_scale, x.dtype).view(*x.shape[:-1], -1) for m in mods]
    return list(outs[0].split([m.out_features for m in linears], dim=-1)) if parts == linears else outs


def swiglu(x: torch.Tensor, gate: Linear, up: Linear, down: Linear,
           xq: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """down(silu(gate x) * up x), the dense layers' and shared experts' MLP (`xq` as for `project`). With FP8
    weights on the Triton backend silu * up is one kernel that also quantizes the product for down's GEMM."""
    g, u = project(x, gate, up, xq=xq)
    if fp8_input(down) is None:
        return down(F.silu(g) * u)
    from dsq.kernels import fp8_gemm_q, silu_mul_quant

    lead, n = g.shape[:-1], g.shape[-1]
    q, scale = silu_mul_quant(g.reshape(-1, n), u.reshape(-1, n), down.fmt.act_group)
    return fp8_gemm_q(q, scale, down.weight, down.weight_scale, x.dtype).view(*lead, -1)


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

    def partial(self, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, lo: int) -> torch.Tensor:
        """The share of y of these experts when they are experts [lo, lo + n) of more (expert parallel): each
        (token, slot) routed here runs as a token with one slot, added back to its token; the rest of the sum
        is other ranks'."""
        token, slot = ((idx >= lo) & (idx < lo + self.n_experts)).nonzero(as_tuple=True)
        y = torch.zeros_like(x)
        if len(token):
            y.index_add_(0, token, self(x[token], idx[token, slot, None] - lo, weight[token, slot, None]))
        return y


class Build:
    """How the model's linear modules are made: each in the format `scheme` declares for its HF name, in
    `dtype` (unquantized weights), computing with `backend`."""

    def __init__(self, scheme: Scheme | None, dtype: torch.dtype, backend: str = "torch"):
        check_backend(backend)
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

    def add(self, x: torch.Tensor, residual: torch.Tensor | None, quant: FP8Channel | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """(x + residual, its norm, the norm's FP8 quantization for linear modules in `quant`'s format, or None),
        x itself without a residual: one kernel on the Triton backend."""
        if self.backend == "triton":
            from dsq.kernels import add_rms_norm

            n = add_rms_norm(x, self.weight, self.eps, residual, quant=quant is not None,
                             group=quant.act_group if quant else None)
            return n.x, n.out, None if quant is None else (n.q, n.scale)
        x = x if residual is None else x + residual
        return x, self(x), None


class Embedding(nn.Module):
    """Token embedding, vocab-parallel on N ranks: this rank holds rows [lo, hi); other rows look up zeros
    here and the all-reduce fills them in from the rank that holds them."""

    def __init__(self, dim: int, dtype: torch.dtype, dist: Dist):
        super().__init__()
        self.dist, (self.lo, self.hi) = dist, dist.shard.vocab
        self.weight = nn.Parameter(torch.empty(self.hi - self.lo, dim, dtype=dtype), requires_grad=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.dist.world == 1:
            return F.embedding(tokens, self.weight)
        here = (tokens >= self.lo) & (tokens < self.hi)
        x = F.embedding((tokens - self.lo) * here, self.weight).masked_fill_(~here[..., None], 0)
        return self.dist.all_reduce(x)
