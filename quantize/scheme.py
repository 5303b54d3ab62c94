"""The quantization options: which format each tensor gets, and the compressed-tensors config that says so.

One table (dsq.checkpoint.ROLES) maps a Hugging Face module name to its role; it decides the format of every tensor and
also writes the `targets` / `ignore` entries of `quantization_config`, so the two cannot disagree. The config is
written so that every reader resolves it the same way (docs/quantization.md, "Who reads the folder"): the INT4 group
names the routed experts by regex, the FP8 group targets the class `Linear` (whatever linear module no regex claims),
and `ignore` lists every linear module that stays unquantized.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import torch

from dsq.checkpoint import DTYPES, ROLES
from dsq.checkpoint import role as module_role
from dsq.errors import DsqError
from dsq.formats import Format, FP8Block, FP8Channel, Int4Group

CHOICES = {  # the roles a flag sets, and the formats each may take (first = default)
    "experts": ("int4", "fp8", "bf16"),
    "shared": ("fp8", "bf16"),
    "dense": ("fp8", "bf16"),
    "attention": ("fp8", "bf16"),
    "head": ("bf16", "fp8"),
}
FLAG = {"head": "--lm-head"}  # role -> CLI flag, where it is not --<role>
GROUP_SIZES = (32, 64, 128)


def flag(role: str) -> str:
    return FLAG.get(role, f"--{role}")


@dataclass(frozen=True)
class Options:
    """What `dsq quantize` makes; the defaults are the issue's scheme (FP8 W8A8 + INT4 g128 experts)."""

    experts: str = "int4"
    shared: str = "fp8"
    dense: str = "fp8"
    attention: str = "fp8"
    head: str = "bf16"
    group_size: int = 128
    symmetric: bool = True
    clip_search: bool = True
    fp8_block: bool = False  # 128x128 block scales instead of one per output channel
    keep_dtype: bool = False  # keep fp32 unquantized tensors fp32 instead of casting them to bf16

    def __post_init__(self) -> None:
        for role, allowed in CHOICES.items():
            if getattr(self, role) not in allowed:
                raise DsqError(f"{flag(role)} {getattr(self, role)!r}: not one of {', '.join(allowed)}")
        if self.group_size not in GROUP_SIZES:
            raise DsqError(f"--group-size {self.group_size}: not one of {', '.join(map(str, GROUP_SIZES))}")

    def to_dict(self) -> dict:
        return asdict(self)

    def flags(self) -> list[str]:
        """The `dsq quantize` flags that give these options (the defaults' are left out)."""
        out = [f"{flag(r)} {getattr(self, r)}" for r in CHOICES if getattr(self, r) != getattr(Options, r)]
        out += [f"--group-size {self.group_size}"] if self.group_size != Options.group_size else []
        return out + [f for f, on in (("--asymmetric", not self.symmetric), ("--no-clip-search", not self.clip_search),
                                      ("--fp8-scales block", self.fp8_block), ("--keep-dtype", self.keep_dtype)) if on]

    def format(self, role: str) -> str:
        """int4, fp8, or keep (unquantized: bf16, or the source dtype; see `task_for`)."""
        fmt = getattr(self, role) if role in CHOICES else "keep"
        return "keep" if fmt == "bf16" else fmt

    def storage(self, role: str) -> Format | None:
        """The storage format of a role's weights; None where they are kept as they are (cast at most)."""
        fmt = self.format(role)
        if fmt == "int4":
            return Int4Group(self.group_size, self.symmetric)
        if fmt == "fp8":
            return FP8Block() if self.fp8_block else FP8Channel()
        return None


def role_of(name: str) -> str:
    """The role of a source tensor: its module's (dsq.checkpoint.ROLES) for a `.weight`, else other."""
    return module_role(name) if name.endswith(".weight") else "other"


