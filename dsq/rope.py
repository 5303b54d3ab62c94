"""Rotary position embedding as DeepSeek-V2 uses it: YaRN-corrected frequencies (arXiv 2309.00071), applied to
consecutive pairs of the rope dims (the interleaved layout of the published weights), and the naive MLA path's
roped queries and keys. Plain torch (and dsq.config's data), so the kernels' references may import it."""

from __future__ import annotations

import math

import torch

from dsq.config import Config


def rope_frequencies(cfg: Config) -> torch.Tensor:
    """Inverse frequencies [R/2], YaRN-corrected: inv = (f / factor) * ramp + f * (1 - ramp)."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    y = cfg.rope_scaling
    if y is None:
        return freqs

    def corr_dim(rotations: float) -> float:
        return dim * math.log(y.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(corr_dim(y.beta_fast)), 0)
    high = min(math.ceil(corr_dim(y.beta_slow)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 0.001)).clamp(0, 1)
    return freqs / y.factor * ramp + freqs * (1 - ramp)


def rope_angles(cfg: Config, inv_freq: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [N, R/2] of positions pos [N], times YaRN's attention factor (dsq.config.Yarn)."""
    angle = pos[:, None].float() * inv_freq
    factor = cfg.rope_scaling.attention_factor if cfg.rope_scaling is not None else 1.0
    return angle.cos() * factor, angle.sin() * factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) by the angle whose cos/sin are given ([..., R/2]), in fp32."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).to(x.dtype)


def naive_qk_ref(q: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 rope_k: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The naive MLA path's q [T, H, P+R] (rope dims unroped), k_nope [S, H, P] and k_pe [S, R] (unroped when
    rope_k), with cos/sin [T, R/2] -> (q [H, T, P+R], k [H, S, P+R]): q_pe roped, k_pe shared by every head. Views,
    not contiguous; kernels/mla_prefill.py's naive_qk writes them in one launch."""
    p = k_nope.shape[2]
    q_nope, q_pe = q.split([p, q.shape[2] - p], dim=-1)
    q_pe = apply_rope(q_pe, cos[:, None], sin[:, None])
    k_pe = apply_rope(k_pe, cos, sin) if rope_k else k_pe
    k = torch.cat([k_nope, k_pe[:, None].expand(-1, k_nope.shape[1], -1)], dim=-1)
    return torch.cat([q_nope, q_pe], dim=-1).transpose(0, 1), k.transpose(0, 1)
