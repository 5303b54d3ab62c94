"""The MLA kernels' public API in one place (dsq.kernels.mla), split for length into two modules:

- mla_cache: the paged latent-cache layout (LatentPool, alloc_pool, cache_bytes_per_token), the fused
  cache-write kernel (write_latent_cache) with its torch twin, and gather_latents for prefill.
- mla_decode: absorbed-MLA decode attention (mla_decode, split-KV + reduce) with its torch twin.
"""

from dsq.kernels.mla_cache import (
    GROUP,
    LatentPool,
    alloc_pool,
    cache_bytes_per_token,
    gather_latents,
    write_latent_cache,
    write_latent_cache_ref,
)
from dsq.kernels.mla_decode import default_num_splits, mla_decode, mla_decode_ref

__all__ = [
    "GROUP",
    "LatentPool",
    "alloc_pool",
    "cache_bytes_per_token",
    "default_num_splits",
    "gather_latents",
    "mla_decode",
    "mla_decode_ref",
    "write_latent_cache",
    "write_latent_cache_ref",
]
