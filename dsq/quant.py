"""The on-disk number formats (compressed-tensors conventions) and their plain-torch reference maths.

FP8 `float-quantized`: `weight` float8_e4m3fn with `weight_scale` float32, [out, 1] per output channel or
[ceil(out/128), ceil(in/128)] per 128x128 block; activations are quantized per token at run time.

INT4 `pack-quantized`: signed values q in [-8, 7] stored as q+8, eight to an int32 word, element k in
nibble k%8 of word k//8 (lowest column in the lowest nibble): `weight_packed` int32 [out, in/8];
`weight_scale` bf16 [out, in/group]; asymmetric adds `weight_zero_point` (signed, in [-8, 7]) packed the
same way along dim 0: [ceil(out/8), in/group]. Dequantized value = (q - zero) * scale.

Everything here is the reference the Triton kernels are tested against; it runs on any device.

INT4 weights are rounded to nearest with an MSE-optimal clip per group (`int4_search`): for each clip ratio
r of a small grid, every group's range is shrunk by r, the group is quantized exactly as
`int4_quantize(w, group, symmetric, clip=r)` does (same operations, same bf16-rounded scale), and
its squared error is measured; each group keeps the ratio with the least error. Clipping trades a larger
error on the few largest weights for a finer step on all the others, which pays when a group's extreme
value is an outlier. The result is bit-identical to `int4_quantize` with the chosen per-group clip.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK = 128  # FP8 block-scale tile (DeepGEMM / DeepSeek-V3 convention)


# --- FP8 ---------------------------------------------------------------------------------------------
def fp8_quantize_weight(w: torch.Tensor, block: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact amax scaling: per output channel ([out, 1]) or per 128x128 block."""
    w = w.float()
    if not block:
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
        return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale
    tiles = _to_tiles(w)
    scale = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX
    q = (w / _expand_blocks(scale, w.shape)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def is_block_scale(q: torch.Tensor, scale: torch.Tensor) -> bool:
    """[out, 1] (optionally stacked over experts) is per channel; anything else is per 128x128 block."""
    return not (scale.shape[-1] == 1 and scale.shape[-2] == q.shape[-2])


def fp8_dequantize_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 weight from an FP8 weight and its channel ([out, 1]) or block scale."""
    if not is_block_scale(q, scale):
        return q.float() * scale.float()
    return q.float() * _expand_blocks(scale.float(), q.shape)


def fp8_quantize_act(x: torch.Tensor, group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quantization per token (last dim), or per token and `group`-wide slice.

    Returns (fp8 values, float32 scales of shape [..., 1] or [..., ceil(K/group)])."""
    x = x.float()
    if group is None:
        scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
        return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale
    k = x.shape[-1]
    pad = -k % group
    xp = torch.nn.functional.pad(x, (0, pad)).unflatten(-1, (-1, group))
    scale = xp.abs().amax(dim=-1).clamp(min=1e-12) / FP8_MAX
    q = (xp / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).flatten(-2)[..., :k]
    return q.to(FP8), scale


def fp8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Reference W8A8: per-token FP8 activations (per 1x128 group under block scales) times FP8 weights.

    Simulated in float32: exactly the products and scales a fused kernel computes."""
    block = is_block_scale(q, scale)
    xq, xs = fp8_quantize_act(x, BLOCK if block else None)
    if not block:
        return ((xq.float() @ q.float().t()) * xs * scale.float().t()).to(x.dtype)
    k = x.shape[-1]
    xd = (xq.float().unflatten(-1, (-1, BLOCK)) if k % BLOCK == 0 else None)
    if xd is None:  # pad K to whole groups, then drop the padding
        xd = torch.nn.functional.pad(xq.float(), (0, -k % BLOCK)).unflatten(-1, (-1, BLOCK))
    xd = (xd * xs.unsqueeze(-1)).flatten(-2)[..., :k]
    return (xd @ fp8_dequantize_weight(q, scale).t()).to(x.dtype)


def _to_tiles(w: torch.Tensor) -> torch.Tensor:
    """[out, in] -> [out/128, 128, in/128, 128], zero-padded to whole tiles."""
    o, i = w.shape
    w = torch.nn.functional.pad(w, (0, -i % BLOCK, 0, -o % BLOCK))
    return w.view(w.shape[0] // BLOCK, BLOCK, w.shape[1] // BLOCK, BLOCK)


def _expand_blocks(scale: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    o, i = shape[-2:]  # of the last two dims; any leading ones (experts, heads) stay
    return scale.repeat_interleave(BLOCK, -2).repeat_interleave(BLOCK, -1)[..., :o, :i]


# --- INT4 --------------------------------------------------------------------------------------------
def int4_pack(q: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Signed int4 values (any int dtype, in [-8, 7]) -> int32 words along `dim` (0 or 1), 8 per word."""
    if dim == 1 and q.dtype == torch.int8 and q.shape[1] % 8 == 0 and sys.byteorder == "little":
        # Fast path: an int16 view v of the nibbles u0 + 256 * u1 gives u0 + 16 * u1 as the low byte of
        # v | v >> 4, and four such bytes read as an int32 are one word.
        v = (q + 8).contiguous().view(torch.int16)
        return torch.bitwise_or(v, v >> 4, out=v).to(torch.uint8).view(torch.int32)
    u = (q.to(torch.int32) + 8) & 0xF
    if dim == 0:
        u = u.t()
    pad = -u.shape[1] % 8
    u = torch.nn.functional.pad(u, (0, pad)).view(u.shape[0], -1, 8)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=q.device)
    packed = (u << shifts).sum(dim=-1, dtype=torch.int64)  # < 2^32; wrap into int32's range
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    return packed.t().contiguous() if dim == 0 else packed.contiguous()


