"""act_quant, fp8_gemm, int4_gemm and fused_moe against their plain-torch references.

Without CUDA the kernels run through Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1):
the same kernel code as on the GPU except the dot operand dtype (fp32 here). Those tests use fp32 inputs so
the comparison is at fp32 rounding level: both sides compute the same exact products (FP8 x FP8, or x times
small integers), summed in different orders, so |out - ref| <= 2 * gamma_n * (|a| @ |b|^T) with
gamma_n = n * 2^-24 (the classic bound on an n-term fp32 dot; n = K plus the few scale multiplications).
The interpreter never runs Triton's GPU compiler: tests/test_compile.py compiles the wrappers' launches for
an H200 on the CPU. The `gpu` tests run the compiled kernels on bf16 inputs at model-like shapes
(bench/gpu_check.sh).
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from dsq.kernels import (
    act_quant,
    add_rms_norm,
    fp8_gemm,
    fp8_gemm_q,
    fused_moe,
    fused_moe_ref,
    int4_gemm,
    moe_align,
    route,
)
from dsq.kernels.common import GemmConfig
from dsq.layers import RMSNorm
from dsq.model import Gate
from dsq.quant import (
    FP8,
    fp8_dequantize_weight,
    fp8_linear,
    fp8_quantize_act,
    fp8_quantize_weight,
    int4_dequantize,
    int4_quantize,
)

fused_moe_mod = importlib.import_module("dsq.kernels.fused_moe")  # the package attribute is the function
router_mod = importlib.import_module("dsq.kernels.router")
CUDA = torch.cuda.is_available()
interp = pytest.mark.skipif(CUDA, reason="interpreter test (fp32 bounds); the gpu tests cover CUDA")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")
U = 2.0**-24  # fp32 unit roundoff
# the interpreter turns a 1-element program_id array into a loop bound with int(); numpy 2 warns each time
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def _assert_dot_close(out: torch.Tensor, ref: torch.Tensor, mag: torch.Tensor, n: int) -> None:
    """|out - ref| <= 2 gamma_n mag, mag = |a| @ |b|^T: two fp32 summation orders of the same products."""
    err = (out.float() - ref.float()).abs()
    bound = 2 * n * U * mag
    assert (err <= bound).all(), f"max err {err.max():.3g}, worst err/bound {(err / bound).max():.3g}"


def _int4(n: int, k: int, group: int, symmetric: bool, device: str = "cpu", seed: int = 0) -> dict:
    g = torch.Generator(device).manual_seed(seed)
    w = torch.randn(n, k, generator=g, device=device) / k**0.5
    d = int4_quantize(w, group, symmetric=symmetric)
    d.pop("weight_shape")
    return d


def _int4_mag(x: torch.Tensor, d: dict) -> torch.Tensor:
    """|x| @ (|q s| + |z s|)^T: the kernel sums x q s and x z s (the zero applied after the dot, see
    int4_dot), so its rounding is bounded by both sums; the reference's (|x| @ |(q - z) s|) is smaller."""
    qs = int4_dequantize(d["weight_packed"], d["weight_scale"], None)
    zs = qs - int4_dequantize(d["weight_packed"], d["weight_scale"], d.get("weight_zero_point"))
    return x.float().abs() @ (qs.abs() + zs.abs()).t()


def _fp8_mag(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, block: bool) -> torch.Tensor:
    xq, xs = fp8_quantize_act(x, 128 if block else None)
    if block:
        xs = xs.repeat_interleave(128, dim=1)[:, : x.shape[1]]
    return (xq.float() * xs).abs() @ fp8_dequantize_weight(q, s).abs().t()


