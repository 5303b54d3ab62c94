"""Read a Hugging Face checkpoint: a local folder or a Hub repo id, safetensors only, tensor by tensor."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from dsq.config import Config
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
        if revision is not None:  # silently ignoring it would load what the user did not pin
            raise DsqError(f"{path}: is a local folder, which has no revision {revision!r} to pin; drop the "
                           "revision (--revision) or give the Hub repo id")
        return path
    name = str(path_or_repo)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise DsqError(f"{name}: no such folder, and not a Hub repo id (owner/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=HUB_PATTERNS))
    except HFValidationError:
        raise DsqError(f"{name}: no such folder, and not a valid Hub repo id (owner/name)") from None
    except LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        why = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else "the Hub could not be reached"
        raise DsqError(f"{name}: no such folder, and as a Hub repo id {why}; check the path, or download it "
                       "first") from None
    except HfHubHTTPError as e:
        raise DsqError(f"{name}: no such folder, and the Hub refused it as a repo id ({e.__class__.__name__}); "
                       "check the path or the repo id and revision, and HF_TOKEN for gated repos") from None


def check_finite(t: torch.Tensor, file: Path, name: str) -> None:
    """Refuse a floating tensor holding NaN or Inf (aminmax: NaN propagates, 20x isfinite's speed)."""
    if t.is_floating_point() and t.element_size() > 1 and t.numel() and \
            not torch.isfinite(torch.stack(torch.aminmax(t))).all():
        raise DsqError(f"{file}: tensor {name} holds NaN or Inf values; the checkpoint is damaged")


MAX_HEADER = 100 << 20  # a safetensors header is a JSON table of tensors: V2's largest shard's is ~0.2 MB
MAX_INDEX = 100 << 20


@dataclass(frozen=True)
class Entry:
    """Where one tensor lies, from its shard's safetensors header: bytes [start, end) of `file`."""

    file: Path
    dtype: str  # as safetensors spells it (BF16, F8_E4M3, I32, ...)
    shape: tuple[int, ...]
    start: int
    end: int


class Checkpoint:
    """The tensors of a safetensors checkpoint (one file or shards listed in model.safetensors.index.json),
    read one at a time straight to a device and dtype, so the state dict is never held twice.

    Every shard's header is read and checked once, up front (dtype names, shapes, byte ranges inside the
    file), and checked against the index: a tensor in the wrong shard, or in a shard but not the index, is
    refused. A shard must be a regular file inside the folder (or the Hub cache's blobs, where a snapshot's
    files link to), so an index cannot point dsq at /etc/passwd, a FIFO or /dev/zero."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._roots = _roots(self.folder)
        self.entries: dict[str, Entry] = {}
        self.files: dict[str, str] = self._index()  # tensor -> shard file name
        self._open: dict[str, object] = {}

    def _index(self) -> dict[str, str]:
        index = self.folder / "model.safetensors.index.json"
        if index.exists() or index.is_symlink():
            weight_map = _weight_map(self._check_file(index.name, index), index)
            for shard in sorted(set(weight_map.values())):
                self._read_header(shard, index)
            for name, shard in weight_map.items():
                if name not in self.entries or self.entries[name].file != self.folder / shard:
                    raise DsqError(f"{index}: lists tensor {name} in {shard}, whose header does not hold it; "
                                   "the index and shards do not match, re-download the checkpoint")
            unlisted = sorted(set(self.entries) - set(weight_map))
            if unlisted:
                first = unlisted[0]
                raise DsqError(f"{index}: does not list tensor {first}, which {self.entries[first].file.name} holds; "
                               "the index and shards do not match, re-download the checkpoint")
            return dict(weight_map)
        singles = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if len(singles) == 1:
            self._read_header(singles[0], self.folder)
            return dict.fromkeys(self.entries, singles[0])
        if len(singles) > 1:
            raise DsqError(f"{self.folder}: several .safetensors files but no model.safetensors.index.json")
        pickled = [p.name for pattern in PICKLED for p in self.folder.glob(pattern)]
        if pickled:
            raise DsqError(f"{self.folder}: only pickled weights ({pickled[0]}); dsq loads safetensors only, as "
                           "unpickling runs code. Convert them with a trusted tool first")
        raise DsqError(f"{self.folder}: no .safetensors weights found")

    def _check_file(self, name: str, where: Path) -> Path:
        """folder/name, refused unless a relative path to a regular file that resolves inside the folder."""
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise DsqError(f"{where}: names file {name!r}, which is not a plain path inside the model folder")
        path = self.folder / rel
        if not path.exists() and not path.is_symlink():
            raise DsqError(f"{where}: names shard {name}, which is missing; re-download the checkpoint")
        real = path.resolve()
        if not real.is_file() or not any(real.is_relative_to(r) for r in self._roots):
            raise DsqError(f"{path}: not a regular file inside the model folder; replace it with the real file")
        return path

    def _read_header(self, shard: str, where: Path) -> None:
        """Parse and check one shard's header; add its tensors to `entries`."""
        path = self._check_file(shard, where)
        bad = f"{path}: not a valid safetensors file"
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or not 0 < n <= min(MAX_HEADER, size - 8):
                raise DsqError(f"{bad} (header length {n} for a {size}-byte file); re-download it")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, ValueError):
                raise DsqError(f"{bad} (its header is not JSON); re-download it") from None
        if not isinstance(header, dict):
            raise DsqError(f"{bad} (its header is not a JSON object); re-download it")
        data = size - 8 - n
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            dtype, shape, offsets = (meta.get(k) if isinstance(meta, dict) else None
                                     for k in ("dtype", "shape", "data_offsets"))
            if dtype not in DTYPES:
                raise DsqError(f"{path}: tensor {name} has dtype {dtype!r}, which dsq does not read "
                               f"({', '.join(DTYPES)})")
            if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
                raise DsqError(f"{bad}: tensor {name} has shape {shape!r}; re-download it")
            if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                    or not 0 <= offsets[0] <= offsets[1] <= data
                    or offsets[1] - offsets[0] != math.prod(shape) * DTYPES[dtype].itemsize):
                raise DsqError(f"{bad}: tensor {name} has byte range {offsets!r}, which does not hold a {dtype} "
                               f"tensor of shape {shape} inside the file's {data} data bytes; re-download it")
            if name in self.entries:
                raise DsqError(f"{path}: tensor {name} is also in {self.entries[name].file.name}; "
                               "a checkpoint holds each tensor once")
            self.entries[name] = Entry(path, dtype, tuple(shape), 8 + n + offsets[0], 8 + n + offsets[1])

    def shape(self, name: str) -> list[int]:
        return list(self.entries[name].shape)

    def dtype(self, name: str) -> str:
        """The stored dtype as safetensors spells it (BF16, F8_E4M3, I32, ...), read from the header."""
        return self.entries[name].dtype

    def get(self, name: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
            index: tuple[slice, ...] | None = None) -> torch.Tensor:
        """One tensor (or the `index` slice of it, reading only that), checked for NaN/Inf when floating point."""
        try:
            handle = self._handle(name)
            t = handle.get_tensor(name) if index is None else handle.get_slice(name)[index]
        except SafetensorError as e:
            raise DsqError(f"{self.entries[name].file}: tensor {name} is unreadable ({e}); "
                           "the file is corrupt or truncated, re-download it") from None
        check_finite(t, self.entries[name].file, name)
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.to(device)

    def _handle(self, name: str):
        file = self.files[name]
        if file not in self._open:
            try:
                self._open[file] = safe_open(self.entries[name].file, framework="pt").__enter__()
            except (SafetensorError, OSError) as e:
                raise DsqError(f"{self.entries[name].file}: unreadable safetensors ({e}); re-download it") from None
        return self._open[file]


