"""Triton kernels for dsq: FP8 activation quantization, FP8 W8A8 and INT4 W4A16 GEMMs, fused MoE, the fused
add + RMSNorm (+ quantization), the MoE router, and MLA's cache write, decode attention, absorbed projections and
naive-path q / k.

Each wrapper asserts its shapes and dtypes and runs on CUDA tensors, or on CPU tensors under
TRITON_INTERPRET=1 (how CI checks them against the plain-torch references in dsq.quant, dsq.latent and
dsq.rope). Only the Triton backend imports this package, so the torch backend runs without Triton.
"""

from .act_quant import act_quant, silu_mul_quant
from .common import GemmConfig
from .fp8_gemm import fp8_gemm, fp8_gemm_q
from .fused_moe import fused_moe, fused_moe_ref
from .int4_gemm import int4_gemm
from .mla_absorb import absorb_o, absorb_q
from .mla_cache import write_latent_cache
from .mla_decode import mla_decode
from .mla_prefill import naive_qk
from .moe_align import moe_align, moe_align_ref
from .norm import add_rms_norm
from .router import route

__all__ = [
    "GemmConfig",
    "absorb_o",
    "absorb_q",
    "act_quant",
    "add_rms_norm",
    "fp8_gemm",
    "fp8_gemm_q",
    "fused_moe",
    "fused_moe_ref",
    "int4_gemm",
    "mla_decode",
    "moe_align",
    "moe_align_ref",
    "naive_qk",
    "route",
    "silu_mul_quant",
    "write_latent_cache",
]
