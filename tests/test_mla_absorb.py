"""absorb_q / absorb_o (kernels/mla_absorb.py) against their torch references, and the model using them.

Interpreted, the kernels' dots are fp32 and each output element is a sum of the very products the reference
sums (q or o_lat times fp8 x scale, both sides rounding that product identically), in another order. Two fp32
summation orders of the same n products differ by at most 2 gamma_n (|a| @ |b|), gamma_n = n 2^-24: the
bound asserted. The rope is the same fp32 ops in the same order as dsq.rope.apply_rope: bit-exact.
"""

from __future__ import annotations

import pytest
import torch
from tiny import make_tiny

import dsq
from dsq.cache import Attention
from dsq.formats import SCHEMES, Scheme
from dsq.kernels.mla_absorb import absorb_o, absorb_o_ref, absorb_q, absorb_q_ref
from dsq.loader import read_config
from dsq.memory import weight_bytes
from dsq.model import MLA
from dsq.quant import fp8_dequantize_weight, fp8_quantize_weight

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
CUDA = torch.cuda.is_available()
interp = pytest.mark.skipif(CUDA, reason="interpreter test (fp32 bounds); the gpu tests cover CUDA")
U = 2.0**-24  # fp32 unit roundoff
U_BF16 = 2.0**-9  # bf16 unit roundoff

# b, h, nope, rope, v, c, block: ragged P, V, C (and a partial last block column), a rope of 5 pairs, more
# tokens than one 64-token tile; block scales with P and V whole blocks (as MLA requires of them)
CASES = [
    (1, 2, 16, 16, 16, 32, False),
    (3, 3, 24, 10, 40, 200, False),
    (70, 2, 24, 8, 8, 48, False),
    (3, 2, 128, 10, 256, 200, True),
    (5, 4, 128, 64, 128, 160, True),  # V2-Lite's head dims: one 128x128 block row per W_UK / W_UV
]


