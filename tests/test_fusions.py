"""Fusions of the decode step: projections of one input joined into one GEMM (dsq.layers.join / project),
SwiGLU's silu(gate) * up fused with the FP8 quantization its down_proj reads (kernels.act_quant.silu_mul_quant),
and the fused MoE's sort of pairs by expert in one launch (kernels/moe_align.py).

Kernels run through Triton's interpreter on CPU (conftest sets TRITON_INTERPRET=1); the sm_90 compile of their
real launches is tests/test_compile.py's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsq.formats import BF16, FP8Block, FP8Channel, Int4Group
from dsq.kernels import moe_align, moe_align_ref, silu_mul_quant
from dsq.layers import Linear, join, project, swiglu
from dsq.quant import FP8, fp8_quantize_act

CUDA = torch.cuda.is_available()
interp = pytest.mark.skipif(CUDA, reason="interpreter test; the gpu test covers CUDA")
U = 2.0**-24  # fp32 unit roundoff
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def _unambiguous_gate(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Gate values whose silu is not within 16 fp32 ulps of a `dtype` rounding boundary.

    silu needs exp, and exp differs by a few fp32 ulps between libraries (torch's CPU exp, numpy's under the
    interpreter, the GPU's ex2.approx): near a boundary of the 16-bit rounding that follows, the kernel and
    torch may then round silu to neighbouring 16-bit values. Away from it they round alike, so the kernel is
    checked bit for bit on inputs kept away from it (a resample moves a value off it: ~1 in 2,000 are near)."""
    gen = torch.Generator().manual_seed(seed)
    g = (torch.randn(m, k, generator=gen) * 3).to(dtype)
    for _ in range(20):
        s = g.double() / (1 + torch.exp(-g.double()))
        near = (s * (1 - 16 * U)).to(dtype) != (s * (1 + 16 * U)).to(dtype)
        if not near.any():
            return g
        g[near] = (torch.randn(int(near.sum()), generator=gen) * 3).to(dtype)
    raise AssertionError("could not draw gate values away from rounding boundaries")


@interp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("m", "k", "group"), [(1, 1408, None), (3, 344, 128), (7, 192, 64), (2, 10944, 128)])
def test_silu_mul_quant_is_act_quant_of_torchs_swiglu(m: int, k: int, group: int | None, dtype) -> None:
    gate = _unambiguous_gate(m, k, dtype, seed=m * k)
    up = (torch.randn(m, k, generator=torch.Generator().manual_seed(k)) * torch.logspace(-3, 1, k)).to(dtype)
    up[0, :64] = 0  # an all-zero group: the scale clamps at 1e-12 / 448
    q, s = silu_mul_quant(gate, up, group)
    q_ref, s_ref = fp8_quantize_act(F.silu(gate) * up, group)
    assert q.dtype == FP8 and s.shape == s_ref.shape
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@interp
def test_silu_mul_quant_reads_the_halves_of_one_joined_output() -> None:
    gu = torch.randn(5, 2 * 344).to(torch.bfloat16)
    gate, up = gu.split(344, dim=-1)  # row views with stride 688, as a joined gate+up GEMM returns them
    q, s = silu_mul_quant(gate, up, 128)
    q_ref, s_ref = silu_mul_quant(gate.contiguous(), up.contiguous(), 128)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)


def _linears(fmt, outs: list[int], k: int, backend: str, ins: list[int] | None = None) -> list[Linear]:
    mods = []
    for i, (n, d) in enumerate(zip(outs, ins or [k] * len(outs), strict=True)):
        m = Linear(d, n, fmt, dtype=torch.float32, backend=backend)
        w = torch.randn(n, d, generator=torch.Generator().manual_seed(i)) / d**0.5
        for name, t in m.quantize(w).items():
            getattr(m, name).copy_(t)
        mods.append(m)
    return mods


FORMATS = [(BF16, "torch"), (FP8Channel(), "triton"), (FP8Block(), "triton"), (Int4Group(64), "triton")]


def _input(x: torch.Tensor, fmt) -> torch.Tensor:
    """What the GEMM multiplies: x, or its dynamic FP8 quantization dequantized."""
    if not isinstance(fmt, FP8Channel):
        return x.float()
    q, s = fp8_quantize_act(x, fmt.act_group)
    s = s.repeat_interleave(fmt.act_group, dim=1)[:, : x.shape[1]] if fmt.act_group else s
    return q.float() * s