# --- act_quant ------------------------------------------------------------------------------------------
@interp
def test_fp8_rounding_on_a_dense_grid() -> None:
    """Scale 1 (amax = 448) makes act_quant a pure fp32 -> e4m3 rounding: ties, subnormals, +-448, -0."""
    grid = torch.cat([
        torch.linspace(-448, 448, 60001),
        torch.linspace(-2**-5, 2**-5, 20001),  # the subnormal range and the first normal binades
        torch.arange(-64, 65) * 2.0**-10,  # exact ties between subnormals
        torch.tensor([448.0, -448.0, 0.0, -0.0, 2**-6, 2**-6 - 2**-10, 240.0, 232.0, 248.0]),
    ]).view(1, -1)
    q, s = act_quant(grid)
    assert s.item() == 1.0
    assert torch.equal(q.view(torch.uint8), grid.to(FP8).view(torch.uint8))


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("m", "k", "group"), [(1, 344, None), (5, 344, 128), (3, 192, 64), (4, 100, 32)])
def test_act_quant_bit_exact(m: int, k: int, group: int | None, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(m * k)
    x = (torch.randn(m, k, generator=g) * torch.logspace(-4, 3, k)).to(dtype)
    x[0, :40] = 0  # an all-zero group: scale clamps at 1e-12 / 448
    q, s = act_quant(x, group)
    q_ref, s_ref = fp8_quantize_act(x, group)
    assert q.dtype == FP8 and s.shape == s_ref.shape
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


# --- int4_gemm ------------------------------------------------------------------------------------------
INT4_CASES = [  # m, n, k, group, symmetric, forced config (None = the wrapper's heuristic, split-K here)
    (1, 72, 256, 128, True, None),
    (5, 40, 192, 64, False, None),
    (19, 24, 96, 32, False, None),
    (3, 24, 344, 344, True, None),  # one group per row; K = 344 is not a multiple of the 128-wide step
    (20, 72, 256, 128, False, GemmConfig(16, 64, 64, 1)),  # M over the row block, no split
    (2, 40, 384, 128, False, None),  # zero points on the nibble-plane path (128-wide steps)
    (33, 40, 256, 64, True, GemmConfig(32, 32, 64, 3)),  # split-K with several row and column tiles
]


@interp
@pytest.mark.parametrize(("m", "n", "k", "group", "sym", "cfg"), INT4_CASES)
def test_int4_gemm(m: int, n: int, k: int, group: int, sym: bool, cfg: GemmConfig | None) -> None:
    d = _int4(n, k, group, sym)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1))
    out = int4_gemm(x, d["weight_packed"], d["weight_scale"], d.get("weight_zero_point"), config=cfg)
    w = int4_dequantize(d["weight_packed"], d["weight_scale"], d.get("weight_zero_point"))
    assert out.shape == (m, n) and out.dtype == x.dtype
    _assert_dot_close(out, x @ w.t(), _int4_mag(x, d), k + 2)


@interp
def test_int4_gemm_bf16_io() -> None:
    """bf16 in, bf16 out: the only extra error is the final rounding to bf16 (2^-8 relative)."""
    d = _int4(48, 256, 64, False)
    x = torch.randn(3, 256).to(torch.bfloat16)
    out = int4_gemm(x, d["weight_packed"], d["weight_scale"], d["weight_zero_point"])
    ref = x.float() @ int4_dequantize(d["weight_packed"], d["weight_scale"], d["weight_zero_point"]).t()
    assert out.dtype == torch.bfloat16
    assert ((out.float() - ref).abs() <= 2**-8 * ref.abs() + 2 * 258 * U * _int4_mag(x, d)).all()


@interp
def test_int4_gemm_rejects_a_step_across_groups() -> None:
    d = _int4(32, 128, 32, True)
    with pytest.raises(AssertionError, match="straddles"):
        int4_gemm(torch.randn(2, 128), d["weight_packed"], d["weight_scale"], config=GemmConfig(16, 32, 64))


# --- fp8_gemm -------------------------------------------------------------------------------------------
FP8_CASES = [  # m, n, k, block, forced config
    (1, 72, 256, False, None),
    (1, 200, 344, True, None),  # K = 344: a last, 88-wide activation group and weight block column
    (19, 24, 192, True, None),
    (20, 150, 344, False, GemmConfig(16, 64, 128, 1)),
    (20, 150, 344, True, GemmConfig(16, 64, 128, 2)),
    (40, 130, 200, False, GemmConfig(32, 32, 64, 1)),  # channel scales allow any K step
    (5, 150, 344, False, GemmConfig(16, 32, 128, 3)),  # decode tiles, per-token scales, split K
    (7, 100, 344, True, GemmConfig(16, 16, 128, 2, stages=13)),  # decode pipeline, per-group scales, split K
]


