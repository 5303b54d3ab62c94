"""One object per storage format of a linear weight, and `Scheme`, which says which module has which.

A format knows everything about its weight's life: the tensors it is stored as (names, shapes, dtypes:
compressed-tensors names), how a float weight becomes them and back (dsq.quant's maths), how a forward
runs over them, which rows / columns must stay on one tensor-parallel rank, and its compressed-tensors
`weights` / `input_activations` arguments (to config.json and from it). The runtime (dsq.layers), the
quantizer (dsq.quantize), the shard plan (dsq.parallel) and the memory planner all read it from here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F

from dsq import quant
from dsq.checkpoint import role
from dsq.errors import DsqError

Args = dict[str, Any]


class Stored(NamedTuple):
    """One stored tensor of an [out, in] weight; `unit`: weight (rows, columns) per stored (row, column),
    or None for a tensor that is not a slice of the weight (INT4's `weight_shape`)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    unit: tuple[int, int] | None = (1, 1)


class Quantized(NamedTuple):
    """A weight's stored tensors and its squared Frobenius error and norm (the quantizer's report)."""

    tensors: dict[str, torch.Tensor]
    err2: float
    norm2: float


@dataclass(frozen=True)
class Format:
    """Unquantized: `weight` [out, in] in the model dtype (BF16 on GPU, FP32 for the CPU reference)."""

    name = "bf16"

    def spec(self, out_features: int, in_features: int, dtype: torch.dtype) -> dict[str, Stored]:
        return {"weight": Stored((out_features, in_features), dtype)}

    def quantize(self, w: torch.Tensor, clip_search: bool = True) -> Quantized:
        return Quantized({"weight": w}, 0.0, 0.0)

    def dequantize(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        return t["weight"]

    def linear(self, x: torch.Tensor, t: dict[str, torch.Tensor], backend: str) -> torch.Tensor:
        return F.linear(x, self.dequantize(t).to(x.dtype))

    def split_unit(self, dim: int) -> tuple[int, str]:
        """Weight rows (dim 0) or columns (dim 1) that must stay on one rank, and why: the lcm of the
        stored tensors' units, so that no rank holds part of a scale block, group or packed word."""
        spec = self.spec(1024, 1024, torch.bfloat16)  # (the units do not depend on the sizes)
        unit = math.lcm(*(s.unit[dim] for s in spec.values() if s.unit is not None))
        return unit, self.why(dim) if unit > 1 else ""

    def why(self, dim: int) -> str:
        return ""

    def args(self) -> tuple[Args, Args | None] | None:
        """compressed-tensors (`weights`, `input_activations`); None: not quantized."""
        return None

    def _measured(self, w: torch.Tensor, tensors: dict[str, torch.Tensor]) -> Quantized:
        f = w.float()
        err = torch.linalg.vector_norm(self.dequantize(tensors).float().sub_(f)).item() ** 2
        return Quantized(tensors, err, torch.linalg.vector_norm(f).item() ** 2)


BF16 = Format()


@dataclass(frozen=True)
class FP8Channel(Format):
    """FP8 e4m3 weight with one fp32 scale per output channel; activations quantized per token at run time."""

    name = "fp8"

    def spec(self, out_features: int, in_features: int, dtype: torch.dtype) -> dict[str, Stored]:
        return {"weight": Stored((out_features, in_features), quant.FP8),
                "weight_scale": Stored((out_features, 1), torch.float32)}  # one column: never split

    def quantize(self, w: torch.Tensor, clip_search: bool = True) -> Quantized:
        q, scale = quant.fp8_quantize_weight(w, block=self.block)
        return self._measured(w, {"weight": q, "weight_scale": scale})

    def dequantize(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        return quant.fp8_dequantize_weight(t["weight"], t["weight_scale"])

    def linear(self, x: torch.Tensor, t: dict[str, torch.Tensor], backend: str) -> torch.Tensor:
        if backend == "triton":
            from dsq.kernels import fp8_gemm

            return fp8_gemm(x.reshape(-1, x.shape[-1]), t["weight"], t["weight_scale"]).view(*x.shape[:-1], -1)
        return quant.fp8_linear(x, t["weight"], t["weight_scale"])

    block: ClassVar[bool] = False
    act_group: ClassVar[int | None] = None  # activation scales per token (None) or per 1 x act_group slice

    def args(self) -> tuple[Args, Args | None]:
        fp8 = {"num_bits": 8, "type": "float", "symmetric": True}
        if self.block:
            return (dict(fp8, strategy="block", block_structure=[quant.BLOCK, quant.BLOCK], dynamic=False),
                    dict(fp8, strategy="group", group_size=quant.BLOCK, dynamic=True))
        return dict(fp8, strategy="channel", dynamic=False), dict(fp8, strategy="token", dynamic=True)


@dataclass(frozen=True)
class FP8Block(FP8Channel):
    """FP8 e4m3 weight with one fp32 scale per 128x128 block (DeepSeek-V3's); activations per 1x128 group."""

    block: ClassVar[bool] = True
    act_group: ClassVar[int | None] = quant.BLOCK

    def why(self, dim: int) -> str:
        return f"FP8 {quant.BLOCK}x{quant.BLOCK} block scales"

    def spec(self, out_features: int, in_features: int, dtype: torch.dtype) -> dict[str, Stored]:
        b = quant.BLOCK
        return {"weight": Stored((out_features, in_features), quant.FP8),
                "weight_scale": Stored((-(-out_features // b), -(-in_features // b)), torch.float32, (b, b))}


@dataclass(frozen=True)
class Int4Group(Format):
    """INT4 weight with a bf16 scale per `group` inputs (and a zero point when asymmetric); W4A16."""

    group: int = 128
    symmetric: bool = True
    name = "int4"

    def spec(self, out_features: int, in_features: int, dtype: torch.dtype) -> dict[str, Stored]:
        o, i, g = out_features, in_features, self.group
        if i % g or i % 8:
            raise DsqError(f"INT4 group size {g} does not divide in_features={i}")
        spec = {"weight_packed": Stored((o, i // 8), torch.int32, (1, 8)),
                "weight_scale": Stored((o, i // g), torch.bfloat16, (1, g)),
                "weight_shape": Stored((2,), torch.int64, None)}
        if not self.symmetric:
            spec["weight_zero_point"] = Stored((-(-o // 8), i // g), torch.int32, (8, g))
        return spec

    def why(self, dim: int) -> str:
        return f"INT4 groups of {self.group} inputs" if dim == 1 else "INT4 zero points packed 8 rows to a word"

    def quantize(self, w: torch.Tensor, clip_search: bool = True) -> Quantized:
        """Round-to-nearest with the per-group MSE clip search (dsq.quant.int4_search)."""
        r = quant.int4_search(w, self.group, self.symmetric, quant.GRID if clip_search else (1.0,))
        out = {"weight_packed": quant.int4_pack(r.q), "weight_scale": r.scale,
               "weight_shape": torch.tensor(w.shape, dtype=torch.int64)}
        if r.zero is not None:
            out["weight_zero_point"] = quant.int4_pack(r.zero, dim=0)
        return Quantized(out, r.err2, r.norm2)

    def dequantize(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        return quant.int4_dequantize(t["weight_packed"], t["weight_scale"], t.get("weight_zero_point"))

    def linear(self, x: torch.Tensor, t: dict[str, torch.Tensor], backend: str) -> torch.Tensor:
        if backend == "triton":
            from dsq.kernels import int4_gemm

            y = int4_gemm(x.reshape(-1, x.shape[-1]), t["weight_packed"], t["weight_scale"],
                          t.get("weight_zero_point"))
            return y.view(*x.shape[:-1], -1)
        return F.linear(x, self.dequantize(t).to(x.dtype))

    def args(self) -> tuple[Args, Args | None]:
        return ({"num_bits": 4, "type": "int", "symmetric": self.symmetric, "strategy": "group",
                 "group_size": self.group, "dynamic": False}, None)


def from_args(weights: Args | None, where: str) -> Format:
    """The format of a compressed-tensors `weights` args dict (None: unquantized)."""
    if weights is None:
        return BF16
    bits, kind, strategy = weights.get("num_bits"), weights.get("type"), weights.get("strategy")
    if bits == 8 and kind == "float" and strategy == "channel":
        return FP8Channel()
    if bits == 8 and kind == "float" and strategy == "block":
        if list(weights.get("block_structure") or [128, 128]) != [quant.BLOCK, quant.BLOCK]:
            raise DsqError(f"{where}: FP8 block_structure {weights['block_structure']} is not supported (128x128)")
        return FP8Block()
    if bits == 4 and kind == "int" and strategy == "group":
        return Int4Group(int(weights["group_size"]), bool(weights.get("symmetric", True)))
    raise DsqError(f"{where}: weight scheme {bits}-bit {kind} {strategy} is not supported "
                   "(FP8 channel/block, INT4 group)")


class Scheme:
    """Which format each module of a checkpoint has, from config.json's `quantization_config`.

    Matching follows compressed-tensors: `ignore` first; then a group naming the module exactly; then one
    whose `re:` regex matches it (re.match: anchored at the start, as compressed-tensors and vLLM read it);
    then a group targeting the class `Linear`."""

    def __init__(self, qcfg: Args | None, where: str = "config.json"):
        self.where = where
        self.groups: list[tuple[list[str], Format]] = []
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
            fmt = from_args(group.get("weights"), f"{where}: group {name}")
            self.groups.append((list(group.get("targets", [])), fmt))
        self.ignore = list(qcfg.get("ignore", []))

    @classmethod
    def by_role(cls, formats: dict[str, Format], where: str) -> Scheme:
        """Formats by role (dsq.checkpoint.ROLES; unnamed roles unquantized), for quantizing while loading:
        the formats `dsq quantize` declares for the same choices."""
        scheme = cls(None, where)
        scheme.roles = formats
        return scheme

    roles: dict[str, Format] | None = None

    def uses(self, kind: type[Format]) -> bool:
        """Whether some module may be stored in a format of this kind."""
        return any(isinstance(f, kind) for f in [*(f for _, f in self.groups), *(self.roles or {}).values()])

    @staticmethod
    def _match(target: str, module: str) -> bool:
        return bool(re.match(target[3:], module)) if target.startswith("re:") else target == module

    def format(self, module: str) -> Format:
        """The format of the HF linear module named `module`."""
        if self.roles is not None:
            return self.roles.get(role(f"{module}.weight"), BF16)
        if any(self._match(t, module) for t in self.ignore):
            return BF16
        for matches in (lambda t: t == module, lambda t: t.startswith("re:") and self._match(t, module),
                        lambda t: t == "Linear"):
            for targets, fmt in self.groups:
                if any(matches(t) for t in targets):
                    return fmt
        return BF16


# The named schemes (load_quantized(quantize=...), dsq inspect): the format of each role (dsq.checkpoint.ROLES)
# as `dsq quantize` writes it with its defaults (fp8-int4) or with --experts fp8 (fp8); other roles stay BF16.
_FP8 = dict.fromkeys(("shared", "dense", "attention"), FP8Channel())
SCHEMES: dict[str, dict[str, Format]] = {"fp8-int4": {"experts": Int4Group(128), **_FP8},
                                         "fp8": {"experts": FP8Channel(), **_FP8}}
