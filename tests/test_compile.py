"""The kernels as an H200 compiles them, checked on a CPU: no register spills, shared memory that fits,
every `tl.dot` on the tensor cores.

The interpreter never runs Triton's GPU compiler, which rejects things the interpreter accepts, and what it
compiles depends on the launch: the wrappers pick tiles from the GPU's SM count, and Triton specializes
each launch on its arguments (an integer equal to 1 becomes a constant, an integer or pointer divisible
by 16 is marked so, int64 expert ids are a different pointer type). So this file, run as a script, calls
the real wrappers on CPU tensors of DeepSeek-V2-Lite's shapes with Triton's driver replaced by an sm_90
target that compiles each launch instead of running it (`JITFunction.run(warmup=True)`, Triton's own
ahead-of-time path), the SM count set to an H200's 132, and prints one JSON line per compiled kernel.
"""

from __future__ import annotations

import importlib
import itertools
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

H200_SMS = 132
SMEM_BYTES = 232448  # 227 KB: the most shared memory one block may use on sm_90 (CUDA C Programming Guide)
# DeepSeek-V2-Lite (config.json of deepseek-ai/DeepSeek-V2-Lite)
HIDDEN, HEADS, NOPE, ROPE, V_DIM, KV_LORA = 2048, 16, 128, 64, 128, 512
DENSE, MOE, EXPERTS, TOP_K, SHARED = 10944, 1408, 64, 6, 2
DECODE_M = (1, 8, 16, 32, 64)  # the CUDA-graph batch buckets a decode step runs at
PREFILL_M = (512, 4096)  # a prefill chunk (generate's default chunk is 4096 tokens)
CONTEXTS = (32, 4096, 32768)  # cache lengths: one 32-token tile (1 KV split), a few splits, many

# a 16-bit tile loaded from shared memory or converted into the layout of a dot's B operand
B_MOVE = r"(?:ttg\.local_load|ttg\.convert_layout) [^\n]*-> tensor<[^>]*x(?:bf16|f16), #ttg\.dot_op<\{opIdx = 1"
KERNELS = {"_act_quant_kernel", "_fp8_gemm_kernel", "_int4_gemm_kernel", "_splitk_reduce_kernel", "_moe_kernel",
           "_cache_write_kernel", "_decode_kernel", "_reduce_kernel", "_add_rms_norm_kernel", "_router_kernel",
           "_moe_align_kernel", "_absorb_q_kernel", "_absorb_o_kernel", "_naive_qk_kernel"}