@interp
@pytest.mark.parametrize(("fmt", "backend"), FORMATS, ids=lambda f: str(f))
def test_joined_projections_equal_the_separate_ones(fmt, backend: str) -> None:
    """q_proj + kv_a (outs 256 and 72: 72 is not a whole block) as one weight: the same outputs.

    Joined, each output is the same dot of the same quantized operands; only the split of K over programs
    (chosen from the number of output tiles) may differ, a different fp32 summation order of the same products:
    |joined - separate| <= 2 gamma_K sum_i |x_i w_i| (Higham, Accuracy and Stability, 3.1)."""
    k = 256
    mods = _linears(fmt, [256, 72], k, backend)
    x = torch.randn(3, k)
    before = [m(x) for m in mods]
    state = [{n: t.clone() for n, t in m.state_dict().items()} for m in mods]
    join(*mods)
    assert getattr(mods[0], "joined", None) is not None, "these formats and sizes join"
    whole = mods[0].joined[0]
    for m in mods:  # each module's tensors are now row views of the joined ones
        for name, t in m.tensors().items():
            assert t.untyped_storage().data_ptr() == getattr(whole, name).untyped_storage().data_ptr()
    for m, was in zip(mods, state, strict=True):  # the same names and values: checkpoints load and save as before
        now = m.state_dict()
        assert now.keys() == was.keys() and all(torch.equal(was[n], now[n]) for n in now)
    after = project(x, *mods)
    for m, b, a in zip(mods, before, after, strict=True):
        mag = _input(x, fmt).abs() @ m.dequantize().abs().t()
        assert ((a - b).abs() <= 2 * k * U * mag).all(), (a - b).abs().max()


def test_block_scales_that_do_not_concatenate_stay_separate() -> None:
    """Under 128x128 block scales a first module of 72 rows would put the second's rows in its last block."""
    mods = _linears(FP8Block(), [72, 256], 256, "torch")
    join(*mods)
    assert getattr(mods[0], "joined", None) is None


@interp
@pytest.mark.parametrize("fmt", [FP8Channel(), FP8Block()], ids=str)
def test_swiglu_fused_equals_the_torch_path(fmt) -> None:
    """The Triton SwiGLU (joined gate+up, silu_mul_quant, fp8_gemm_q) against the torch references of the same
    modules, bf16 activations. The gate/up outputs are the same dots in other fp32 orders, so they may round to
    neighbouring bf16 values, and then their product's FP8 quantization to a neighbouring FP8 value: at most one
    FP8 step of h = silu(g) * u (2^-3 |h| for a normal, 2^-9 scale for a subnormal), each weighted by |w| in
    the down GEMM; plus that GEMM's fp32 reorder (2 gamma_K mag) and one bf16 rounding of each result."""
    k, inter = 256, 384
    mods = _linears(fmt, [inter, inter, k], k, "triton", [k, k, inter])
    refs = _linears(fmt, [inter, inter, k], k, "torch", [k, k, inter])  # the same seeds: the same tensors
    x = torch.randn(2, k).to(torch.bfloat16)
    expect = swiglu(x, *refs)
    join(mods[0], mods[1])
    got = swiglu(x, *mods)
    h = F.silu(refs[0](x)) * refs[1](x)
    _, scale = fp8_quantize_act(h, fmt.act_group)
    scale = scale.repeat_interleave(fmt.act_group, dim=1)[:, :inter] if fmt.act_group else scale
    step = 2.0**-3 * h.float().abs() + 2.0**-9 * scale
    w = refs[2].dequantize().abs()
    mag = _input(h, fmt).abs() @ w.t()
    bound = 2 * inter * U * mag + step @ w.t() + 2.0**-8 * expect.float().abs()
    assert got.shape == expect.shape and got.dtype == torch.bfloat16
    assert ((got.float() - expect.float()).abs() <= bound).all()


@interp
@pytest.mark.parametrize(("m", "k", "e", "bm"), [(1, 6, 64, 16), (7, 2, 4, 16), (50, 3, 6, 16), (9, 2, 3, 32),
                                                 (64, 6, 64, 16), (700, 6, 160, 64)])
@pytest.mark.parametrize("skew", [False, True])
def test_moe_align_kernel_equals_the_torch_sort(m: int, k: int, e: int, bm: int, skew: bool) -> None:
    """The one-program sort against the torch ops (stable argsort, scatters, searchsorted), element for element:
    the same pairs in the same order in the same blocks, the same padding. Skewed: most pairs on a few experts,
    several blocks each (700 x 6 pairs: chunks of the kernel carry each expert's count across them)."""
    g = torch.Generator().manual_seed(m * e + skew)
    if skew:
        ids = torch.multinomial(torch.logspace(0, -4, e), m * k, replacement=True, generator=g).view(m, k)
    else:
        ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(m)])
    pair_ids, expert_ids = moe_align(ids.contiguous(), e, bm)
    ref_pairs, ref_experts = moe_align_ref(ids, e, bm)
    assert torch.equal(pair_ids, ref_pairs)
    assert torch.equal(expert_ids, ref_experts)
