"""Triton kernels for dsq: FP8 activation quantization, FP8 W8A8 and INT4 W4A16 GEMMs, fused MoE, the fused
add + RMSNorm (+ quantization), the MoE router and the absorbed MLA projections.

Each wrapper asserts its shapes and dtypes and runs on CUDA tensors, or on CPU tensors under
TRITON_INTERPRET=1 (how CI checks them against the plain-torch references in dsq.quant).
"""

from .act_quant import act_quant, silu_mul_quant
from .common import GemmConfig
from .fp8_gemm import fp8_gemm, fp8_gemm_q
from .fused_moe import fused_moe, fused_moe_ref
from .int4_gemm import int4_gemm
from .mla_absorb import absorb_o, absorb_q
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
    "moe_align",
    "moe_align_ref",
    "route",
    "silu_mul_quant",
]
