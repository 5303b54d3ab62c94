"""MLA cache-write and decode kernels against their torch references (interpreter here, GPU when marked).

The interpreter runs the very code the GPU runs except the dot operand dtype (fp32 here, bf16 there), so
the bit-exact cache-write tests cover the norm, rope, scale and the fp8/bf16 rounding on both; only the
gpu tests see bf16 tensor-core dots, the compiled integer ops and CUDA-graph capture.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from dsq.kernels.common import round_bf16, round_e4m3
from dsq.kernels.mla_cache import write_latent_cache
from dsq.kernels.mla_decode import default_num_splits, mla_decode
from dsq.latent import (
    GROUP,
    LatentPool,
    alloc_pool,
    cache_bytes_per_token,
    gather_latents,
    mla_decode_ref,
    write_latent_cache_ref,
)

# the interpreter's own loop bounds trip a numpy deprecation; nothing of ours
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
C, R = 512, 64
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _rope_tables(positions: torch.Tensor, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 10000.0 ** (-torch.arange(R // 2, device=device) / (R // 2))
    angle = positions.to(device).float()[:, None] * inv_freq
    return angle.cos(), angle.sin()


def _kv_a(n: int, gen: torch.Generator, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """kv_a_proj-like rows: channels of very different scales plus a few outlier channels."""
    chan = torch.exp(torch.randn(C + R, generator=gen))
    chan[torch.randperm(C, generator=gen)[:6]] *= 20
    return (torch.randn(n, C + R, generator=gen) * chan).to(dtype)


def _norm_weight(gen: torch.Generator) -> torch.Tensor:
    return (torch.rand(C, generator=gen) * 2 + 0.05).bfloat16()


def _filled_pool(kind: str, num_pages: int, page_size: int, device: str = "cpu", seed: int = 0) -> LatentPool:
    """A pool whose every slot holds a written token (through the torch path, fast on CPU)."""
    gen = torch.Generator().manual_seed(seed)
    pool = alloc_pool(num_pages, page_size, kind, device)
    n = num_pages * page_size
    cos, sin = _rope_tables(torch.randint(0, 4096, (n,), generator=gen), device)
    write_latent_cache_ref(pool, _kv_a(n, gen).to(device), _norm_weight(gen).to(device), 1e-6, cos, sin,
                           torch.arange(n, device=device))
    return pool


def _page_table(lens: list[int], page_size: int, num_pages: int, gen: torch.Generator) -> torch.Tensor:
    """Each sequence gets distinct pages in shuffled order; unused entries are -1 (never dereferenced)."""
    width = max(triton.cdiv(n, page_size) for n in lens) + 1
    assert sum(triton.cdiv(n, page_size) for n in lens) <= num_pages
    ids = torch.randperm(num_pages, generator=gen)
    table = torch.full((len(lens), width), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(lens):
        k = triton.cdiv(n, page_size)
        table[b, :k] = ids[used:used + k]
        used += k
    return table


def _queries(b: int, h: int, gen: torch.Generator, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Latent and rope queries scaled so the softmax (scale 0.1) is neither flat nor one-hot."""
    q_lat = torch.randn(b, h, C, generator=gen) * 0.5
    return q_lat.to(device), (torch.randn(b, h, R, generator=gen) * 0.3).to(device)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _assert_pools_equal(a: LatentPool, b: LatentPool) -> None:
    for name, x, y in zip(LatentPool._fields, a, b, strict=True):
        if x is not None:
            diff = (_bits(x) != _bits(y)).sum().item()
            assert diff == 0, f"{name}: {diff} of {x.numel()} values differ"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ------------------------------------------------------------------------------------------- layout


def test_cache_bytes_per_token() -> None:
    assert cache_bytes_per_token("fp8") == 656
    assert cache_bytes_per_token("bf16") == 1152
    pool = alloc_pool(2, 64, "fp8", "cpu")
    assert sum(t[0, 0].numel() * t.element_size() for t in pool) == 656
    with pytest.raises(ValueError):
        cache_bytes_per_token("int8")


# ------------------------------------------------------------------------------------------- cache write