def int4_unpack(packed: torch.Tensor, n: int, dim: int = 1) -> torch.Tensor:
    """int32 words -> signed int8 values in [-8, 7]; `n` = unpacked length along `dim`."""
    p = packed.t() if dim == 0 else packed
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    u = (p.unsqueeze(-1) >> shifts) & 0xF
    q = (u.flatten(-2)[..., :n] - 8).to(torch.int8)
    return q.t().contiguous() if dim == 0 else q


def int4_quantize(
    w: torch.Tensor, group: int = 128, symmetric: bool = True, clip: torch.Tensor | float = 1.0
) -> dict[str, torch.Tensor]:
    """Round-to-nearest INT4 with per-group scales, the group range shrunk by `clip` ([out, in/group] or a
    float). The scale is rounded to bf16 first, so the stored scale is the one the values were rounded with.

    Returns the compressed-tensors tensors: weight_packed, weight_scale, weight_shape (+ weight_zero_point)."""
    out_f, in_f = w.shape
    assert in_f % group == 0, f"in_features {in_f} is not a multiple of the group size {group}"
    g = w.float().view(out_f, in_f // group, group)
    clip = torch.as_tensor(clip, dtype=torch.float32, device=w.device)
    if symmetric:
        amax = g.abs().amax(dim=-1) * clip
        scale = (amax / 7.5).clamp(min=1e-8).to(torch.bfloat16)  # q = round(x/s) in [-8, 7]: amax -> 7.5
        zero = None
        q = torch.round(g / scale.float().unsqueeze(-1)).clamp(-8, 7)
    else:
        lo = g.amin(dim=-1).clamp(max=0) * clip
        hi = g.amax(dim=-1).clamp(min=0) * clip
        scale = ((hi - lo) / 15).clamp(min=1e-8).to(torch.bfloat16)
        zero = torch.round(-8 - lo / scale.float()).clamp(-8, 7)
        q = (torch.round(g / scale.float().unsqueeze(-1)) + zero.unsqueeze(-1)).clamp(-8, 7)
    out = {
        "weight_packed": int4_pack(q.view(out_f, in_f).to(torch.int8)),
        "weight_scale": scale,
        "weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64),
    }
    if zero is not None:
        out["weight_zero_point"] = int4_pack(zero.to(torch.int8), dim=0)
    return out


def int4_dequantize(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None
) -> torch.Tensor:
    """float32 [out, in] from weight_packed [out, in/8], weight_scale [out, in/group] (+ packed zero point)."""
    out_f, n_groups = scale.shape
    in_f = packed.shape[1] * 8
    group = in_f // n_groups
    q = int4_unpack(packed, in_f).float().view(out_f, n_groups, group)
    if zero is not None:
        q = q - int4_unpack(zero, out_f, dim=0).float().unsqueeze(-1)
    return (q * scale.float().unsqueeze(-1)).view(out_f, in_f)


# --- INT4 clip search -------------------------------------------------------------------------------
# 1.0 first: on a tie the unclipped range wins. Ratios below 0.8 win too rarely to pay for their pass
# (docs/quantization.md: 1.0..0.7 adds 0.00-0.01 dB, a 21-point grid down to 0.5 adds 0.02-0.04 dB).
GRID: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8)


