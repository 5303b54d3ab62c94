"""Model configuration: a typed, validated view of a DeepSeek-V2 family `config.json`."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dsq.errors import DsqError
from dsq.fields import CAPS, check_quantization_config, read_bool, read_float, read_int, rope_dict


@dataclass(frozen=True)
class Yarn:
    """YaRN rope scaling parameters; an absent mscale is 0, as the reference reads it."""

    factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0

    @staticmethod
    def _m(factor: float, mscale: float = 1.0) -> float:
        return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0

    @property
    def attention_factor(self) -> float:
        """Multiplies rope's cos/sin: m(f, mscale) / m(f, mscale_all_dim), = 1 for the published models."""
        if self.mscale and self.mscale_all_dim:
            return self._m(self.factor, self.mscale) / self._m(self.factor, self.mscale_all_dim)
        return self._m(self.factor)


PUBLISHED_YARN = Yarn(mscale=0.707, mscale_all_dim=0.707)


@dataclass(frozen=True)
class Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Yarn | None = PUBLISHED_YARN
    max_position_embeddings: int = 163840
    bos_token_id: int = 100000
    eos_token_id: int = 100001
    tie_word_embeddings: bool = False

    # --- derived -------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times m^2 under YaRN (m = 0.1 * mscale_all_dim * ln(factor) + 1)."""
        scale = self.qk_head_dim**-0.5
        y = self.rope_scaling
        if y is not None and y.mscale_all_dim:
            scale *= Yarn._m(y.factor, y.mscale_all_dim) ** 2
        return scale

    def is_moe(self, layer: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer >= self.first_k_dense_replace
            and layer % self.moe_layer_freq == 0
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # --- construction --------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> Config:
        """Build from a Hugging Face config dict; refuse what dsq does not implement, in one sentence."""

        def refuse(msg: str) -> DsqError:
            return DsqError(f"{source}: {msg}")

        if not isinstance(hf, dict):
            raise refuse(f"must hold a JSON object, got {type(hf).__name__}")
        model_type = hf.get("model_type")
        if model_type != "deepseek_v2":
            hint = " (DeepSeek-V3/R1 routing and MTP are not implemented)" if model_type == "deepseek_v3" else ""
            raise refuse(f"model_type {model_type!r} is not supported; dsq runs DeepSeek-V2 models{hint}")
        if hf.get("scoring_func", "softmax") != "softmax":
            raise refuse(f"scoring_func {hf['scoring_func']!r} is not supported (only 'softmax', as in V2)")
        topk_method = hf.get("topk_method") or "greedy"
        if topk_method not in ("greedy", "group_limited_greedy"):
            raise refuse(f"topk_method {topk_method!r} is not supported (greedy, group_limited_greedy)")
        if hf.get("hidden_act", "silu") != "silu":
            raise refuse(f"hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise refuse(f"{flag}=true is not supported (DeepSeek-V2 has no biases)")
        missing = [k for k in _REQUIRED if k not in hf]
        if missing:
            raise refuse(f"missing field(s) {', '.join(missing)}")
        heads = hf["num_attention_heads"]
        if hf.get("num_key_value_heads", heads) != heads:
            raise refuse("num_key_value_heads must equal num_attention_heads for MLA")
        check_quantization_config(hf.get("quantization_config"), refuse)

        def size(name: str, default: int | None = None, lo: int = 1) -> int:
            return read_int(hf, name, lo, CAPS[name], default, refuse)

        vocab = size("vocab_size")
        layers = size("num_hidden_layers")
        experts = size("n_routed_experts", 0, lo=0)
        rope = rope_dict(hf, refuse)
        eos = hf.get("eos_token_id")
        if isinstance(eos, list):
            if not eos:
                raise refuse("eos_token_id is an empty list; give a token id")
            eos = eos[0]
        cfg = cls(
            vocab_size=vocab,
            hidden_size=size("hidden_size"),
            intermediate_size=size("intermediate_size"),
            moe_intermediate_size=size("moe_intermediate_size"),
            num_hidden_layers=layers,
            num_attention_heads=size("num_attention_heads"),
            q_lora_rank=None if hf.get("q_lora_rank") is None else size("q_lora_rank"),
            kv_lora_rank=size("kv_lora_rank"),
            qk_nope_head_dim=size("qk_nope_head_dim"),
            qk_rope_head_dim=size("qk_rope_head_dim"),
            v_head_dim=size("v_head_dim"),
            n_routed_experts=experts,
            n_shared_experts=size("n_shared_experts", 0, lo=0),
            num_experts_per_tok=read_int(hf, "num_experts_per_tok", 0, max(experts, 0), 0, refuse),
            first_k_dense_replace=read_int(hf, "first_k_dense_replace", 0, layers, 0, refuse),
            moe_layer_freq=read_int(hf, "moe_layer_freq", 1, layers, 1, refuse),
            topk_method=topk_method,
            n_group=read_int(hf, "n_group", 1, max(experts, 1), 1, refuse),
            topk_group=read_int(hf, "topk_group", 1, max(experts, 1), 1, refuse),
            norm_topk_prob=read_bool(hf, "norm_topk_prob", False, refuse),
            routed_scaling_factor=read_float(hf, "routed_scaling_factor", 0.0, 1e4, 1.0, refuse),
            rms_norm_eps=read_float(hf, "rms_norm_eps", 0.0, 1.0, 1e-6, refuse),
            rope_theta=read_float(rope if "rope_theta" in rope else hf, "rope_theta", 0.0, 1e12, 10000.0, refuse),
            rope_scaling=_parse_rope(hf, refuse),
            max_position_embeddings=size("max_position_embeddings", 163840),
            bos_token_id=read_int(hf, "bos_token_id", 0, CAPS["vocab_size"], 100000, refuse),
            eos_token_id=read_int({"eos_token_id": eos}, "eos_token_id", 0, CAPS["vocab_size"], 100001, refuse),
            tie_word_embeddings=read_bool(hf, "tie_word_embeddings", False, refuse),
        )
        cfg.validate(refuse)
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> Config:
        path = Path(path)
        try:
            hf = json.loads(path.read_text())
        except FileNotFoundError:
            raise DsqError(f"{path}: not found; a model folder needs its config.json") from None
        except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
            raise DsqError(f"{path}: not valid JSON ({' '.join(str(e).split())[:200]})") from None
        return cls.from_hf(hf, source=str(path))

    @classmethod
    def preset(cls, name: str) -> Config:
        """The published shapes, so benchmarks and dry runs need no download."""
        if name not in PRESETS:
            raise DsqError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
        return PRESETS[name]

    def validate(self, refuse: Callable[[str], DsqError]) -> None:
        """The checks between fields (each field's own type and range are checked as it is read)."""
        if self.qk_rope_head_dim % 2:
            raise refuse(f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        if self.n_routed_experts:
            if not 0 < self.num_experts_per_tok <= self.n_routed_experts:
                raise refuse(f"num_experts_per_tok={self.num_experts_per_tok} must be in "
                             f"[1, n_routed_experts={self.n_routed_experts}]")
            if self.n_routed_experts % self.n_group:
                raise refuse(f"n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_group}")
            if not 0 < self.topk_group <= self.n_group:
                raise refuse(f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
            if self.topk_method == "group_limited_greedy" and \
                    self.topk_group * (self.n_routed_experts // self.n_group) < self.num_experts_per_tok:
                raise refuse("topk_group groups hold fewer experts than num_experts_per_tok")


_REQUIRED = ["vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
             "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"]

_YARN_RANGES = {  # field -> lo, hi, whether lo is allowed: the betas are positive, mscale 0 turns it off
    "factor": (1.0, 1e4, True), "beta_fast": (0.0, 1e4, False), "beta_slow": (0.0, 1e4, False),
    "mscale": (0.0, 1e2, True), "mscale_all_dim": (0.0, 1e2, True),
}


def _parse_rope(hf: dict[str, Any], refuse: Callable[[str], DsqError]) -> Yarn | None:
    rope = rope_dict(hf, refuse)
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind == "default":
        return None
    if kind != "yarn":
        raise refuse(f"rope type {kind!r} is not supported (yarn or none)")
    given = {k: v for k, v in rope.items() if k in Yarn.__dataclass_fields__ and v is not None}
    def field(m: str) -> DsqError:
        return refuse(f"rope_scaling.{m}")

    for k, (lo, hi, zero) in _YARN_RANGES.items():
        if k in given:
            given[k] = read_float(given, k, lo, hi, 0.0, field, zero)
    if "original_max_position_embeddings" in given:
        read_int(given, "original_max_position_embeddings", 1, CAPS["max_position_embeddings"], None, field)
    return Yarn(**given)


def _preset(**kw: Any) -> Config:
    common = dict(vocab_size=102400, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                  n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1)
    return Config(**common, **kw)


PRESETS: dict[str, Config] = {
    "deepseek-v2-lite": _preset(
        hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27,
        num_attention_heads=16, q_lora_rank=None, n_routed_experts=64),
    "deepseek-v2": _preset(
        hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536, num_hidden_layers=60,
        num_attention_heads=128, q_lora_rank=1536, n_routed_experts=160, topk_method="group_limited_greedy",
        n_group=8, topk_group=3, routed_scaling_factor=16.0),
}