def _kv_b(h: int, nope: int, v: int, c: int, block: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(h * (nope + v), c, generator=torch.Generator().manual_seed(seed)) / c**0.5
    w *= torch.logspace(-1, 1, h * (nope + v))[:, None]  # rows of different scales
    return fp8_quantize_weight(w, block=block)


def _halves(w: torch.Tensor, s: torch.Tensor, h: int, nope: int) -> tuple[tuple[torch.Tensor, ...], ...]:
    """((W_UK, its scale), (W_UV, its scale)): per-head [H, P, *] / [H, V, *] views of kv_b's stored tensors."""
    rows = w.shape[0] // h
    w3 = w.view(h, rows, -1)
    s3 = s.view(h, -1, s.shape[-1])
    sp = s3.shape[1] * nope // rows
    return (w3[:, :nope], s3[:, :sp]), (w3[:, nope:], s3[:, sp:])


def _assert_sums_close(out: torch.Tensor, ref: torch.Tensor, mag: torch.Tensor, n: int, rounded: float = 0) -> None:
    """|out - ref| <= (rounded + 2 gamma_n) mag; `rounded`: the relative error of the kernel's products when
    its dot operands are rounded (on the GPU)."""
    err = (out.float() - ref.float()).abs()
    bound = (rounded + 2 * n * U) * mag
    assert (err <= bound).all(), f"max err {err.max():.3g}, worst err/bound {(err / bound).max():.3g}"


def _rope(b: int, r: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    angle = torch.randint(0, 5000, (b, 1), generator=gen).float() * torch.rand(r // 2, generator=gen)
    return angle.cos() * 1.3, angle.sin() * 1.3  # scaled as YaRN's attention factor scales them


@interp
@pytest.mark.parametrize(("b", "h", "nope", "rope", "v", "c", "block"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_absorb_q(b: int, h: int, nope: int, rope: int, v: int, c: int, block: bool, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(b + c)
    w, s = _kv_b(h, nope, v, c, block, seed=c)
    pad = 7  # q is a view into wider rows, as a slice of q_proj's output is
    q = (torch.randn(b, h * (nope + rope) + pad, generator=gen) * 3).to(dtype)[:, :h * (nope + rope)]
    q = q.view(b, h, nope + rope)
    cos, sin = _rope(b, rope, gen)
    uk = _halves(w, s, h, nope)[0]
    q_lat, q_pe = absorb_q(q, cos, sin, *uk)
    want_lat, want_pe = absorb_q_ref(q, cos, sin, *uk)
    assert q_lat.dtype == torch.float32 and q_pe.dtype == dtype and q_lat.is_contiguous() and q_pe.is_contiguous()
    assert torch.equal(q_pe, want_pe)
    w_uk = fp8_dequantize_weight(w, s).view(h, nope + v, c)[:, :nope]
    mag = torch.einsum("bhp,hpc->bhc", q[..., :nope].float().abs(), w_uk.abs())
    _assert_sums_close(q_lat, want_lat, mag, nope)


@interp
@pytest.mark.parametrize(("b", "h", "nope", "rope", "v", "c", "block"), CASES)
def test_absorb_o(b: int, h: int, nope: int, rope: int, v: int, c: int, block: bool) -> None:
    gen = torch.Generator().manual_seed(b + v)
    w, s = _kv_b(h, nope, v, c, block, seed=v)
    o_lat = torch.randn(b, h, c, generator=gen)
    uv = _halves(w, s, h, nope)[1]
    o = absorb_o(o_lat, *uv, torch.float32)
    assert o.shape == (b, h * v) and o.is_contiguous()
    w_uv = fp8_dequantize_weight(w, s).view(h, nope + v, c)[:, nope:]
    mag = torch.einsum("bhc,hvc->bhv", o_lat.abs(), w_uv.abs()).flatten(1)
    _assert_sums_close(o, absorb_o_ref(o_lat, *uv, torch.float32), mag, c)
    # a 16-bit output is the same fp32 sums, rounded once to nearest even
    assert torch.equal(absorb_o(o_lat, *uv, torch.bfloat16), o.bfloat16())


@interp
def test_empty_batch() -> None:
    uk, uv = _halves(*_kv_b(2, 16, 16, 32, False, seed=0), 2, 16)
    q_lat, q_pe = absorb_q(torch.empty(0, 2, 32), torch.empty(0, 8), torch.empty(0, 8), *uk)
    assert q_lat.shape == (0, 2, 32) and q_pe.shape == (0, 2, 16)
    assert absorb_o(torch.empty(0, 2, 32), *uv, torch.float32).shape == (0, 32)


@interp
def test_triton_mla_reads_kv_b_without_copies(tmp_path) -> None:
    """The Triton backend's FP8 kv_b has no BF16 W_UK / W_UV beside it; the torch backend keeps them; the
    memory planner counts what each allocates."""
    path = make_tiny(tmp_path, "v2")
    cfg, scheme = read_config(path)[0], Scheme.by_role(SCHEMES["fp8-int4"], "fp8-int4")
    for backend in ("torch", "triton"):
        net = dsq.load_quantized(path, backend=backend, quantize="fp8-int4").net
        mlas = [m for m in net.modules() if isinstance(m, MLA)]
        assert all((m.w_uk is None) == (backend == "triton") for m in mlas), backend
        loaded = sum(t.numel() * t.element_size() for t in [*net.parameters(), *net.buffers()]) - net.inv_freq.nbytes
        assert sum(weight_bytes(cfg, scheme, torch.float32, backend=backend).values()) == loaded, backend


def _step(net, cache, seqs: list[tuple[int, int, int, list[int]]], tokens: list[int], pos: list[int]) -> torch.Tensor:
    """One forward over sequences (start, length, context, [its one page of 8 slots])."""
    slots = [s[3][0] * 8 + p for s in seqs for p in range(s[2] - s[1], s[2])]
    return net(torch.tensor(tokens), torch.tensor(pos), Attention.build(cache, seqs, slots, "cpu"))


@interp
@pytest.mark.parametrize("batch", [1, 64])
def test_decode_step_logits_equal_torch_backend(tmp_path, batch: int) -> None:
    """One decode step at `batch` (decodes only: the path a CUDA graph replays), then the same decodes beside
    a fresh prefill (decode rows scattered into the step): the Triton backend's logits against the torch
    backend's, within test_backends' bound for fp32 models (they differ by fp32 summation orders), row by row.
    Except for discrete jumps: in any token one FP8 activation rounding or router choice can flip between the
    backends (2e-3 in one of 192 prompt tokens, 1e-5 in a decode row, at batch 64), so at most a tenth of the
    sequences may differ, in their prompt or their steps, and every step row of a sequence whose prompt agrees
    stays within 2^-5 (a wrong row, slot or page is O(1) off)."""
    path = make_tiny(tmp_path, "v2")
    lens = [2 + i % 3 for i in range(batch)]  # prompt lengths; one page of 8 slots per sequence
    gen = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(0, 1000, (n,), generator=gen).tolist() for n in lens]
    new = torch.randint(0, 1000, (batch + 3,), generator=gen).tolist()
    starts = [sum(lens[:i]) for i in range(batch)]
    logits = {}
    for backend in ("torch", "triton"):
        net = dsq.load_quantized(path, backend=backend, quantize="fp8-int4").net
        cache = net.new_cache(batch + 1, page_size=8)
        step = lambda seqs, tokens, pos, net=net, cache=cache: _step(net, cache, seqs, tokens, pos)
        prompt = step([(s, n, n, [i]) for i, (s, n) in enumerate(zip(starts, lens, strict=True))],
                      [t for p in prompts for t in p], [p for n in lens for p in range(n)])
        alone = step([(i, 1, n + 1, [i]) for i, n in enumerate(lens)], new[:batch], lens)
        decodes = [(i, 1, n + 2, [i]) for i, n in enumerate(lens)]
        mixed = step([*decodes, (batch, 3, 3, [batch])], new, [n + 1 for n in lens] + [0, 1, 2])
        logits[backend] = prompt, torch.stack([alone, mixed[:batch]], dim=1)  # [B, 2, V]
    rel = lambda a, b: (a - b).norm(dim=-1) / b.norm(dim=-1)
    prompt_rel = rel(logits["triton"][0], logits["torch"][0])
    same = [i for i, (s, n) in enumerate(zip(starts, lens, strict=True)) if (prompt_rel[s:s + n] < 1e-5).all()]
    steps = rel(logits["triton"][1], logits["torch"][1])[same]  # [sequences, 2]
    jumps = int((steps >= 1e-5).any(dim=1).sum())
    assert batch - len(same) + jumps <= batch // 10, f"{batch - len(same)} prompts and {jumps} steps of {batch} differ"
    assert (steps < 2**-5).all(), steps.max()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("block", [False, True])
@pytest.mark.parametrize("b", [1, 64, 70])
def test_gpu_absorb_v2_lite(b: int, block: bool) -> None:
    """V2-Lite shapes, bf16 activations. The GPU's dots take bf16 operands: q is bf16 already and the
    dequantized weight is rounded once (relative u = 2^-9), o_lat and the weight both (2u + u^2); the
    products are exact in fp32 and summed in fp32. absorb_o's bf16 output is its fp32 sum rounded once."""
    h, nope, rope, v, c = 16, 128, 64, 128, 512
    gen = torch.Generator().manual_seed(b)
    w, s = (t.cuda() for t in _kv_b(h, nope, v, c, block, seed=b))
    q = (torch.randn(b, h, nope + rope, generator=gen) * 3).bfloat16().cuda()
    cos, sin = (t.cuda() for t in _rope(b, rope, gen))
    uk, uv = _halves(w, s, h, nope)
    q_lat, q_pe = absorb_q(q, cos, sin, *uk)
    want_lat, want_pe = absorb_q_ref(q, cos, sin, *uk)
    assert torch.equal(q_pe, want_pe)
    w_per_head = fp8_dequantize_weight(w, s).view(h, nope + v, c)
    mag = torch.einsum("bhp,hpc->bhc", q[..., :nope].float().abs(), w_per_head[:, :nope].abs())
    _assert_sums_close(q_lat, want_lat, mag, nope, U_BF16)
    o_lat = torch.randn(b, h, c, generator=gen).cuda()
    o = absorb_o(o_lat, *uv, torch.float32)
    mag = torch.einsum("bhc,hvc->bhv", o_lat.abs(), w_per_head[:, nope:].abs()).flatten(1)
    _assert_sums_close(o, absorb_o_ref(o_lat, *uv, torch.float32), mag, c, 2 * U_BF16 + U_BF16**2)
    assert torch.equal(absorb_o(o_lat, *uv, torch.bfloat16), o.bfloat16())
