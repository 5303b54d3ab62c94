"""Read a Hugging Face checkpoint: a local folder or a Hub repo id, safetensors only, tensor by tensor."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from dsq.errors import DsqError

DTYPES = {  # safetensors' dtype names
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.model"]
PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def resolve(path_or_repo: str | Path, revision: str | None = None) -> Path:
    """A local folder as it is, else a Hub repo id fetched with snapshot_download (config, tokenizer and
    safetensors only: pickled weights and shipped Python code are never downloaded). HF_HUB_OFFLINE=1
    makes it use the local Hub cache only."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise DsqError(f"{path}: not a folder; give a model folder or a Hub repo id")
        return path
    name = str(path_or_repo)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise DsqError(f"{name}: no such folder, and not a Hub repo id (owner/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=HUB_PATTERNS))
    except LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        why = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else "it could not be fetched"
        raise DsqError(f"{name}: {why}; download it first or give a local folder") from None
    except HfHubHTTPError as e:
        raise DsqError(f"{name}: the Hub refused it ({e.__class__.__name__}); check the repo id and "
                       "revision, and HF_TOKEN for gated repos") from None


def check_finite(t: torch.Tensor, file: Path, name: str) -> None:
    """Refuse a floating tensor holding NaN or Inf (aminmax: NaN propagates, 20x isfinite's speed)."""
    if t.is_floating_point() and t.element_size() > 1 and t.numel() and \
            not torch.isfinite(torch.stack(torch.aminmax(t))).all():
        raise DsqError(f"{file}: tensor {name} holds NaN or Inf values; the checkpoint is damaged")


class Checkpoint:
    """The tensors of a safetensors checkpoint (one file or shards listed in model.safetensors.index.json),
    read one at a time straight to a device and dtype, so the state dict is never held twice."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.files = self._index()
        self._open: dict[str, object] = {}

    def _index(self) -> dict[str, str]:
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError):
                raise DsqError(f"{index}: not a valid safetensors index (no weight_map)") from None
            for shard in sorted(set(weight_map.values())):
                if not (self.folder / shard).exists():
                    raise DsqError(f"{index}: names shard {shard}, which is missing; re-download the checkpoint")
            return dict(weight_map)
        singles = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if len(singles) == 1:
            with self._safe_open(singles[0]) as f:
                return dict.fromkeys(f.keys(), singles[0])
        if len(singles) > 1:
            raise DsqError(f"{self.folder}: several .safetensors files but no model.safetensors.index.json")
        pickled = [p.name for pattern in PICKLED for p in self.folder.glob(pattern)]
        if pickled:
            raise DsqError(f"{self.folder}: only pickled weights ({pickled[0]}); dsq loads safetensors only, as "
                           "unpickling runs code. Convert them with a trusted tool first")
        raise DsqError(f"{self.folder}: no .safetensors weights found")

    def _safe_open(self, file: str):
        try:
            return safe_open(self.folder / file, framework="pt")
        except (SafetensorError, OSError) as e:
            raise DsqError(f"{self.folder / file}: unreadable safetensors ({e}); re-download it") from None

    def keys(self) -> list[str]:
        return list(self.files)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def shape(self, name: str) -> list[int]:
        return self._handle(name).get_slice(name).get_shape()

    def dtype(self, name: str) -> str:
        """The stored dtype as safetensors spells it (BF16, F8_E4M3, I32, ...), read from the header."""
        return self._handle(name).get_slice(name).get_dtype()

    def get(self, name: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
            index: tuple[slice, ...] | None = None) -> torch.Tensor:
        """One tensor (or the `index` slice of it, reading only that), checked for NaN/Inf when floating point."""
        try:
            handle = self._handle(name)
            t = handle.get_tensor(name) if index is None else handle.get_slice(name)[index]
        except SafetensorError as e:
            raise DsqError(f"{self.folder / self.files[name]}: tensor {name} is unreadable ({e}); "
                           "the file is corrupt or truncated, re-download it") from None
        check_finite(t, self.folder / self.files[name], name)
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.to(device)

    def _handle(self, name: str):
        file = self.files[name]
        if file not in self._open:
            self._open[file] = self._safe_open(file).__enter__()
        return self._open[file]

    def items(self, device: torch.device | str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.files:
            yield name, self.get(name, device)


ROLES: tuple[tuple[str, str], ...] = (  # role -> HF module-name regex (full match); the regexes are disjoint
    ("experts", r".*\.mlp\.experts\.\d+\.(gate|up|down)_proj"),
    ("shared", r".*\.mlp\.shared_experts\.(gate|up|down)_proj"),
    ("dense", r".*\.mlp\.(gate|up|down)_proj"),
    ("attention", r".*\.self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"),
    ("router", r".*\.mlp\.gate"),
    ("head", r"lm_head"),
    ("embed", r".*embed_tokens"),
    ("norm", r".*norm"),
)
_ROLES = tuple((r, re.compile(rx)) for r, rx in ROLES)


def role(name: str) -> str:
    """What a tensor is for, by its HF name (any suffix: weight, weight_packed, weight_scale, ...): attention,
    dense, shared, experts, router, norm, embed, head, or other. The quantizer's formats follow this table."""
    module = name.rpartition(".")[0]
    return next((r for r, rx in _ROLES if rx.fullmatch(module)), "other")