@interp
@pytest.mark.parametrize(("m", "n", "k", "block", "cfg"), FP8_CASES)
def test_fp8_gemm(m: int, n: int, k: int, block: bool, cfg: GemmConfig | None) -> None:
    q, s = fp8_quantize_weight(torch.randn(n, k, generator=torch.Generator().manual_seed(n)), block=block)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)) * torch.logspace(-2, 2, k)
    out = fp8_gemm(x, q, s, config=cfg)
    assert out.shape == (m, n) and out.dtype == x.dtype
    _assert_dot_close(out, fp8_linear(x, q, s), _fp8_mag(x, q, s, block), k + 4)


@interp
@pytest.mark.parametrize("block", [False, True])
def test_fp8_gemm_q_shares_one_quantization(block: bool) -> None:
    q, s = fp8_quantize_weight(torch.randn(48, 344), block=block)
    x = torch.randn(3, 344)
    xq, xs = act_quant(x, 128 if block else None)
    out = fp8_gemm_q(xq, xs, q, s, torch.float32)
    _assert_dot_close(out, fp8_linear(x, q, s), _fp8_mag(x, q, s, block), 348)


@interp
def test_fp8_gemm_bf16_io() -> None:
    q, s = fp8_quantize_weight(torch.randn(64, 344), block=True)
    x = torch.randn(2, 344).to(torch.bfloat16)
    out = fp8_gemm(x, q, s)
    ref = fp8_linear(x.float(), q, s)
    assert out.dtype == torch.bfloat16
    assert ((out.float() - ref).abs() <= 2**-8 * ref.abs() + 2 * 348 * U * _fp8_mag(x, q, s, True)).all()


# --- fused_moe ------------------------------------------------------------------------------------------
def _experts(e: int, n: int, k: int, fmt: str, device: str = "cpu", seed: int = 0) -> dict:
    """Stacked compressed-tensors expert weights: fmt is int4-g<group>[-asym] or fp8-channel / fp8-block."""
    g = torch.Generator(device).manual_seed(seed)
    ws = [torch.randn(n, k, generator=g, device=device) / k**0.5 for _ in range(e)]
    if fmt.startswith("int4"):
        group = int(fmt.split("-")[1][1:])
        ds = [int4_quantize(w, group, symmetric=not fmt.endswith("asym")) for w in ws]
        return {key: torch.stack([d[key] for d in ds]) for key in ds[0] if key != "weight_shape"}
    qs = [fp8_quantize_weight(w, block=fmt == "fp8-block") for w in ws]
    return {"weight": torch.stack([q for q, _ in qs]), "weight_scale": torch.stack([s for _, s in qs])}


