"""Typed readers of the fields of a Hugging Face config.json: every size an integer in range, every number
finite and in range, every flag a bool, each refusal naming the field and what it may be."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dsq.errors import DsqError

Refuse = Callable[[str], DsqError]

# Upper bounds on the sizes dsq reads: 4-16x the largest published DeepSeek model (V3: vocab 129,280,
# hidden 7,168, 61 layers, 128 heads, q_lora 1,536, kv_lora 512, head dims 128, 256 routed experts of
# 2,048, dense 18,432, context 163,840), so every real config passes and a typo'd or hostile one is
# refused before it allocates terabytes or loops for minutes.
CAPS = {
    "vocab_size": 1 << 20, "hidden_size": 1 << 15, "intermediate_size": 1 << 17, "moe_intermediate_size": 1 << 15,
    "num_hidden_layers": 1 << 10, "num_attention_heads": 1 << 10, "q_lora_rank": 1 << 14, "kv_lora_rank": 1 << 13,
    "qk_nope_head_dim": 1 << 10, "qk_rope_head_dim": 1 << 10, "v_head_dim": 1 << 10, "n_routed_experts": 1 << 12,
    "n_shared_experts": 1 << 6, "max_position_embeddings": 1 << 24,
}


def read_int(hf: dict[str, Any], name: str, lo: int, hi: int, default: int | None,
         refuse: Refuse) -> int:
    """hf[name] (`default` when absent or null, if there is one), which must be an integer in [lo, hi]."""
    value = hf.get(name)
    value = default if value is None and default is not None else value
    if type(value) is not int or not lo <= value <= hi:  # bool and float sizes are refused too
        raise refuse(f"{name} must be an integer in [{lo}, {hi:,}], got {value!r}")
    return value


def read_float(hf: dict[str, Any], name: str, lo: float, hi: float, default: float,
           refuse: Refuse, zero: bool = False) -> float:
    """hf[name] (or `default`), which must be a number in (lo, hi] ([lo, hi] with `zero`); NaN fails both."""
    value = hf.get(name, default)
    if type(value) not in (int, float) or not (lo <= value if zero else lo < value) or not value <= hi:
        raise refuse(f"{name} must be a number in {'[' if zero else '('}{lo:g}, {hi:g}], got {value!r}")
    return float(value)


def read_bool(hf: dict[str, Any], name: str, default: bool, refuse: Refuse) -> bool:
    value = hf.get(name, default)
    if not isinstance(value, bool):
        raise refuse(f"{name} must be true or false, got {value!r}")
    return value


def rope_dict(hf: dict[str, Any], refuse: Refuse) -> dict[str, Any]:
    """Published configs carry `rope_scaling` + `rope_theta`; transformers 5 writes `rope_parameters`."""
    name = "rope_parameters" if hf.get("rope_parameters") is not None else "rope_scaling"
    rope = hf.get(name) or {}
    if not isinstance(rope, dict):
        raise refuse(f"{name} must be an object or null, got {type(rope).__name__}")
    return rope


def check_quantization_config(q: Any, refuse: Refuse) -> None:
    """The shape of a compressed-tensors `quantization_config` as dsq reads it (the formats themselves are
    checked where they are built: dsq.formats.from_args)."""
    if q is None:
        return
    if not isinstance(q, dict):
        raise refuse(f"quantization_config must be an object, got {type(q).__name__}")
    groups = q.get("config_groups", {})
    if not isinstance(groups, dict):
        raise refuse(f"quantization_config.config_groups must be an object, got {type(groups).__name__}")
    for name, group in groups.items():
        where = f"quantization_config.config_groups.{name}"
        if not isinstance(group, dict):
            raise refuse(f"{where} must be an object, got {type(group).__name__}")
        targets = group.get("targets", [])
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise refuse(f"{where}.targets must be a list of strings")
        for part in ("weights", "input_activations"):
            args = group.get(part)
            if args is not None and not isinstance(args, dict):
                raise refuse(f"{where}.{part} must be an object or null, got {type(args).__name__}")
        weights = group.get("weights") or {}
        for key, lo, hi in (("num_bits", 1, 16), ("group_size", 1, 1 << 16)):
            if weights.get(key) is not None:
                read_int(weights, key, lo, hi, None, lambda m, w=where: refuse(f"{w}.weights.{m}"))
        block = weights.get("block_structure")
        if block is not None and (not isinstance(block, list) or len(block) != 2 or
                                  not all(type(b) is int and 0 < b <= 1 << 16 for b in block)):
            raise refuse(f"{where}.weights.block_structure must be two positive integers, got {block!r}")
    ignore = q.get("ignore", [])
    if not isinstance(ignore, list) or not all(isinstance(t, str) for t in ignore):
        raise refuse("quantization_config.ignore must be a list of strings")
