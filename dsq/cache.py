"""The MLA latent cache: per layer, per token, RMSNorm(c) [kv_lora_rank] and the roped k_pe [rope dim].

This one is contiguous, one row of slots per sequence (slot = position), in the model dtype. It is the
reference the paged FP8 cache is checked against."""

from __future__ import annotations

import torch


class LatentCache:
    def __init__(self, n_layers: int, batch: int, max_len: int, kv_rank: int, rope_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.max_len = max_len
        self.kv = torch.zeros(n_layers, batch, max_len, kv_rank, dtype=dtype, device=device)
        self.pe = torch.zeros(n_layers, batch, max_len, rope_dim, dtype=dtype, device=device)

    def write(self, layer: int, pos: torch.Tensor, kv: torch.Tensor, pe: torch.Tensor) -> None:
        """Store tokens at their positions: pos [B, T], kv [B, T, C], pe [B, T, R]."""
        rows = torch.arange(pos.shape[0], device=pos.device)[:, None].expand_as(pos)
        self.kv[layer][rows, pos] = kv.to(self.kv.dtype)
        self.pe[layer][rows, pos] = pe.to(self.pe.dtype)

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All slots of a layer: [B, S, C] and [B, S, R]; the caller masks slots past each query's position."""
        return self.kv[layer], self.pe[layer]
