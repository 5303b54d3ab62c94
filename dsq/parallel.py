"""Tensor + expert parallelism over torch.distributed: who holds what (the shard plan) and the collectives.

Split (docs/parallel.md has the why and the memory arithmetic):
- attention by heads: q_proj / q_b_proj and kv_b_proj column-parallel, o_proj row-parallel; q_a_proj,
  kv_a_proj_with_mqa and the 576-wide latent cache replicated;
- dense MLP and shared experts by intermediate columns: gate/up column-parallel, down row-parallel;
- routed experts whole, a contiguous range of experts per rank; the router replicated;
- embedding and lm_head by vocab rows.
Per layer: one all-reduce after attention, one after the MoE (routed + shared summed first) or dense MLP.
Per forward: one all-reduce after the embedding, one all-gather of the logits; per step, one broadcast of
the step rank 0 runs (`Dist.share`: rank 0 runs the engine, the others its steps). At world size 1 every
collective is the identity and nothing is sliced.

Splits need not be even: each range is cut into contiguous pieces of whole units, the first ranks taking one
unit more. A unit is one head / column / expert / vocab row, or more where a quantization format needs it:
an FP8 128x128 block or an INT4 group must not straddle two ranks (`Format.split_unit`).
Starting ranks is dsq/launch.py's job.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as td
import torch.nn.functional as F

from dsq.config import Config
from dsq.errors import DsqError
from dsq.formats import Scheme


# --- who holds what ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shard:
    """One rank's half-open range of each split dimension."""

    heads: tuple[int, int]
    dense: tuple[int, int]  # intermediate columns of the dense MLP
    shared: tuple[int, int]  # intermediate columns of the shared experts
    experts: tuple[int, int]
    vocab: tuple[int, int]

    @staticmethod
    def whole(cfg: Config) -> Shard:
        return Shard(**{k: (0, n) for k, n in extents(cfg).items()})


def extents(cfg: Config) -> dict[str, int]:
    """The length of each split dimension; 0 where the model has no such part (no dense or no MoE layer)."""
    moe = [cfg.is_moe(i) for i in range(cfg.num_hidden_layers)]
    return {"heads": cfg.num_attention_heads, "dense": 0 if all(moe) else cfg.intermediate_size,
            "shared": cfg.moe_intermediate_size * cfg.n_shared_experts if any(moe) else 0,
            "experts": cfg.n_routed_experts if any(moe) else 0, "vocab": cfg.vocab_size}


