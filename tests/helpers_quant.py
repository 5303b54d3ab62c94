"""A synthetic DeepSeek-V2 checkpoint at real layer shapes (random bf16), written shard by shard, for the
quantizer's memory test and benchmark: it looks like a published checkpoint without downloading one."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from dsq.config import Config


def hf_config(cfg: Config, layers: int, experts: int) -> dict:
    """The published config.json form of a preset, cut to `layers` layers of `experts` routed experts."""
    y = cfg.rope_scaling
    return {
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "torch_dtype": "bfloat16",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size": cfg.moe_intermediate_size, "num_hidden_layers": layers,
        "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_attention_heads,
        "q_lora_rank": cfg.q_lora_rank, "kv_lora_rank": cfg.kv_lora_rank, "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim, "v_head_dim": cfg.v_head_dim, "n_routed_experts": experts,
        "n_shared_experts": cfg.n_shared_experts, "num_experts_per_tok": min(cfg.num_experts_per_tok, experts),
        "first_k_dense_replace": cfg.first_k_dense_replace, "moe_layer_freq": 1, "topk_method": cfg.topk_method,
        "n_group": cfg.n_group if experts % cfg.n_group == 0 else 1, "topk_group": cfg.topk_group,
        "norm_topk_prob": cfg.norm_topk_prob, "routed_scaling_factor": cfg.routed_scaling_factor,
        "scoring_func": "softmax", "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "rope_scaling": {"type": "yarn", **{k: getattr(y, k) for k in y.__dataclass_fields__}},
        "max_position_embeddings": cfg.max_position_embeddings, "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id, "tie_word_embeddings": False,
    }


def tensor_shapes(cfg: Config, layers: int, experts: int) -> dict[str, tuple[int, ...]]:
    """HF tensor names and shapes of the first `layers` layers (dense first, as in the real checkpoints)."""
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    qk, c, r = cfg.qk_head_dim, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}

    def mlp(prefix: str, inter: int) -> None:
        shapes.update({f"{prefix}.gate_proj.weight": (inter, h), f"{prefix}.up_proj.weight": (inter, h),
                       f"{prefix}.down_proj.weight": (h, inter)})

    for i in range(layers):
        p = f"model.layers.{i}"
        shapes[f"{p}.input_layernorm.weight"] = (h,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (h,)
        if cfg.q_lora_rank is None:
            shapes[f"{p}.self_attn.q_proj.weight"] = (heads * qk, h)
        else:
            shapes.update({f"{p}.self_attn.q_a_proj.weight": (cfg.q_lora_rank, h),
                           f"{p}.self_attn.q_a_layernorm.weight": (cfg.q_lora_rank,),
                           f"{p}.self_attn.q_b_proj.weight": (heads * qk, cfg.q_lora_rank)})
        shapes.update({f"{p}.self_attn.kv_a_proj_with_mqa.weight": (c + r, h),
                       f"{p}.self_attn.kv_a_layernorm.weight": (c,),
                       f"{p}.self_attn.kv_b_proj.weight": (heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), c),
                       f"{p}.self_attn.o_proj.weight": (h, heads * cfg.v_head_dim)})
        if i < cfg.first_k_dense_replace:
            mlp(f"{p}.mlp", cfg.intermediate_size)
            continue
        shapes[f"{p}.mlp.gate.weight"] = (experts, h)
        for e in range(experts):
            mlp(f"{p}.mlp.experts.{e}", cfg.moe_intermediate_size)
        mlp(f"{p}.mlp.shared_experts", cfg.moe_intermediate_size * cfg.n_shared_experts)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


def write_synthetic(folder: str | Path, preset: str = "deepseek-v2-lite", layers: int = 3, experts: int | None = None,
                    shard_bytes: int = 1 << 30, seed: int = 0) -> Path:
    """Random bf16 weights (normal, std 0.02: slices of one 16M-value pool, so that writing gigabytes takes
    seconds; norms 1) in shards of at most `shard_bytes` plus the index: never more than a shard in memory."""
    cfg = Config.preset(preset)
    experts = experts or cfg.n_routed_experts
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    pool = (torch.randn(1 << 24, generator=gen) * 0.02).to(torch.bfloat16)  # 16M normals, cut at random offsets

    def weight(shape: tuple[int, ...]) -> torch.Tensor:
        n = torch.Size(shape).numel()
        start = int(torch.randint(len(pool), (1,), generator=gen))
        return pool.roll(-start).repeat(n // len(pool) + 1)[:n].view(shape)

    shapes = tensor_shapes(cfg, layers, experts)
    groups: list[list[str]] = [[]]
    used = 0
    for name, shape in shapes.items():
        n = 2 * torch.Size(shape).numel()
        if groups[-1] and used + n > shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += n
    weight_map = {}
    for i, names in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: torch.ones(shapes[n], dtype=torch.bfloat16) if len(shapes[n]) == 1 else weight(shapes[n])
                   for n in names}
        save_file(tensors, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
        del tensors
    total = sum(2 * torch.Size(s).numel() for s in shapes.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(hf_config(cfg, layers, experts), indent=2))
    return folder