@dataclass
class Int4:
    """One quantized [rows, in] block: values, scales, zero points (asymmetric only) and error sums."""

    q: torch.Tensor  # int8 [rows, in], in [-8, 7]
    scale: torch.Tensor  # bf16 [rows, in/group]
    zero: torch.Tensor | None  # int8 [rows, in/group]
    clip: torch.Tensor  # float32 [rows, in/group], the chosen ratio
    err2: float  # sum of squared weight errors
    norm2: float  # sum of squared weights


def _params(lo: torch.Tensor | None, hi: torch.Tensor, clip: torch.Tensor, symmetric: bool
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (bf16) and zero point (float, asymmetric) for a clip ratio: int4_quantize's arithmetic."""
    if symmetric:
        return (hi * clip / 7.5).clamp(min=1e-8).to(torch.bfloat16), None
    lo, hi = lo * clip, hi * clip
    scale = ((hi - lo) / 15).clamp(min=1e-8).to(torch.bfloat16)
    return scale, torch.round(-8 - lo / scale.float()).clamp(-8, 7)


def int4_search(w: torch.Tensor, group: int = 128, symmetric: bool = True,
                grid: Sequence[float] = GRID) -> Int4:
    """Quantize a [rows, in] weight (in % group == 0) with the per-group clip of least squared error."""
    rows, in_f = w.shape
    g = w.float().view(rows, in_f // group, group)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)  # (two reductions beat one aminmax over a short last dim)
    if symmetric:
        lo, hi = None, torch.maximum(-lo, hi)  # = |g|.amax(), without a |g| copy
    else:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    x = torch.empty_like(g)  # g / scale
    d = torch.empty_like(g)  # q - zero - x: the error in units of the scale
    best = err = scale = zero = None
    for i, r in enumerate(grid):
        s, z = _params(lo, hi, torch.tensor(r, dtype=torch.float32, device=g.device), symmetric)
        _quantize(g, s, z, x, d)
        if z is not None:
            d.sub_(z.unsqueeze(-1))
        e = torch.linalg.vector_norm(d.sub_(x), dim=-1) * s.float()
        if i == 0:
            best, err, scale, zero = torch.zeros_like(e, dtype=torch.long), e, s, z
            continue
        better = e < err  # strict: on a tie the larger ratio, met first, stays
        best = torch.where(better, i, best)
        err, scale = torch.where(better, e, err), torch.where(better, s, scale)
        zero = None if z is None else torch.where(better, z, zero)
    if len(grid) > 1:  # quantize again with each group's best scale rather than keep a copy per ratio
        _quantize(g, scale, zero, x, d)
    clip = torch.tensor(grid, dtype=torch.float32, device=g.device)[best]
    return Int4(d.to(torch.int8).view(rows, in_f), scale, None if zero is None else zero.to(torch.int8), clip,
                err.square().sum().item(), torch.linalg.vector_norm(g).square().item())


def _quantize(g: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, x: torch.Tensor,
              q: torch.Tensor) -> None:
    """x = g / scale and q = clamp(round(x) + zero, -8, 7), in place, as int4_quantize computes them."""
    torch.div(g, scale.float().unsqueeze(-1), out=x)
    torch.round(x, out=q)
    if zero is not None:
        q.add_(zero.unsqueeze(-1))
    q.clamp_(-8, 7)