@dataclass(frozen=True)
class Out:
    """One tensor written to the output."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class Task:
    """One source tensor: what it is, how it is converted, and the tensors it becomes."""

    name: str
    role: str
    fmt: Format | None  # None: kept (cast to `outs[0].dtype` at most)
    shape: tuple[int, ...]
    dtype: torch.dtype
    outs: tuple[Out, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def out_nbytes(self) -> int:
        return sum(o.nbytes for o in self.outs)


def task_for(name: str, shape: list[int], dtype: str, opts: Options, where: str) -> Task:
    """The conversion of one source tensor; refuses, naming tensor and flag, what the options cannot do.
    `source.check_tensors` has already checked its dtype (a float) and its shape (the config's)."""
    src = DTYPES[dtype]
    role = role_of(name)
    storage = opts.storage(role)
    shape_t = tuple(shape)
    if storage is None:
        keep = src if (opts.keep_dtype or src != torch.float32) else torch.bfloat16
        return Task(name, role, None, shape_t, src, (Out(name, keep, shape_t),))
    assert len(shape) == 2, (name, shape)  # the config's shape of a linear weight
    module = name.removesuffix(".weight")
    out_f, in_f = shape_t
    if isinstance(storage, Int4Group) and in_f % storage.group:
        raise DsqError(f"{where}: tensor {name} has {in_f} input features, not a multiple of --group-size "
                       f"{storage.group}; choose a group size that divides it, or {flag(role)} fp8")
    outs = [Out(f"{module}.{n}", t.dtype, t.shape) for n, t in storage.spec(out_f, in_f, src).items()]
    return Task(name, role, storage, shape_t, src, tuple(outs))


def _target(role: str) -> str:
    rx = dict(ROLES)[role]
    return rx if re.fullmatch(r"[\w.]+", rx) else f"re:{rx}$"


def quantization_config(opts: Options) -> dict | None:
    """The compressed-tensors `quantization_config` for these options (None when nothing is quantized).

    Every reader tries a name regex before a class, so the INT4 group (first) names the routed experts by regex
    and the FP8 group takes the class `Linear`: any other linear module. No FP8 target may be a regex naming
    "experts": transformers' dequantize mode reads every non-expert module with the first group that has none.
    `ignore` lists what stays unquantized: the router, the roles the options keep, and the embeddings and norms
    (no Linear, but compressed-tensors' model-free converter matches by name and would take them as `Linear`)."""
    by_fmt: dict[str, list[str]] = {"int4": [], "fp8": [], "keep": []}
    for role in CHOICES:
        by_fmt[opts.format(role)].append(_target(role))
    if not by_fmt["int4"] and not by_fmt["fp8"]:
        return None
    groups = []
    if by_fmt["int4"]:
        weights, acts = Int4Group(opts.group_size, opts.symmetric).args()
        groups.append({"targets": by_fmt["int4"], "weights": weights, "input_activations": acts,
                       "format": "pack-quantized"})
    if by_fmt["fp8"]:
        weights, acts = (FP8Block() if opts.fp8_block else FP8Channel()).args()
        groups.append({"targets": ["Linear"], "weights": weights, "input_activations": acts,
                       "format": "float-quantized"})
    return {
        "quant_method": "compressed-tensors",
        "format": "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": {f"group_{i}": g for i, g in enumerate(groups)},
        "ignore": [_target("router"), *by_fmt["keep"], _target("embed"), _target("norm")],
        "kv_cache_scheme": None,
    }


def reader_warnings(opts: Options) -> list[str]:
    """Why another reader will not load a folder made with these options: vLLM as read in its compressed-tensors
    loader, transformers 5.24 as run (dsq and compressed-tensors' dequantizer load every option)."""
    warnings = []
    if opts.experts == "int4" and not opts.symmetric:
        warnings.append("--asymmetric: vLLM and transformers will not load this folder (vLLM's compressed-tensors "
                        "MoE methods accept only symmetric INT4 experts; transformers dequantizes experts without "
                        "zero points)")
    if opts.head == "fp8":
        warnings.append("--lm-head fp8: vLLM will not load this folder (it builds the LM head unquantized, with no "
                        "place for its FP8 scale)")
    if opts.fp8_block:
        warnings.append("--fp8-scales block: transformers' default mode loads this folder only if every FP8 "
                        "module's input size is a multiple of 128 (V2-Lite's dense down_proj, 10944, is not); "
                        "its dequantize=True mode loads it")
    return warnings