@triton.jit
def _round_kernel(x_ptr, f8_ptr, bf_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    x = tl.load(x_ptr + offs)
    tl.store(f8_ptr + offs, round_e4m3(x).to(tl.uint8))
    tl.store(bf_ptr + offs, round_bf16(x))


def test_integer_roundings_match_torch_casts() -> None:
    """Every e4m3 value, every midpoint between neighbours (ties to even) and a hair either side of it."""
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[grid.isfinite() & (grid >= 0)].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    vals = torch.cat([grid, mids, mids.nextafter(torch.tensor(0.0)), mids.nextafter(torch.tensor(1e9)),
                      torch.randn(2000) * 50, torch.randn(1000) * 1e-3, torch.tensor([0.0, 2.0 ** -10, 2.0 ** -11])])
    vals = torch.cat([vals, -vals])
    n = triton.next_power_of_2(vals.numel())
    x = torch.cat([vals, torch.zeros(n - vals.numel())])
    f8 = torch.empty(n, dtype=torch.uint8)
    bf = torch.empty(n, dtype=torch.int16)
    _round_kernel[(1,)](x, f8, bf, N=n)
    assert torch.equal(f8, x.to(torch.float8_e4m3fn).view(torch.uint8))
    assert torch.equal(bf, x.bfloat16().view(torch.int16))


@pytest.mark.parametrize("kind", ["fp8", "bf16"])
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32])
def test_cache_write_bit_exact(kind: str, in_dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    n, bs, nb = 12, 16, 4
    x = _kv_a(n, gen, in_dtype)
    x[2, :C] = 0  # an all-zero latent: scale stays finite, values 0
    x[5, :GROUP] *= 1e-30  # a group 1e-30 times smaller than the rest: a tiny scale, still exact
    w = _norm_weight(gen)
    cos, sin = _rope_tables(torch.randint(0, 100_000, (n,), generator=gen))
    slots = torch.randperm(nb * bs, generator=gen)[:n].int()
    got, want = alloc_pool(nb, bs, kind, "cpu"), alloc_pool(nb, bs, kind, "cpu")
    write_latent_cache(got, x, w, 1e-6, cos, sin, slots)
    write_latent_cache_ref(want, x, w, 1e-6, cos, sin, slots)
    _assert_pools_equal(got, want)
    assert got.kv.view(-1, C)[slots.long()].float().abs().sum() > 0


@pytest.mark.parametrize("kind", ["fp8", "bf16"])
def test_cache_write_ref_maths(kind: str) -> None:
    """The reference stores RMSNorm(c) * w and the interleaved rope of k_pe, up to the format's rounding."""
    gen = torch.Generator().manual_seed(2)
    n, bs = 40, 16
    x = _kv_a(n, gen, torch.float32)
    w = _norm_weight(gen).float()
    pos = torch.randint(0, 10_000, (n,), generator=gen)
    cos, sin = _rope_tables(pos)
    pool = alloc_pool(4, bs, kind, "cpu")
    table = torch.tensor([[3, 0, 2], [1, -1, -1]], dtype=torch.int32)  # 30 tokens in pages 3, 0; 10 in 1
    lens = torch.tensor([30, 10], dtype=torch.int32)
    t = torch.cat([torch.arange(30), torch.arange(10)])
    slots = torch.tensor([3, 0, 1])[torch.cat([t[:30] // bs, torch.full((10,), 2)])] * bs + t % bs
    write_latent_cache_ref(pool, x, w, 1e-6, cos, sin, slots.int())
    lat, pe = gather_latents(pool, table, lens)
    assert lat.shape == (2, 3 * bs, C) and pe.shape == (2, 3 * bs, R)
    assert lat[1, 10:].abs().sum() == 0 and pe[0, 30:].abs().sum() == 0
    lat = torch.cat([lat[0, :30], lat[1, :10]]).double()
    pe = torch.cat([pe[0, :30], pe[1, :10]]).double()
    c64 = x[:, :C].double()
    norm = c64 * torch.rsqrt(c64.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    x0, x1 = x[:, C::2].double(), x[:, C + 1::2].double()
    cs, sn = cos.double(), sin.double()
    rope = torch.stack((x0 * cs - x1 * sn, x0 * sn + x1 * cs), -1).flatten(-2)
    # half an ulp of e4m3 (3 mantissa bits) or bf16 (7), an e4m3 subnormal step below 2^-6 * scale, and
    # the fp32 arithmetic (relative 1e-6 of the inputs)
    amax = norm.view(n, -1, GROUP).abs().amax(-1).repeat_interleave(GROUP, -1)
    tol = norm.abs() * 2.0 ** -4 + amax * 2.0 ** -18 if kind == "fp8" else norm.abs() * 2.0 ** -8
    assert ((lat - norm).abs() <= tol + norm.abs() * 1e-6).all()
    pair = torch.sqrt(x0 ** 2 + x1 ** 2).repeat_interleave(2, -1)
    assert ((pe - rope).abs() <= rope.abs() * 2.0 ** -8 + pair * 1e-6).all()


def test_scale_granularity() -> None:
    """The measurement behind the fp8 layout: o_lat error of each scale granularity (the numbers quoted in
    kernels/mla_cache.py; run with -s to see them). Per token and group must beat per layer and per token."""
    gen = torch.Generator().manual_seed(3)
    s, h, bs = 1024, 16, 64
    pool_bf = _filled_pool("bf16", s // bs, bs, seed=3)
    pool_f8 = _filled_pool("fp8", s // bs, bs, seed=3)
    table = torch.arange(s // bs, dtype=torch.int32)[None]
    lens = torch.tensor([s], dtype=torch.int32)
    lat, pe = gather_latents(pool_bf, table, lens)  # bf16-exact latents, the "true" cache content

    def attend(lat: torch.Tensor, pe: torch.Tensor, q: torch.Tensor, qp: torch.Tensor) -> torch.Tensor:
        p = torch.softmax((q @ lat.transpose(1, 2) + qp @ pe.transpose(1, 2)).double() * 0.1, -1).float()
        return p @ lat

    def fake_fp8(x: torch.Tensor, amax: torch.Tensor, pow2: bool = False) -> torch.Tensor:
        scale = amax / 448
        scale = torch.exp2(torch.ceil(torch.log2(scale))) if pow2 else scale
        return (x / scale).to(torch.float8_e4m3fn).float() * scale

    kv = torch.cat([lat, pe], -1)
    errors = {}
    for spread, qs in (("spread", 0.2), ("peaked", 1.0)):  # score std ~0.5 and ~2.7
        q, qp = torch.randn(1, h, C, generator=gen) * qs, torch.randn(1, h, R, generator=gen) * 0.3
        ref = attend(lat, pe, q, qp)
        layer = fake_fp8(kv, kv.abs().amax())
        token = fake_fp8(kv, kv.abs().amax(-1, keepdim=True))
        f8_lat, f8_pe = gather_latents(pool_f8, table, lens)
        groups = lat.view(1, s, -1, GROUP)
        pow2 = fake_fp8(groups, groups.abs().amax(-1, keepdim=True), pow2=True).view(1, s, C)
        errors[spread] = {
            "per layer": _rel(attend(layer[..., :C], layer[..., C:], q, qp), ref),
            "per token": _rel(attend(token[..., :C], token[..., C:], q, qp), ref),
            "per token+group (dsq fp8)": _rel(attend(f8_lat, f8_pe, q, qp), ref),
            "per token+group, power-of-two scales": _rel(attend(pow2, pe, q, qp), ref),
        }
        # dsq's fp8 cache differs from the bf16 one only in the latent (pe is bf16 in both)
        assert torch.equal(f8_pe, pe)
        print(f"o_lat relative error, {spread} attention:", {k: f"{v:.2e}" for k, v in errors[spread].items()})
        e = errors[spread]
        assert e["per token+group (dsq fp8)"] < min(e["per layer"], e["per token"],
                                                    e["per token+group, power-of-two scales"])


# ------------------------------------------------------------------------------------------- decode


def _dense_oracle(q: torch.Tensor, qp: torch.Tensor, pool: LatentPool, table: torch.Tensor, lens: list[int],
                  scale: float) -> torch.Tensor:
    """Per sequence, token by token through the page table, dequantized by hand, in float64."""
    bs = pool.page_size
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b, n in enumerate(lens):
        if n == 0:
            continue
        slots = [int(table[b, t // bs]) * bs + t % bs for t in range(n)]
        lat = pool.kv.view(-1, C)[slots].double()
        if pool.scale is not None:
            lat = lat * pool.scale.view(-1, C // GROUP)[slots].double().repeat_interleave(GROUP, -1)
        pe = pool.pe.view(-1, R)[slots].double()
        p = torch.softmax((q[b].double() @ lat.T + qp[b].double() @ pe.T) * scale, -1)
        out[b] = p @ lat
    return out


@pytest.mark.parametrize("kind", ["fp8", "bf16"])
def test_decode_ref_matches_dense_oracle(kind: str) -> None:
    gen = torch.Generator().manual_seed(4)
    lens, bs = [1, 37, 0, 80], 16
    pool = _filled_pool(kind, 16, bs, seed=4)
    table = _page_table(lens, bs, 16, gen)
    q, qp = _queries(len(lens), 16, gen)
    got = mla_decode_ref(q, qp, pool, table, torch.tensor(lens, dtype=torch.int32), 0.1)
    assert _rel(got, _dense_oracle(q, qp, pool, table, lens, 0.1)) < 1e-5
    assert got[2].abs().sum() == 0


# ragged lengths, not multiples of the page, a one-token and an empty context, shuffled pages; split-KV
# off (1) and on (3: some splits of the short sequences are empty); H = 20 leaves a part-filled head tile
DECODE_CASES = [
    # kind, heads, lengths, page, num_splits, query dtype
    ("fp8", 16, [1, 37, 64, 100, 0], 16, 1, torch.float32),
    ("fp8", 16, [1, 37, 64, 100, 0], 16, 3, torch.float32),
    ("bf16", 16, [1, 37, 64, 100, 0], 16, 1, torch.float32),
    ("bf16", 16, [1, 37, 64, 100, 0], 16, 3, torch.float32),
    ("fp8", 20, [150, 5], 64, 2, torch.bfloat16),
    ("bf16", 16, [70, 33], 64, 1, torch.bfloat16),
]


@pytest.mark.parametrize(("kind", "h", "lens", "page", "splits", "dtype"), DECODE_CASES,
                         ids=lambda v: str(v).removeprefix("torch.").replace(", ", "_").strip("[]"))
def test_decode_kernel_matches_ref(kind: str, h: int, lens: list[int], page: int, splits: int,
                                   dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(5)
    num_pages = sum(triton.cdiv(n, page) for n in lens) + 3
    pool = _filled_pool(kind, num_pages, page, seed=5)
    table = _page_table(lens, page, num_pages, gen)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    q, qp = _queries(len(lens), h, gen)
    q, qp = q.to(dtype), qp.to(dtype)
    got = mla_decode(q, qp, pool, table, seq_lens, 0.1, num_splits=splits)
    want = mla_decode_ref(q, qp, pool, table, seq_lens, 0.1)
    assert got.dtype == dtype
    # the interpreter's dots are fp32; a bf16 output adds its own rounding
    tol = 1e-5 if dtype == torch.float32 else 2.0 ** -8
    assert _rel(got, want) < tol
    for b, n in enumerate(lens):
        if n == 0:
            assert got[b].abs().sum() == 0
        else:
            assert _rel(got[b], want[b]) < tol


def test_decode_into_out_buffer() -> None:
    gen = torch.Generator().manual_seed(6)
    pool = _filled_pool("fp8", 4, 16, seed=6)
    table = _page_table([40], 16, 4, gen)
    q, qp = _queries(1, 16, gen)
    out = torch.full((1, 16, C), float("nan"))
    lens = torch.tensor([40], dtype=torch.int32)
    res = mla_decode(q, qp, pool, table, lens, 0.1, num_splits=2, out=out)
    assert res is out and _rel(out, mla_decode_ref(q, qp, pool, table, lens, 0.1)) < 1e-5


def test_default_num_splits() -> None:
    """Host-side shapes only (so a captured graph's grid is fixed); H200 has 132 SMs."""
    assert default_num_splits(1, 16, 31, 132) == 1  # under one 32-token tile: no split
    assert default_num_splits(1, 16, 1024, 132) == 32  # >= 32 tokens per split
    assert default_num_splits(1, 16, 4224, 132) == 132  # one program per SM from 132 x 32 tokens on
    assert default_num_splits(1, 16, 1 << 17, 132) == 132  # no more than one wave
    assert default_num_splits(64, 16, 8192, 132) == 3  # 64 sequences x 3 splits >= 132 programs
    assert default_num_splits(8, 128, 32768, 132) == 3  # 8 head tiles per sequence


@pytest.mark.parametrize("splits", [1, 2, 5, 16, 17, 40])
def test_decode_any_split_count(splits: int) -> None:
    """The reduce merges any number of splits, 16 at a time (17: a part-filled last chunk); 40 splits of
    a 1- and a 37-token context leave most splits empty, and the 0-token one has no split at all."""
    gen = torch.Generator().manual_seed(7)
    lens, page = [300, 1, 37, 0], 16
    num_pages = sum(triton.cdiv(n, page) for n in lens) + 2
    pool = _filled_pool("fp8", num_pages, page, seed=7)
    table = _page_table(lens, page, num_pages, gen)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    q, qp = _queries(len(lens), 16, gen)
    got = mla_decode(q, qp, pool, table, seq_lens, 0.1, num_splits=splits)
    want = mla_decode_ref(q, qp, pool, table, seq_lens, 0.1)
    for b, n in enumerate(lens):  # fp32 queries: the interpreter's fp32 dots, bound as the cases above
        if n == 0:
            assert got[b].abs().sum() == 0
        else:
            assert _rel(got[b], want[b]) < 1e-5


# ------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kind", ["fp8", "bf16"])
def test_gpu_cache_write_bit_exact(kind: str) -> None:
    gen = torch.Generator().manual_seed(7)
    n, bs, nb = 4096, 64, 80
    x = _kv_a(n, gen).cuda()
    w = _norm_weight(gen).cuda()
    cos, sin = _rope_tables(torch.randint(0, 160_000, (n,), generator=gen), "cuda")
    slots = torch.randperm(nb * bs, generator=gen)[:n].int().cuda()
    got, want = alloc_pool(nb, bs, kind, "cuda"), alloc_pool(nb, bs, kind, "cuda")
    write_latent_cache(got, x, w, 1e-6, cos, sin, slots)
    write_latent_cache_ref(want, x, w, 1e-6, cos, sin, slots)
    _assert_pools_equal(got, want)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kind", ["fp8", "bf16"])
@pytest.mark.parametrize("h", [16, 128])
@pytest.mark.parametrize("splits", [None, 1])
def test_gpu_decode_matches_ref(kind: str, h: int, splits: int | None) -> None:
    gen = torch.Generator().manual_seed(8)
    lens, page = [8192, 1, 3000, 777], 64
    num_pages = sum(triton.cdiv(n, page) for n in lens) + 5
    pool = _filled_pool(kind, num_pages, page, "cuda", seed=8)
    table = _page_table(lens, page, num_pages, gen).cuda()
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    q, qp = _queries(len(lens), h, gen, "cuda")
    q, qp = q.bfloat16(), qp.bfloat16()
    got = mla_decode(q, qp, pool, table, seq_lens, 0.1, num_splits=splits)
    want = mla_decode_ref(q, qp, pool, table, seq_lens, 0.1)
    for b in range(len(lens)):  # bf16 operands (q, p, dequantized k) with fp32 accumulation
        assert _rel(got[b], want[b]) < 2e-2, b


@pytest.mark.gpu
@gpu
def test_gpu_decode_cuda_graph() -> None:
    """One capture per batch bucket: replays follow seq_lens and page tables changed in place."""
    gen = torch.Generator().manual_seed(9)
    page, nb, b, h = 64, 260, 4, 16
    pool = _filled_pool("fp8", nb, page, "cuda", seed=9)
    table = _page_table([4096] * b, page, nb, gen)[:, :4096 // page].contiguous().cuda()
    seq_lens = torch.tensor([10, 1000, 4000, 64], dtype=torch.int32, device="cuda")
    q, qp = (t.bfloat16() for t in _queries(b, h, gen, "cuda"))
    out = torch.empty_like(q)
    kw = {"max_seq_len": table.shape[1] * page, "out": out}
    mla_decode(q, qp, pool, table, seq_lens, 0.1, **kw)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        mla_decode(q, qp, pool, table, seq_lens, 0.1, **kw)
    for lens in ([11, 1001, 4001, 65], [4096, 1, 2500, 700]):
        seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        table.copy_(table[:, torch.randperm(table.shape[1], generator=gen).cuda()])
        graph.replay()
        want = mla_decode_ref(q, qp, pool, table, seq_lens, 0.1)
        assert _rel(out, want) < 2e-2