def _roots(folder: Path) -> list[Path]:
    """Where a model folder's files may really lie: in it, or for a Hub cache snapshot
    (.../snapshots/<rev>/, whose files link to ../../blobs/), in that repo's blobs."""
    roots = [folder.resolve()]
    if folder.parent.name == "snapshots":
        roots.append(folder.parent.parent.resolve() / "blobs")
    return roots


def _weight_map(index: Path, where: Path) -> dict[str, str]:
    """The index's weight_map (tensor -> shard file), read with a size cap and checked for its types."""
    if index.stat().st_size > MAX_INDEX:
        raise DsqError(f"{where}: larger than {MAX_INDEX >> 20} MB; not a safetensors index")
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (UnicodeDecodeError, ValueError, AttributeError):
        raise DsqError(f"{where}: not a valid safetensors index (not a JSON object)") from None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise DsqError(f"{where}: weight_map must map tensor names to shard file names; re-download the index")
    return weight_map


def _matrix(ckpt: Checkpoint, module: str) -> tuple[list[int], str] | None:
    """The logical [out, in] of a linear module's stored weight (INT4 packs 8 inputs a word), and its name."""
    for suffix, pack in (("weight", 1), ("weight_packed", 8)):
        name = f"{module}.{suffix}"
        if name in ckpt.entries:
            shape = ckpt.shape(name)
            return ([shape[0], shape[1] * pack] if len(shape) == 2 else shape), name
    return None


def check_config(cfg: Config, ckpt: Checkpoint) -> None:
    """Compare config.json with the headers before anything is allocated, so a config that lies about the
    model's sizes is refused in seconds: embedding and head, layer 0's MLA projections, the number of layers
    and the first MoE layer's experts. A missing tensor is left to the loader, which names all of them."""
    h, c, heads = cfg.hidden_size, cfg.kv_lora_rank, cfg.num_attention_heads
    want = {"model.embed_tokens": [cfg.vocab_size, h], "lm_head": [cfg.vocab_size, h],
            "model.layers.0.self_attn.kv_a_proj_with_mqa": [c + cfg.qk_rope_head_dim, h],
            "model.layers.0.self_attn.kv_b_proj": [heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), c]}
    for module, shape in want.items():
        found = _matrix(ckpt, module)
        if found is not None and found[0] != shape:
            raise DsqError(f"{ckpt.folder}: tensor {found[1]} has shape {ckpt.shape(found[1])}, config.json implies "
                           f"{shape} (as [out, in]); the config does not describe these weights")
    layers = {int(m[1]) for n in ckpt.entries if (m := re.match(r"model\.layers\.(\d+)\.", n))}
    if layers and max(layers) + 1 != cfg.num_hidden_layers:
        raise DsqError(f"{ckpt.folder}: holds {max(layers) + 1} layers, config.json says num_hidden_layers="
                       f"{cfg.num_hidden_layers}; the config does not describe these weights")
    moe = next((i for i in range(cfg.num_hidden_layers) if cfg.is_moe(i)), None)
    if moe is not None:
        prefix = rf"model\.layers\.{moe}\.mlp\.experts\.(\d+)\."
        experts = {int(m[1]) for n in ckpt.entries if (m := re.match(prefix, n))}
        if experts and max(experts) + 1 != cfg.n_routed_experts:
            raise DsqError(f"{ckpt.folder}: layer {moe} holds {max(experts) + 1} routed experts, config.json says "
                           f"n_routed_experts={cfg.n_routed_experts}; the config does not describe these weights")


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
