"""Rotary position embedding as DeepSeek-V2 uses it: YaRN-corrected frequencies (arXiv 2309.00071), applied to
consecutive pairs of the rope dims (the interleaved layout of the published weights)."""

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