def span(n: int, world: int, unit: int = 1) -> list[tuple[int, int]]:
    """range(n) cut into `world` contiguous pieces of whole `unit`s (the last unit may be short); the first
    ranks take one unit more when they do not divide evenly. Callers check that there are >= world units."""
    units = -(-n // unit)
    base, extra = divmod(units, world)
    cuts = [0]
    for r in range(world):
        cuts.append(cuts[-1] + base + (r < extra))
    return [(min(a * unit, n), min(b * unit, n)) for a, b in itertools.pairwise(cuts)]


def splits(cfg: Config) -> dict[str, tuple[int, str, int]]:
    """The tensor-parallel modules: HF module name -> (the dim of its [out, in] weight that is split, the
    Shard range it follows, weight rows/columns per unit of that range). Everything else is replicated,
    except routed experts, which are whole and split by expert."""
    nope, rope, v = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    out = {"model.embed_tokens": (0, "vocab", 1), "lm_head": (0, "vocab", 1)}
    for i in range(cfg.num_hidden_layers):
        a = f"model.layers.{i}.self_attn"
        out[f"{a}.q_b_proj" if cfg.q_lora_rank else f"{a}.q_proj"] = (0, "heads", nope + rope)
        out[f"{a}.kv_b_proj"] = (0, "heads", nope + v)
        out[f"{a}.o_proj"] = (1, "heads", v)
        if cfg.is_moe(i) and not cfg.n_shared_experts:
            continue
        mlp, rng = f"model.layers.{i}.mlp", "dense"
        if cfg.is_moe(i):
            mlp, rng = f"{mlp}.shared_experts", "shared"
        out |= {f"{mlp}.gate_proj": (0, rng, 1), f"{mlp}.up_proj": (0, rng, 1), f"{mlp}.down_proj": (1, rng, 1)}
    return out


NAMES = {"heads": "attention heads", "dense": "dense-MLP intermediate columns",
         "shared": "shared-expert intermediate columns", "experts": "routed experts", "vocab": "vocab rows"}


def shard_plan(cfg: Config, world: int, scheme: Scheme | None = None) -> list[Shard]:
    """Every rank's Shard, on whole units of the formats `scheme` declares (`Format.split_unit`); a DsqError
    names the range, the module and the format when there are fewer units than ranks."""
    if world == 1:
        return [Shard.whole(cfg)]
    unit = dict.fromkeys(extents(cfg), 1)
    why = dict.fromkeys(unit, "")
    for name, (dim, rng, width) in splits(cfg).items():
        if scheme is None or name == "model.embed_tokens":
            continue
        a, reason = scheme.format(name).split_unit(dim)
        need = a // math.gcd(a, width)  # units of the range that fill whole `a`-sized pieces
        if need > 1:
            if unit[rng] % need:
                why[rng] = f"{name} has {reason}, so a rank takes {math.lcm(unit[rng], need)} at a time"
            unit[rng] = math.lcm(unit[rng], need)
    cut = {}
    for rng, n in extents(cfg).items():
        if n == 0:
            cut[rng] = [(0, 0)] * world
            continue
        if -(-n // unit[rng]) < world:
            reason = f" ({why[rng]})" if why[rng] else ""
            raise DsqError(f"cannot split {n} {NAMES[rng]} over {world} ranks{reason}; use fewer ranks")
        cut[rng] = span(n, world, unit[rng])
    return [Shard(**{f.name: cut[f.name][r] for f in fields(Shard)}) for r in range(world)]


# --- the collectives the model calls -------------------------------------------------------------------
class Dist:
    """This rank's Shard and the collectives over the default process group. At world size 1 each
    collective returns its input, so the single-rank model runs exactly the code it always did."""

    def __init__(self, shards: list[Shard], rank: int = 0):
        self.shards, self.rank, self.world = shards, rank, len(shards)
        self.shard = shards[rank]
        self.broken = False  # a collective failed: the other ranks cannot be reached any more

    @staticmethod
    def single(cfg: Config) -> Dist:
        return Dist([Shard.whole(cfg)])

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of every rank's x (in place)."""
        if self.world > 1:
            self._call(td.all_reduce, "all_reduce", x)
        return x

    def all_gather(self, x: torch.Tensor, widths: list[int]) -> torch.Tensor:
        """Every rank's x concatenated along the last dim; rank r's piece is widths[r] wide."""
        if self.world == 1:
            return x
        x = F.pad(x, (0, max(widths) - x.shape[-1])).contiguous()  # all_gather wants equal shapes
        parts = [torch.empty_like(x) for _ in range(self.world)]
        self._call(td.all_gather, "all_gather", parts, x)
        return torch.cat([p[..., :w] for p, w in zip(parts, widths, strict=True)], dim=-1)

    def share(self, obj: Any) -> Any:
        """Rank 0's obj (picklable), on every rank: the command rank 0 sends its followers (dsq.engine.runner).
        Over a gloo group with no practical timeout, since a server may wait hours for its next request."""
        if self.world == 1:
            return obj
        box = [obj]
        self._call(td.broadcast_object_list, "broadcast", box, src=0, group=commands())
        return box[0]

    def _call(self, fn: Callable[..., Any], what: str, *args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except RuntimeError as e:
            self.broken = True
            cause = str(e).split("\n", 1)[0].split("] ", 1)[-1].split(". ", 1)[0][:200]  # gloo's first sentence
            raise DsqError(f"rank {self.rank}: {what} failed, so another rank has died or stalled ({cause}); "
                           "stopping") from None


_COMMANDS: list[Any] = []  # the process group Dist.share uses, opened with the job (dsq.launch.init)


def open_commands() -> None:
    """Open the command group; every rank calls it once, right after joining the job."""
    _COMMANDS[:] = [td.new_group(backend="gloo", timeout=timedelta(days=365))]


def commands() -> Any:
    return _COMMANDS[0]


class Interrupt:
    """Rank 0's Ctrl-C on N ranks (dsq.launch.terminal installs the handler): raised at once while it waits for
    input, otherwise held until rank 0 sends its next step (`ModelRunner.forward`), so it never lands between
    the collectives of a forward the other ranks are running."""

    reading = False
    pending = False

    @classmethod
    def handler(cls, signum: int, frame: Any) -> None:
        if cls.reading:
            raise KeyboardInterrupt
        cls.pending = True

    @classmethod
    def take(cls) -> bool:
        pending, cls.pending = cls.pending, False
        return pending