def _routing(m: int, e: int, k: int, seed: int, device: str = "cpu", skew: bool = False):
    """Distinct experts per token, expert e-1 never chosen; skew sends most tokens to experts 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(e - 1, generator=g)[:k] for _ in range(m)])
    if skew:
        ids[:, :2] = torch.tensor([0, 1])
        ids[1::5, :2] = torch.tensor([1, 0])
    w = torch.rand(m, k, generator=g)
    return ids.to(device=device, dtype=torch.int32), w.to(device)


MOE_FORMATS = ["int4-g32", "int4-g64-asym", "int4-g128-asym", "fp8-channel", "fp8-block"]


def _assert_moe_close(out: torch.Tensor, ref: torch.Tensor, fmt: str, rel: float = 1e-5) -> None:
    """Both sides are fp32 chains (gate/up dots, silu, down dot, a k-term sum) in different orders: ~1e-7
    relative apart, while a wrong row, expert or scale is O(1) off. FP8 experts requantize h per token, and an
    element of h within an ulp of an fp8 rounding tie can round one fp8 step (2^-3 relative) apart, which
    moves that token's whole row by ~1e-3: allow that in at most a tenth of the rows (at least one)."""
    scale = ref.float().abs().max()
    row_err = (out.float() - ref.float()).abs().amax(dim=1)
    off = row_err > rel * scale
    allowed = max(1, out.shape[0] // 10) if fmt.startswith("fp8") else 0
    assert off.sum() <= allowed, f"{int(off.sum())} rows off, worst {row_err.max() / scale:.3g} relative"
    assert (row_err <= 2**-5 * scale).all(), f"worst row {row_err.max() / scale:.3g} relative"


@interp
@pytest.mark.parametrize("m", [1, 3, 21])  # decode (one pair per block) x2, grouped (sorted, padded)
@pytest.mark.parametrize("fmt", MOE_FORMATS)
def test_fused_moe(fmt: str, m: int) -> None:
    e, k = 6, 3
    # fp8-block: K and N not multiples of 128; int4-g128: 128-column K steps, split into nibble planes
    hidden, inter = {"fp8-block": (192, 136), "int4-g128-asym": (256, 128)}.get(fmt, (64, 128))
    w1, w3 = _experts(e, inter, hidden, fmt, seed=1), _experts(e, inter, hidden, fmt, seed=2)
    w2 = _experts(e, hidden, inter, fmt, seed=3)
    x = torch.randn(m, hidden, generator=torch.Generator().manual_seed(m))
    ids, tw = _routing(m, e, k, seed=m)
    out = fused_moe(x, ids, tw, w1, w2, w3)
    ref = fused_moe_ref(x, ids, tw, w1, w2, w3)
    assert out.shape == x.shape and out.dtype == x.dtype
    _assert_moe_close(out, ref, fmt)


@interp
def test_fused_moe_skewed_routing_and_decode_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Experts with several blocks, one with none; the decode path gives the grouped path's answer."""
    e, k, m, hidden, inter = 5, 2, 40, 64, 64
    w1, w3, w2 = (_experts(e, n, kk, "int4-g32-asym", seed=s) for n, kk, s in
                  ((inter, hidden, 1), (inter, hidden, 2), (hidden, inter, 3)))
    x = torch.randn(m, hidden)
    ids, tw = _routing(m, e, k, seed=0, skew=True)
    grouped = fused_moe(x, ids, tw, w1, w2, w3)
    ref = fused_moe_ref(x, ids, tw, w1, w2, w3)
    _assert_moe_close(grouped, ref, "int4")
    monkeypatch.setattr(fused_moe_mod, "DECODE_MAX_TOKENS", m)
    decode = fused_moe(x, ids, tw, w1, w2, w3)
    _assert_moe_close(decode, ref, "int4")


@interp
def test_fused_moe_bf16_io() -> None:
    e, k, m, hidden, inter = 4, 2, 12, 64, 64
    w1, w3, w2 = (_experts(e, n, kk, "fp8-channel", seed=s) for n, kk, s in
                  ((inter, hidden, 1), (inter, hidden, 2), (hidden, inter, 3)))
    x = torch.randn(m, hidden).to(torch.bfloat16)
    ids, tw = _routing(m, e, k, seed=0)
    out = fused_moe(x, ids, tw, w1, w2, w3)
    ref = fused_moe_ref(x, ids, tw, w1, w2, w3)  # rounds h to bf16 like the kernel, sums in fp32
    assert out.dtype == torch.bfloat16
    _assert_moe_close(out, ref, "fp8", rel=2**-8)  # plus the bf16 rounding of the output


@interp
@pytest.mark.parametrize("m", [1, 3, 21])  # decode path (16- and ragged 64-column tiles), grouped path
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_moe_adds_the_shared_output(m: int, dtype: torch.dtype) -> None:
    """add [M, H] joins the slot sum in fp32 before the one rounding, as fused_moe_ref adds it (an add left
    out is |add|, O(1), off)."""
    e, k, hidden, inter = 6, 3, 96, 64
    w1, w3, w2 = (_experts(e, n, kk, "int4-g32", seed=s) for n, kk, s in
                  ((inter, hidden, 1), (inter, hidden, 2), (hidden, inter, 3)))
    g = torch.Generator().manual_seed(m)
    x, add = (torch.randn(m, hidden, generator=g).to(dtype) for _ in range(2))
    ids, tw = _routing(m, e, k, seed=m)
    out = fused_moe(x, ids, tw, w1, w2, w3, add=add)
    ref = fused_moe_ref(x, ids, tw, w1, w2, w3, add=add)
    assert out.dtype == dtype
    # fp32: as test_fused_moe; bf16: h rounded to bf16 in both, the output rounded once each (2^-8 relative)
    _assert_moe_close(out, ref, "int4", rel=1e-5 if dtype == torch.float32 else 2**-8)


@pytest.mark.parametrize(("m", "k", "e", "bm"), [(1, 6, 64, 16), (7, 2, 4, 16), (50, 3, 6, 16), (9, 2, 3, 32)])
def test_moe_align(m: int, k: int, e: int, bm: int) -> None:
    ids, _ = _routing(m, e, k, seed=m, skew=m > 10)
    pair_ids, expert_ids = moe_align(ids, e, bm)
    t = m * k
    assert pair_ids.numel() == expert_ids.numel() * bm  # static size, from (M, k, E, BM) only
    assert expert_ids.numel() == -(-(t + min(e, t) * (bm - 1)) // bm)
    real = pair_ids[pair_ids < t]
    assert torch.equal(real.sort().values, torch.arange(t, dtype=torch.int32))  # every pair exactly once
    blocks = pair_ids.view(-1, bm)
    flat = ids.flatten()
    for b, ex in enumerate(expert_ids.tolist()):
        rows = blocks[b][blocks[b] < t].long()
        if ex < 0:
            assert rows.numel() == 0
        else:
            assert rows.numel() > 0 and (flat[rows] == ex).all()
    used = expert_ids[expert_ids >= 0]
    assert (used[1:] >= used[:-1]).all() and (expert_ids[used.numel():] == -1).all()


# --- GPU: compiled kernels, bf16, model-like shapes ------------------------------------------------------
@gpu
@needs_cuda
@pytest.mark.parametrize(("m", "k", "group"), [(1, 10944, None), (7, 10944, 128), (300, 2048, 128), (64, 576, 64)])
def test_gpu_act_quant(m: int, k: int, group: int | None) -> None:
    x = (torch.randn(m, k, device="cuda") * torch.logspace(-3, 2, k, device="cuda")).to(torch.bfloat16)
    q, s = act_quant(x, group)
    q_ref, s_ref = fp8_quantize_act(x, group)
    assert torch.equal(s, s_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@gpu
@needs_cuda
@pytest.mark.parametrize("m", [1, 5, 16, 33, 100, 600])
@pytest.mark.parametrize(("n", "k", "group", "sym"), [(1408, 2048, 128, True), (2048, 1408, 64, False),
                                                      (3072, 2048, 32, True), (576, 344, 344, True)])
def test_gpu_int4_gemm(m: int, n: int, k: int, group: int, sym: bool) -> None:
    d = _int4(n, k, group, sym, device="cuda")
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    out = int4_gemm(x, d["weight_packed"], d["weight_scale"], d.get("weight_zero_point"))
    ref = x.float() @ int4_dequantize(d["weight_packed"], d["weight_scale"], d.get("weight_zero_point")).t()
    # bf16 operands are exact in the tensor cores (x is bf16, q - zero a small integer); fp32 accumulation,
    # then the bf16 output rounding
    assert ((out.float() - ref).abs() <= 2**-8 * ref.abs() + 2 * (k + 2) * U * _int4_mag(x, d)).all()


@gpu
@needs_cuda
@pytest.mark.parametrize("m", [1, 4, 16, 33, 200, 1000])
@pytest.mark.parametrize(("n", "k", "block"), [(2048, 10944, True), (10944, 2048, True), (3072, 2048, False),
                                               (576, 2048, False), (4096, 512, True)])
def test_gpu_fp8_gemm(m: int, n: int, k: int, block: bool) -> None:
    q, s = fp8_quantize_weight(torch.randn(n, k, device="cuda") / k**0.5, block=block)
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    out = fp8_gemm(x, q, s)
    ref = fp8_linear(x.float(), q, s)
    # Hopper's FP8 tensor cores accumulate with ~2^-13 relative precision inside an MMA chain (the reason
    # DeepGEMM promotes to fp32 every few steps): allow 2^-10 of the magnitude, plus the bf16 output rounding
    assert ((out.float() - ref).abs() <= 2**-8 * ref.abs() + 2**-10 * _fp8_mag(x, q, s, block)).all()


@gpu
@needs_cuda
@pytest.mark.parametrize("m", [1, 4, 64, 300])
@pytest.mark.parametrize("fmt", ["int4-g128", "int4-g128-asym", "fp8-channel", "fp8-block"])
def test_gpu_fused_moe_v2_lite(fmt: str, m: int) -> None:
    e, k, hidden, inter = 64, 6, 2048, 1408
    w1, w3 = _experts(e, inter, hidden, fmt, "cuda", 1), _experts(e, inter, hidden, fmt, "cuda", 2)
    w2 = _experts(e, hidden, inter, fmt, "cuda", 3)
    x, add = (torch.randn(m, hidden, device="cuda").to(torch.bfloat16) for _ in range(2))  # add: shared experts'
    ids, tw = _routing(m, e, k, seed=m, device="cuda")
    out = fused_moe(x, ids, tw, w1, w2, w3, add=add)
    ref = fused_moe_ref(x, ids, tw, w1, w2, w3, add=add)
    _assert_moe_close(out, ref, "fp8", rel=2**-7)  # bf16 output; h elements a bf16 or fp8 step apart


@gpu
@needs_cuda
@pytest.mark.parametrize("m", [1, 64])  # decode path and grouped path
def test_gpu_fused_moe_cuda_graph(m: int) -> None:
    """No host sync (sync debug mode errors on one) and replayable from a CUDA graph with new inputs."""
    e, k, hidden, inter = 64, 6, 2048, 1408
    w1, w3 = _experts(e, inter, hidden, "int4-g128", "cuda", 1), _experts(e, inter, hidden, "int4-g128", "cuda", 2)
    w2 = _experts(e, hidden, inter, "int4-g128", "cuda", 3)
    x = torch.randn(m, hidden, device="cuda").to(torch.bfloat16)
    ids, tw = _routing(m, e, k, seed=0, device="cuda")
    fused_moe(x, ids, tw, w1, w2, w3)  # compile outside the capture
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fused_moe(x, ids, tw, w1, w2, w3)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(x, ids, tw, w1, w2, w3)
    new_ids, new_tw = _routing(m, e, k, seed=1, device="cuda")
    x.copy_(torch.randn_like(x))
    ids.copy_(new_ids)
    tw.copy_(new_tw)
    graph.replay()
    torch.cuda.synchronize()
    _assert_moe_close(out, fused_moe_ref(x, ids, tw, w1, w2, w3), "fp8", rel=2**-7)


# --- add_rms_norm -----------------------------------------------------------------------------------------
@interp
@pytest.mark.parametrize("m", [1, 3, 17, 64])
@pytest.mark.parametrize(("k", "group"), [(2048, 128), (1536, None), (344, 128), (100, None)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("residual", [True, False])
def test_add_rms_norm(m: int, k: int, group: int | None, dtype: torch.dtype, residual: bool) -> None:
    """The sum is torch's bit for bit, the quantization act_quant's of the kernel's own output bit for bit, and the
    norm differs from dsq.model.RMSNorm only by its fp32 mean being summed in another order."""
    g = torch.Generator().manual_seed(m * k)
    x = (torch.randn(m, k, generator=g) * 3).to(dtype)
    r = torch.randn(m, k, generator=g).to(dtype) if residual else None
    norm = RMSNorm(k, 1e-6, dtype)
    norm.weight.copy_(torch.randn(k, generator=g))
    got = add_rms_norm(x, norm.weight, norm.eps, r, quant=True, group=group)
    s = x + r if residual else x
    assert torch.equal(got.x, s)
    q_ref, s_ref = fp8_quantize_act(got.out, group)
    assert torch.equal(got.scale, s_ref)
    assert torch.equal(got.q.view(torch.uint8), q_ref.view(torch.uint8))
    # bound: the rms factors of two fp32 evaluations differ by delta <= (K - 1) u32 (two orders of one K-term
    # sum, Higham 2002 eq. 4.4, halved by the square root) + 6 u32 (/K, +eps, rsqrt within 2 ulp, once each
    # side); h = rnd(x r) then differs by |x r| (delta + 2 u) and out = rnd(w h) by |w| that + u (|out| + |ref|)
    ref = norm(s)
    xr = s.double() * torch.rsqrt(s.double().pow(2).mean(-1, keepdim=True) + norm.eps)
    u = torch.finfo(dtype).eps / 2  # the unit roundoff of x's dtype
    out, ref = got.out.double(), ref.double()
    bound = norm.weight.double().abs() * xr.abs() * ((k + 5) * U + 2 * u) + u * (out.abs() + ref.abs())
    assert ((out - ref).abs() <= bound).all()


@interp
def test_add_rms_norm_without_quantization_keeps_3d_shape() -> None:
    x = torch.randn(2, 5, 64).to(torch.bfloat16)
    w = torch.randn(64).to(torch.bfloat16)
    got = add_rms_norm(x, w, 1e-6, x)
    assert got.q is None and got.scale is None and got.out.shape == x.shape
    assert torch.equal(got.x, x + x)


# --- route ------------------------------------------------------------------------------------------------
GATES = {  # experts, top-k, groups, kept groups, normalise, scale
    "v2-lite": (64, 6, 1, 1, False, 1.0),
    "v2": (160, 6, 8, 3, False, 16.0),
    "small-groups": (20, 3, 4, 2, True, 1.0),  # 5 experts per group: nothing a power of two
}


def _gate(name: str, hidden: int, backend: str) -> Gate:
    e, k, groups, kept, norm, scale = GATES[name]
    cfg = SimpleNamespace(n_routed_experts=e, hidden_size=hidden, num_experts_per_tok=k, n_group=groups,
                          topk_group=kept, norm_topk_prob=norm, routed_scaling_factor=scale,
                          topk_method="group_limited_greedy" if groups > 1 else "greedy")
    return Gate(cfg, backend)


def _assert_routes_like(gate: Gate, ref_gate: Gate, x: torch.Tensor) -> None:
    """gate (triton) chooses ref_gate's (torch) experts except on near-ties of its logits, with its weights to
    within rounding."""
    w_ref, id_ref = ref_gate(x)
    w, ids = gate(x)
    assert ids.dtype == torch.int64 and ids.is_contiguous() and w.dtype == torch.float32
    assert (w[:, :-1] >= w[:, 1:]).all()  # descending weights (the documented slot order)
    # the logits: fp32 sums of the same D products in two orders, |l - l_ref| <= 2 gamma_D (|x| @ |W|^T)
    # (Higham 2002, eq. 3.5), at most delta per row; the choice differs only where that could reorder them
    (m, d), weight = x.shape, ref_gate.weight.float()
    logits = F.linear(x.float(), weight)
    delta = 2 * d * U * (x.float().abs() @ weight.abs().t()).amax(-1, keepdim=True)
    masked, near = logits, torch.zeros(m, dtype=torch.bool, device=x.device)
    if ref_gate.group_limited:  # the last kept group's maximum near the next one's
        groups = logits.view(m, ref_gate.groups, -1)
        best = groups.amax(-1).sort(-1, descending=True).values
        near |= best[:, ref_gate.topk_groups - 1] - best[:, ref_gate.topk_groups] <= 2 * delta[:, 0]
        kept = groups.amax(-1, keepdim=True) >= best[:, ref_gate.topk_groups - 1, None, None]
        masked = groups.masked_fill(~kept, -torch.inf).view(m, -1)
    top = masked.topk(ref_gate.k + 1, dim=-1).values  # the k-th kept logit near the next one
    near |= top[:, -2] - top[:, -1] <= 2 * delta[:, 0]
    order, order_ref = ids.argsort(dim=-1), id_ref.argsort(dim=-1)  # torch's top-k slots are unordered
    same = (ids.gather(1, order) == id_ref.gather(1, order_ref)).all(-1)
    assert (same | near).all(), f"rows {(~same & ~near).nonzero().flatten().tolist()} chose other experts"
    # the weights: a softmax of logits delta apart is within e^(2 delta) - 1 relative (numerator and
    # denominator each within e^delta), as is the k weights' renormalisation (a softmax over the k). Rounding:
    # each exp within 1 ulp (2u of each other), the sums in two orders 2(E - 1)u apart, the division u each
    # side; normalising adds 2(k - 1)u + 2u and doubles the score error; scaling adds 2u
    e, k = weight.shape[0], ref_gate.k
    rel = (2 * (2 * e + 2) + 2 * k + 2) * U + torch.expm1(2 * delta)
    w_sorted, w_ref_sorted = w.gather(1, order)[same], w_ref.gather(1, order_ref)[same]
    assert ((w_sorted - w_ref_sorted).abs() <= rel[same] * w_ref_sorted.abs()).all()


@interp
@pytest.mark.parametrize("m", [1, 3, 17, 64])
@pytest.mark.parametrize("name", list(GATES))
@pytest.mark.parametrize("fused", [True, False])  # logits in the kernel (decode sizes) or by a torch GEMM
def test_router_equals_gate(m: int, name: str, fused: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 hidden states, fp32 router weight (as the model holds them)."""
    monkeypatch.setattr(router_mod, "FUSED_MAX_TOKENS", 64 if fused else 0)
    hidden = 96
    g = torch.Generator().manual_seed(m)
    ref_gate, gate = _gate(name, hidden, "torch"), _gate(name, hidden, "triton")
    ref_gate.weight.copy_(torch.randn(ref_gate.weight.shape, generator=g))
    gate.weight.copy_(ref_gate.weight)
    _assert_routes_like(gate, ref_gate, torch.randn(m, hidden, generator=g).to(torch.bfloat16))


@interp
def test_router_reads_a_bf16_weight() -> None:
    """A bf16 router weight is upcast exactly: the same products, so the fp32 weight's result to the bit
    (both run the kernel's summation order)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 80, generator=g).to(torch.bfloat16)
    weight = torch.randn(20, 80, generator=g).to(torch.bfloat16)
    w, ids = route(x, weight, 3, groups=4, topk_groups=2)
    w32, ids32 = route(x, weight.float(), 3, groups=4, topk_groups=2)
    assert torch.equal(ids, ids32) and torch.equal(w, w32)


@interp
def test_router_ties_go_to_the_lower_index() -> None:
    """Equal logits: the lower expert id wins and the slots list ties by ascending id; equal group maxima: the
    lower group is kept."""
    eye = torch.eye(8)  # x @ I: the logits are x exactly
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0, 2.0, -1.0, 0.5, 2.0]])
    w, ids = route(logits, eye, 3)
    assert ids.tolist() == [[1, 3, 4]]
    assert w[0, 0] == w[0, 1] == w[0, 2]  # equal logits, equal weights
    # 4 groups of 2; groups 0, 1, 2 tie at max 1.0, group 3 is lower: groups 0 and 1 are kept
    logits = torch.tensor([[1.0, 0.2, 0.9, 1.0, 1.0, 0.8, 0.0, -1.0]])
    _, ids = route(logits, eye, 3, groups=4, topk_groups=2)
    assert ids.tolist() == [[0, 3, 2]]


@gpu
@needs_cuda
@pytest.mark.parametrize("m", [1, 64, 512])  # logits in the kernel at decode sizes, by a GEMM above
@pytest.mark.parametrize(("name", "hidden"), [("v2-lite", 2048), ("v2", 5120)])
def test_gpu_router(name: str, hidden: int, m: int) -> None:
    ref_gate, gate = _gate(name, hidden, "torch").cuda(), _gate(name, hidden, "triton").cuda()
    ref_gate.weight.copy_(torch.randn(ref_gate.weight.shape, device="cuda") / hidden**0.5)
    gate.weight.copy_(ref_gate.weight)
    _assert_routes_like(gate, ref_gate, torch.randn(m, hidden, device="cuda").to(torch.bfloat16))
