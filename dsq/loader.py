"""Build a Transformer from a checkpoint folder: config -> modules in the declared formats -> tensors.

The model carries the Hugging Face names; per-expert tensors land in one slot of a stacked weight.
On N ranks (dsq/parallel.py) each rank reads only its own slices (safetensors get_slice) and its own
experts; the other ranks' experts are never read."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from dsq.checkpoint import Checkpoint, check_config
from dsq.config import Config
from dsq.errors import DsqError
from dsq.formats import BF16, Scheme
from dsq.layers import Linear
from dsq.model import Transformer
from dsq.parallel import Dist, extents, shard_plan, splits

EXPERT = re.compile(r"(.*\.experts)\.(\d+)\.(.*)$")
PROGRESS = ".dsq-progress.json"  # what an unfinished `dsq quantize` output holds (dsq/quantize/resume.py)


def stacked(hf: str) -> tuple[str, int | None]:
    """A checkpoint name -> (the model's name, expert slot): routed experts are stacked, so
    `...mlp.experts.7.gate_proj.weight` is slot 7 of `...mlp.experts.gate_proj.weight`."""
    m = EXPERT.match(hf)
    return (f"{m[1]}.{m[3]}", int(m[2])) if m else (hf, None)


def unstacked(name: str, expert: int | None) -> str:
    """The inverse of `stacked`."""
    if expert is None:
        return name
    experts, _, rest = name.partition(".experts.")
    return f"{experts}.experts.{expert}.{rest}"


def checkpoint_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's tensors that come from a checkpoint: its parameters and persistent buffers (not those
    derived at load, such as the rope frequencies and the absorbed attention weights)."""
    persistent = model.state_dict(keep_vars=True).keys()
    return {n: t for n, t in [*model.named_parameters(), *model.named_buffers()] if n in persistent}


def tensor_names(model: Transformer) -> Iterator[tuple[str, int | None, torch.Tensor]]:
    """(the model's name, expert slot or None, tensor) of every checkpoint tensor the model holds."""
    for name, t in checkpoint_tensors(model).items():
        if ".experts." in name:
            yield from ((name, e, t[e]) for e in range(t.shape[0]))
        else:
            yield name, None, t


def hf_tensors(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Every tensor an unquantized checkpoint of this config holds: HF name -> shape."""
    with torch.device("meta"):
        model = Transformer(cfg, torch.bfloat16)
    return {unstacked(n, e): tuple(t.shape) for n, e, t in tensor_names(model)}


def _read_slice(model: Transformer, ckpt: Checkpoint, hf: str, split: tuple[int, str, int], module: str,
                dst: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a tensor-parallel tensor, read without the rest of it.

    The rank holds rows (dim 0) or columns (dim 1) [a, b) of the logical [out, in] weight, L long. A stored
    tensor S long along that dim (the weight, packed words, group or block scales) holds them from a * S // L:
    exact, as the plan cuts on whole packing units. A [out, 1] channel scale keeps its one column."""
    dim, rng, width = split
    m = model.get_submodule(module)
    stored = m.fmt.spec(m.out_features, m.in_features, dst.dtype) if isinstance(m, Linear) else {}
    if hf.rpartition(".")[2] in stored and stored[hf.rpartition(".")[2]].unit is None:
        return torch.tensor([m.out_features, m.in_features])  # not a slice of the weight: this rank's [out, in]
    shape = ckpt.shape(hf)
    a = getattr(model.dist.shard, rng)[0] * width
    start = a * shape[dim] // (extents(model.cfg)[rng] * width)
    want = [*shape[:dim], dst.shape[dim], *shape[dim + 1:]]
    if list(dst.shape) != want or start + dst.shape[dim] > shape[dim]:
        raise DsqError(f"{ckpt.folder}: tensor {hf} has shape {shape}, which does not hold this rank's part "
                       f"{list(dst.shape)}; the checkpoint is not made for this config")
    index = tuple(slice(start, start + dst.shape[dim]) if d == dim else slice(None) for d in range(len(shape)))
    return ckpt.get(hf, index=index)


def _done(pending: dict[str, set[int] | None], name: str, expert: int | None) -> None:
    """Strike a loaded tensor (one expert's slot of a stacked one) off the list of those still to load."""
    if expert is None:
        pending.pop(name, None)
    else:
        pending[name].discard(expert)
        if not pending[name]:
            pending.pop(name)


def read_config(folder: Path) -> tuple[Config, Scheme]:
    """A model folder's Config and the formats its quantization_config declares."""
    hf_cfg_path = folder / "config.json"
    if not hf_cfg_path.exists() and (folder / PROGRESS).exists():
        command = unfinished_command(folder)
        how = f"run `{command}` again to finish it" if command else "run the same `dsq quantize` command again"
        raise DsqError(f"{folder}: is an unfinished dsq quantize output (no config.json yet); {how}")
    cfg = Config.from_file(hf_cfg_path)  # one line for a missing or invalid file
    hf_cfg = json.loads(hf_cfg_path.read_text())
    return cfg, Scheme(hf_cfg.get("quantization_config"), where=str(hf_cfg_path))


def unfinished_command(folder: Path) -> str | None:
    """The `dsq quantize` command line (options included) an unfinished output records, if it is readable."""
    try:
        state = json.loads((folder / PROGRESS).read_text())
        command = state["command"]
        if not isinstance(command, str) or not command.isprintable():
            raise TypeError(command)
        return command
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None


def load_model(folder: Path, device: torch.device, dtype: torch.dtype, rank: int = 0, world: int = 1,
               quantize: Scheme | None = None, **serving: Any) -> Transformer:
    """The model in the formats its config declares; on `world` ranks, rank `rank`'s part of it. `quantize`
    gives an unquantized checkpoint formats to be quantized into while loading, tensor by tensor. `serving`:
    Transformer's backend, kv_cache_dtype and cache_tokens."""
    cfg, scheme = read_config(folder)
    if quantize is not None:
        if scheme.groups:
            raise DsqError(f"{folder}: is already quantized; load it without quantize=")
        scheme = quantize
    ckpt = Checkpoint(folder)
    check_config(cfg, ckpt)
    with torch.device("meta"):
        model = Transformer(cfg, dtype, Dist(shard_plan(cfg, world, scheme), rank), scheme, **serving)
    model.to_empty(device=device)
    model.init_rope()
    load_tensors(model, ckpt, device, convert=quantize is not None)
    model.prepare()
    return model.eval()


def load_tensors(model: Transformer, ckpt: Checkpoint, device: torch.device, convert: bool = False) -> None:
    """Copy every checkpoint tensor (this rank's slice of it) into its slot; name the missing, unexpected
    and misshapen ones. With `convert`, a float weight of a quantized module is quantized on `device` first."""
    targets = checkpoint_tensors(model)
    pending = {n: set(range(model.get_submodule(n.rsplit(".", 2)[0]).n_experts)) if ".experts." in n else None
               for n in targets}
    unexpected = []
    split, (lo, hi) = (splits(model.cfg) if model.dist.world > 1 else {}), model.dist.shard.experts
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, Linear) and
                 m.fmt != BF16} if convert else {}
    for hf in ckpt.files:
        name, expert = stacked(hf)
        module, _, attr = name.rpartition(".")
        owner = quantized.get(module) if attr == "weight" else None  # a float weight to quantize on load
        if (name not in targets and owner is None) or (expert is not None and expert >= model.cfg.n_routed_experts):
            unexpected.append(hf)
            continue
        if expert is not None:
            if not lo <= expert < hi:
                continue  # another rank's expert
            expert -= lo
        if owner is not None:
            want = torch.empty(owner.out_features, owner.in_features, device="meta")
            w = _read(model, ckpt, hf, module, split.get(module), want)
            for key, t in owner.quantize(w.to(device)).items():
                owner.tensors(expert)[key].copy_(t)
                _done(pending, f"{module}.{key}", expert)
            continue
        dst = targets[name] if expert is None else targets[name][expert]
        src = _read(model, ckpt, hf, module, split.get(module), dst).to(device)
        if src.is_floating_point() != dst.is_floating_point() or (dst.element_size() == 1 and src.dtype != dst.dtype):
            raise DsqError(f"{ckpt.folder}: tensor {hf} is {src.dtype}, expected {dst.dtype} for this format")
        dst.copy_(src)
        _done(pending, name, expert)
    if model.cfg.tie_word_embeddings and "lm_head.weight" in pending:
        model.lm_head.weight = model.model.embed_tokens.weight
        pending.pop("lm_head.weight")
    refuse_names(ckpt.folder, [unstacked(n, None if e is None else min(e)) for n, e in pending.items()], unexpected)


def _read(model: Transformer, ckpt: Checkpoint, hf: str, module: str, split: tuple[int, str, int] | None,
          dst: torch.Tensor) -> torch.Tensor:
    """The tensor `hf` for the slot `dst`: this rank's slice of a `split` one, else all of it, at `dst`'s shape."""
    if split is not None:
        return _read_slice(model, ckpt, hf, split, module, dst)
    if list(dst.shape) != ckpt.shape(hf):
        raise DsqError(f"{ckpt.folder}: tensor {hf} has shape {ckpt.shape(hf)}, the config implies {list(dst.shape)}")
    return ckpt.get(hf)


def refuse_names(folder: Path, missing: list[str], unexpected: list[str]) -> None:
    """A checkpoint whose tensor names are not its config's, refused in one line (the loader's and the
    quantizer's message, naming the first three)."""
    for names, what in ((missing, "missing tensor(s) {}; the checkpoint is incomplete or not made for this config"),
                        (unexpected, "unexpected tensor(s) {}; the config.json does not describe these weights")):
        if names:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            raise DsqError(f"{folder}: " + what.format(", ".join(names[:3]) + more))