def launch_all() -> None:
    """Every wrapper as the model calls it: dtypes, layouts and index types of dsq.model / dsq.cache."""
    import torch

    from dsq.latent import alloc_pool

    kernel = lambda name: importlib.import_module("dsq.kernels." + name)  # the package attributes are the functions
    fg, ig, fm, mc, md, nm, rt, aq, ma, mp = (kernel(n) for n in ("fp8_gemm", "int4_gemm", "fused_moe", "mla_cache",
                                                                  "mla_decode", "norm", "router", "act_quant",
                                                                  "mla_absorb", "mla_prefill"))
    bf16, fp8 = torch.bfloat16, torch.float8_e4m3fn
    x = lambda m, k: torch.empty(m, k, dtype=bf16)
    # the norms (hidden; V2's q_lora 1536 and hidden 5120) with the residual add, unquantized or quantized for
    # channel / block-scaled FP8 linears; the router of V2-Lite (64 experts, greedy) and V2 (160, 8 groups)
    quants = ((False, None), (True, None), (True, 128))
    for k, m, (quant, group), add in itertools.product((HIDDEN, KV_LORA, 1536, 5120), (1, 64, 4096), quants,
                                                        (True, False)):
        nm.add_rms_norm(x(m, k), torch.empty(k, dtype=bf16), 1e-6, x(m, k) if add else None, quant=quant, group=group)
    for m in (1, 64, 4096):  # logits in the kernel (decode sizes) or read from a torch GEMM's (prefill)
        rt.route(x(m, HIDDEN), torch.empty(EXPERTS, HIDDEN), TOP_K)
        rt.route(x(m, 5120), torch.empty(160, 5120), TOP_K, groups=8, topk_groups=3, scale=16.0)
    # FP8 linears (attention, shared experts, the dense MLP), channel or 128x128 block scales; q_proj + kv_a and
    # gate + up as joined at load (dsq.layers.join)
    fp8_linears = [(HEADS * (NOPE + ROPE), HIDDEN), (KV_LORA + ROPE, HIDDEN), (HEADS * (NOPE + V_DIM), KV_LORA),
                   (HIDDEN, HEADS * V_DIM), (SHARED * MOE, HIDDEN), (HIDDEN, SHARED * MOE), (DENSE, HIDDEN),
                   (HIDDEN, DENSE), (HEADS * (NOPE + ROPE) + KV_LORA + ROPE, HIDDEN), (2 * SHARED * MOE, HIDDEN),
                   (2 * DENSE, HIDDEN)]
    for (n, k), m, block in itertools.product(fp8_linears, DECODE_M + PREFILL_M, (False, True)):
        scale = torch.empty(-(-n // 128), -(-k // 128)) if block else torch.empty(n, 1)
        fg.fp8_gemm(x(m, k), torch.empty(n, k, dtype=fp8), scale)
    # silu(gate) * up quantized for down_proj, reading the two halves of the joined gate + up output
    for inter, m, group in itertools.product((SHARED * MOE, DENSE), DECODE_M + PREFILL_M, (None, 128)):
        gate, up = x(m, 2 * inter).split(inter, dim=1)
        aq.silu_mul_quant(gate, up, group)
    # INT4 linears (`dsq quantize --shared int4`): the shared experts, g128 (the zero-point path is the
    # MoE kernel's, compiled below)
    for (n, k), m in itertools.product([(SHARED * MOE, HIDDEN), (HIDDEN, SHARED * MOE)], DECODE_M + PREFILL_M):
        ig.int4_gemm(x(m, k), torch.empty(n, k // 8, dtype=torch.int32), torch.empty(n, k // 128, dtype=bf16))
    # routed experts in each format, routed by the gate's int64 top-k ids
    for fmt, m in itertools.product(("int4", "int4-asym", "fp8", "fp8-block"), DECODE_M + PREFILL_M):
        ws = [_experts(fmt, n, k) for n, k in ((MOE, HIDDEN), (HIDDEN, MOE), (MOE, HIDDEN))]
        ids = torch.randint(0, EXPERTS, (m, TOP_K), generator=torch.Generator().manual_seed(m))
        fm.fused_moe(x(m, HIDDEN), ids, torch.empty(m, TOP_K), *ws, add=x(m, HIDDEN))  # + the shared experts
    # the grouped path's sort at V2's 160 experts too (V2-Lite's 64 are launched by fused_moe above)
    for m, bm in itertools.product(PREFILL_M, (16, 32, 64)):
        kernel("moe_align").moe_align(torch.zeros(m, TOP_K, dtype=torch.long), 160, bm)
    # the latent cache: write (kv_a of one token or a prefill chunk), then absorbed decode (fp32 latent
    # queries, bf16 rope queries) over a page table sized for the cache length
    for kind in ("fp8", "bf16"):
        pool = alloc_pool(1, 64, kind, "cpu", KV_LORA, ROPE)
        for n in (1, 4096):
            mc.write_latent_cache(pool, x(n, KV_LORA + ROPE), torch.empty(KV_LORA, dtype=bf16), 1e-6,
                                  torch.empty(n, ROPE // 2), torch.empty(n, ROPE // 2),
                                  torch.zeros(n, dtype=torch.long))
        for b, context in itertools.product(DECODE_M, CONTEXTS):
            table = torch.zeros(b, context // 64, dtype=torch.int32)
            md.mla_decode(torch.empty(b, HEADS, KV_LORA), torch.empty(b, HEADS, ROPE, dtype=bf16), pool, table,
                          torch.ones(b, dtype=torch.int32), 0.1, max_seq_len=context)
    # the absorbed projections around it, reading kv_b's FP8 weight (channel or block scales): q from q_proj's
    # output rows, o_lat as mla_decode returns it
    for b, block in itertools.product(DECODE_M, (False, True)):
        w = torch.empty(HEADS, NOPE + V_DIM, KV_LORA, dtype=fp8)  # kv_b's rows per head, as dsq.model.MLA.uk_uv
        scale = torch.empty(HEADS, 2, KV_LORA // 128) if block else torch.empty(HEADS, NOPE + V_DIM, 1)
        rows = scale.shape[1] * NOPE // (NOPE + V_DIM)
        (uk, uv), (uk_s, uv_s) = w.split([NOPE, V_DIM], 1), scale.split([rows, scale.shape[1] - rows], 1)
        ma.absorb_q(x(b, HEADS * (NOPE + ROPE)).view(b, HEADS, -1), torch.empty(b, ROPE // 2),
                    torch.empty(b, ROPE // 2), uk, uk_s)
        ma.absorb_o(torch.empty(b, HEADS, KV_LORA), uv, uv_s, bf16)
    # the naive path's q and k for a prefill chunk: fresh (k_pe roped here) or continuing a cached prefix
    for t, s, fresh in ((PREFILL_M[0], PREFILL_M[0], True), (PREFILL_M[0], PREFILL_M[1], False)):
        q = x(t, HEADS * (NOPE + ROPE)).view(t, HEADS, -1)
        k_nope = x(s, HEADS * (NOPE + V_DIM)).view(s, HEADS, -1)[..., :NOPE]
        mp.naive_qk(q, k_nope, x(s, KV_LORA + ROPE)[:, KV_LORA:], torch.empty(t, ROPE // 2), torch.empty(t, ROPE // 2),
                    fresh)


def _experts(fmt: str, n: int, k: int) -> dict:
    """Stacked expert tensors of one projection [E, N, K] as dsq's loader holds them (never read here)."""
    import torch

    e = EXPERTS
    if fmt.startswith("fp8"):
        scale = (e, -(-n // 128), -(-k // 128)) if fmt == "fp8-block" else (e, n, 1)
        return {"weight": torch.empty(e, n, k, dtype=torch.float8_e4m3fn), "weight_scale": torch.empty(scale)}
    d = {"weight_packed": torch.empty(e, n, k // 8, dtype=torch.int32),
         "weight_scale": torch.empty(e, n, k // 128, dtype=torch.bfloat16)}
    if fmt == "int4-asym":
        d["weight_zero_point"] = torch.empty(e, -(-n // 8), k // 128, dtype=torch.int32)
    return d


def warp_repeats(ttgir: str) -> int:
    """How many warps compute each mma.sync output element (1: none repeats another's work): per dot, the
    warps laid along a dim times the instruction's extent there, over the tile's extent, multiplied."""
    layouts = {name: (json.loads(warps), json.loads(instr)) for name, warps, instr in re.findall(
        r"^(#mma\d*) = #ttg\.nvidia_mma<\{versionMajor = 2[^}]*warpsPerCTA = (\[[\d, ]*\]), "
        r"instrShape = (\[[\d, ]*\])", ttgir, re.M)}
    worst = 1
    for shape, name in re.findall(r"= tt\.dot [^\n]*-> tensor<([\dx]+)xf32, (#mma\d*)>", ttgir):
        warps, instr = layouts[name]
        dims = [int(d) for d in shape.split("x")]
        worst = max(worst, math.prod(max(1, w * i // d) for w, i, d in zip(warps, instr, dims, strict=True)))
    return worst


def compile_for_h200(shard: int, shards: int) -> None:
    """Run launch_all against an sm_90 target; print the facts of every `shards`-th distinct kernel."""
    import contextlib
    import io

    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    class H200:  # what JITFunction.run asks the driver
        def get_current_device(self) -> int:
            return 0

        def get_current_stream(self, device: int | None = None) -> int:
            return 0

        def get_current_target(self) -> GPUTarget:
            return GPUTarget("cuda", 90, 32)

    driver.set_active(H200())
    knobs.nvidia.dump_ptxas_log = True  # Triton's own `ptxas -v` run (its flags, sm_90a) prints its log
    seen, jit_run = set(), JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        """Compile the launch once per specialization, ignoring which integers are divisible by 16 (it only
        changes how masks vectorize, and compiling each such variant too takes half as long again)."""
        _, _, _, _, binder = self.device_caches[0]
        bound, spec, _ = binder(*args, **kwargs)
        values = [v for (kind, _), v in zip(spec, bound.values(), strict=True) if kind == "constexpr"]
        key = (self.__name__, str([kind for kind, _ in spec]), str(values), str(sorted(kwargs.items())))
        if key in seen:
            return
        seen.add(key)
        if len(seen) % shards != shard:
            return
        with contextlib.redirect_stdout(io.StringIO()) as log:
            k = jit_run(self, *args, grid=grid, warmup=True, **kwargs)
        ptxas, ttgir, ptx = log.getvalue(), k.asm["ttgir"], k.asm["ptx"]
        dots = re.findall(r"= (tt\.dot|ttng\.warp_group_dot) .*?-> tensor<[^#]*#(\w+)", ttgir)
        print(json.dumps(dict(
            kernel=k.name, signature=k.src.signature, warps=k.metadata.num_warps, stages=k.metadata.num_stages,
            constants={self.arg_names[p[0]]: str(v) for p, v in k.src.constants.items()},
            spill=int(re.search(r"(\d+) bytes spill stores", ptxas).group(1)),
            registers=int(re.search(r"Used (\d+) registers", ptxas).group(1)), shared=k.metadata.shared,
            ttir_dots=len(re.findall(r"= tt\.dot ", k.asm["ttir"])), ttgir_dots=[op + "/" + enc for op, enc in dots],
            wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)), mma=len(re.findall(r"\bmma\.sync", ptx)),
            b_moves=len(re.findall(B_MOVE, ttgir)),
            mma_warps=[json.loads(w) for w in re.findall(r"nvidia_mma<\{[^}]*warpsPerCTA = (\[[\d, ]*\])", ttgir)],
            warp_repeats=warp_repeats(ttgir),
        )), flush=True)

    JITFunction.run = compile_only
    cm, ig, fg, fm, md = (importlib.import_module("dsq.kernels." + n)
                          for n in ("common", "int4_gemm", "fp8_gemm", "fused_moe", "mla_decode"))
    # where the wrappers ask the device: its SM count, and whether it runs compiled code (bf16 dots)
    ig.sm_count = fg.sm_count = fm.sm_count = lambda t: H200_SMS
    real_splits = md.default_num_splits
    md.default_num_splits = lambda batch, heads, seq, sms, *a: real_splits(batch, heads, seq, H200_SMS, *a)
    cm.interpreted = lambda t: False  # common.dot_dtype asks it for every kernel
    launch_all()


@pytest.mark.slow
def test_kernels_compile_for_an_h200_as_launched(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real: a cached kernel runs no ptxas, so logs none
    shards = 2  # one process per core of the CI machine
    runs = [subprocess.Popen([sys.executable, __file__, str(i), str(shards)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for i in range(shards)]
    outs = [run.communicate(timeout=1800) for run in runs]  # a safety net: ~40 s of CPU per process
    assert all(run.returncode == 0 for run in runs), [err[-3000:] for _, err in outs]
    kernels = [json.loads(line) for out, _ in outs for line in out.splitlines()]
    assert {k["kernel"] for k in kernels} == KERNELS
    for k in kernels:
        what = (k["kernel"], k["constants"])
        assert k["spill"] == 0, what
        assert k["shared"] <= SMEM_BYTES, what
        # each tl.dot of the kernel (TTIR) is a tensor-core op after layout (an #mma result, or wgmma),
        # not the FMA fallback (#blocked), and the PTX holds mma.sync or wgmma instructions
        assert len(k["ttgir_dots"]) == k["ttir_dots"], what
        assert all(d.startswith("ttng.warp_group_dot") or d.endswith("/mma") for d in k["ttgir_dots"]), what
        assert (k["wgmma"] + k["mma"] > 0) == (k["ttir_dots"] > 0), what
        # no warp repeats another's work (kernels.common.mma_warps), except MLA decode's q k^T of a 32-token tile
        # on the 8 warps its [16, 512] p v dot takes: 2 per column block (bench/mla.py times the alternatives,
        # 64-token tiles and 4 warps)
        assert k["warp_repeats"] == (2 if k["kernel"] == "_decode_kernel" else 1), what
    # INT4 on mma.sync in steps of 128-column slices (the decode tiles of both INT4 kernels, zero points or
    # not): the weight operand is dequantized from the packed words in the MMA's register layout, never moved
    # there as a 16-bit tile through shared memory or a layout conversion, and each warp runs its own slice
    # (warps along the 3-D dot's batch only: a warp sharing a slice would repeat its work) (int4_dot)
    planes = [k for k in kernels if k["signature"].get("wp_ptr", k["signature"].get("w_ptr")) == "*i32"
              and k["mma"] and int(k["constants"]["BK"]) >= 128]
    assert {(k["kernel"], k["constants"].get("HAS_ZP")) for k in planes} >= {
        ("_int4_gemm_kernel", "False"), ("_moe_kernel", "False"), ("_moe_kernel", "True")}
    assert all(k["b_moves"] == 0 for k in planes), [(k["kernel"], k["constants"]) for k in planes if k["b_moves"]]
    assert all(k["mma_warps"] == [[int(k["constants"]["BK"]) // 128, 1, 1]] for k in planes)
    # the launch specializations the wrappers' real arguments produce are among the compiled kernels
    sig = lambda name, arg: {k["signature"][arg] for k in kernels if k["kernel"] == name}
    assert {"constexpr", "i32"} <= sig("_fp8_gemm_kernel", "M")  # M == 1 is a constant, M > 1 is not
    assert {"constexpr", "i32"} <= sig("_decode_kernel", "num_splits")
    assert {"*i64", "*i32"} <= sig("_moe_kernel", "expert_ids_ptr")  # decode: the gate's ids; grouped: aligned


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    compile_for_h200(int(sys.argv[1]), int(sys.argv[2]))
