"""Tensor + expert parallelism on CPU gloo: N ranks give 1 rank's tokens and logits, each rank reads only its
own part of the checkpoint, splits refuse clearly where a format forbids them, and a dead rank ends the job.

Ranks are real processes: load_quantized(tp=N) makes its process rank 0 and spawns the others, which follow
rank 0's steps (so only rank 0 runs this file's code; run as a script it is that rank 0); torchrun, where every
process makes the call, has a test of its own."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from rich.console import Console
from tiny import V2, endless, make_tiny
from typer.testing import CliRunner

import dsq
import dsq.engine.engine
import dsq.launch
import dsq.quant
from dsq.cache import bytes_per_token
from dsq.checkpoint import Checkpoint
from dsq.cli.main import app
from dsq.config import Config
from dsq.demo import write_tokenizer
from dsq.errors import DsqError
from dsq.formats import Scheme
from dsq.launch import START, TIMEOUT
from dsq.loader import checkpoint_tensors, load_model, read_config
from dsq.memory import rank_plan, weight_bytes
from dsq.parallel import shard_plan as plan
from dsq.parallel import span

IDS = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
PROMPTS = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
NEW = 8
SAMPLING = dict(temperature=1.0, top_p=0.9, seed=5)
CLI = [sys.executable, "-m", "dsq.cli.main"]
FAULTS = [sys.executable, str(Path(__file__).with_name("faults.py"))]  # the CLI with a fault injected
REAL_SAMPLE, REAL_ACT_QUANT = dsq.engine.engine.sample, dsq.quant.fp8_quantize_act
UNEVEN = dict(n_routed_experts=6, n_group=3, topk_group=2, num_attention_heads=6, hidden_size=96,
              intermediate_size=345, vocab_size=1001)  # 4 ranks: 2/2/1/1 experts and heads, 87/86/86/86 columns
BLOCKY = dict(hidden_size=128, num_attention_heads=8, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64,
              kv_lora_rank=64, intermediate_size=512, moe_intermediate_size=256)  # whole 128-blocks on 4 ranks


def unrounded(x: torch.Tensor, group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`fp8_quantize_act` without the rounding to e4m3: the same scales, the scaled values kept in float32."""
    scale = REAL_ACT_QUANT(x, group)[1]
    if group is None:
        return x.float() / scale, scale
    return x.float() / scale.repeat_interleave(group, dim=-1)[..., :x.shape[-1]], scale


UNROUNDED = "UNROUNDED_ACT_QUANT"  # set while the ranks of one load run with `unrounded` (spawned ranks inherit it)


def run(path: Path, world: int, fp8: bool) -> dict:
    """What rank 0 computes from a checkpoint: logits, greedy tokens with the logits each step chose from,
    and sampled tokens of a ragged batch; for FP8 ones also the logits with FP8 activations left unrounded
    (on every rank: a second load whose spawned ranks see UNROUNDED and patch themselves at import)."""
    seen = []
    record = lambda logits, *rows: (seen.append(logits.clone()), REAL_SAMPLE(logits, *rows))[1]
    with dsq.load_quantized(path, tp=world, kv_cache_dtype="fp32") as m:
        with mock.patch.object(dsq.engine.engine, "sample", record):
            greedy = m.generate(PROMPTS, max_new_tokens=NEW)
        out = {"logits": m.logits(IDS), "greedy": greedy, "decode_logits": torch.stack(seen, 1),  # [prompt, step, V]
               "sampled": m.generate(PROMPTS, max_new_tokens=NEW, **SAMPLING)}
    if fp8:
        with (mock.patch.dict(os.environ, {UNROUNDED: "1"}),
              mock.patch.object(dsq.quant, "fp8_quantize_act", unrounded),
              dsq.load_quantized(path, tp=world, kv_cache_dtype="fp32") as m):
            out["unrounded"] = m.logits(IDS)
    return out


def job(out: Path, world: int, paths: list[str]) -> None:
    """This file run as a script: rank 0 of a `world`-rank job per checkpoint (load_quantized spawns the
    others), saving its results."""
    torch.save({Path(p).name: run(Path(p), world, "fp8" in Path(p).name) for p in paths}, out)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    from dsq.quantize.run import quantize
    from dsq.quantize.scheme import Options

    root = tmp_path_factory.mktemp("tp")
    quiet = dict(console=Console(file=io.StringIO()))
    out = {"lite": make_tiny(root / "lite", "lite", n_routed_experts=6), "v2": make_tiny(root / "v2", "v2", **UNEVEN),
           "src": make_tiny(root / "src", "lite"), "fp8-channel+int4": root / "fp8-channel+int4"}
    write_tokenizer(out["lite"], 1000)  # for chat
    quantize(out["src"], out["fp8-channel+int4"], Options(), **quiet)
    out["fp8-block+int4"] = root / "fp8-block+int4"
    quantize(make_tiny(root / "blocky", "v2", **BLOCKY), out["fp8-block+int4"], Options(fp8_block=True), **quiet)
    return out


@pytest.fixture(scope="module")
def one_rank(ckpts) -> dict[str, dict]:
    return {name: run(path, 1, "fp8" in name) for name, path in ckpts.items()}


@pytest.fixture(scope="module", params=[2, 4])
def n_ranks(request, ckpts, tmp_path_factory) -> dict[str, dict]:
    """Every checkpoint run on 2, then 4 ranks, by one process that is rank 0 of each job."""
    world, out = request.param, tmp_path_factory.mktemp("out") / "results.pt"
    done = subprocess.run([sys.executable, __file__, str(out), str(world), *map(str, ckpts.values())],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# Splitting changes only the order of fp32 sums (each rank sums its slice, the all-reduce adds the parts). A
# reordered dot product of K terms moves by about sqrt(K) * u relative (u = 2**-24; Higham & Mary, "A new
# approach to probabilistic rounding error analysis", SIAM J. Sci. Comput. 2019), and the at most 22 matmuls a
# token passes through here (3 layers of q_a, q_b, kv_a, kv_b, o, up/gate, down, then the head) add such errors
# in quadrature: sqrt(22) * sqrt(512) * 2**-24 = 6.3e-6 for the widest K here (512), under this bound. Measured:
# 3.3e-7 to 4.2e-7 on 2 and 4 ranks.
EXACT = 1e-5


# --- N ranks against 1 -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["lite", "v2"])
def test_n_ranks_give_one_ranks_tokens_and_logits(n_ranks, one_rank, name):
    """Unquantized and INT4 (W4A16: weights only) are exact under the split, so greedy tokens are equal and
    so are sampled ones (rank 0 samples, the others take its token)."""
    got, want = n_ranks[name], one_rank[name]
    assert rel_err(got["logits"], want["logits"]) < EXACT
    assert got["greedy"] == want["greedy"]
    assert got["sampled"] == want["sampled"]


def test_under_torchrun_only_rank_0_returns(ckpts, one_rank, tmp_path):
    """torchrun starts every rank with the same script: load_quantized returns on rank 0 only, the others
    follow its steps and exit 0 when it is done, so the script's code after the load runs once. Closing the
    model leaves the process group dsq started (a gloo thread left alive can abort the exit under load)."""
    out = tmp_path / "greedy.pt"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           __file__, str(out), "torchrun", str(ckpts["v2"])], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = torch.load(out)
    assert got["greedy"] == one_rank["v2"]["greedy"]
    assert got["left"]


@pytest.mark.parametrize("name", ["fp8-block+int4", "fp8-channel+int4"])
def test_fp8_split_is_exact_but_for_the_activation_rounding(n_ranks, one_rank, name):
    """FP8 activations are quantized at run time: per 1x128 group (block scales; whole groups per rank), or
    per token (channel scales; a row-parallel layer, o_proj or down_proj, scales each rank's slice of the
    token as vLLM and SGLang do, which is never coarser than the whole token's scale). Either way the split
    moves an activation's input by fp32 reordering only, but one that sits on a rounding boundary of e4m3 can
    round to the neighbouring value, so N ranks draw the rounding again and the logits are not equal.

    What holds exactly: with the rounding taken out (same weights, scales and splits), N ranks give 1 rank's
    logits. Greedy tokens: while N ranks and 1 rank have decoded the same tokens, the next ones must be equal
    wherever 1 rank's top logit leads by more than twice what the split moves a logit (measured on IDS):
    elsewhere either token is a right answer, and after a difference the two runs read different prefixes."""
    got, want = n_ranks[name], one_rank[name]
    assert rel_err(got["unrounded"], want["unrounded"]) < EXACT
    assert rel_err(got["logits"], got["unrounded"]) > EXACT  # the rounding is there, far beyond reordering

    split = (got["logits"] - want["logits"]).abs().max()
    for i, (ours, theirs) in enumerate(zip(got["greedy"], want["greedy"], strict=True)):
        top2 = want["decode_logits"][i, :len(theirs)].topk(2).values
        clear = (top2[:, 0] - top2[:, 1] > 2 * split).tolist()
        for a, b, sure in zip(ours, theirs, clear, strict=False):
            assert a == b or not sure
            if a != b:
                break


# --- the plan ----------------------------------------------------------------------------------------------
def test_uneven_splits_put_the_extra_unit_on_the_first_ranks():
    assert span(6, 4) == [(0, 2), (2, 4), (4, 5), (5, 6)]
    assert span(345, 4) == [(0, 87), (87, 173), (173, 259), (259, 345)]
    assert span(344, 3, unit=128) == [(0, 128), (128, 256), (256, 344)]  # a short last block stays whole
    cfg = Config(**dict(V2, **UNEVEN))
    shards = plan(cfg, 4)
    assert [s.experts for s in shards] == [(0, 2), (2, 4), (4, 5), (5, 6)]
    assert [s.heads for s in shards] == [(0, 2), (2, 4), (4, 5), (5, 6)]
    assert shards[-1].vocab == (751, 1001)
    with pytest.raises(DsqError, match="cannot split 6 attention heads over 8 ranks; use fewer ranks"):
        plan(cfg, 8)


def test_splits_keep_quantization_units_whole_or_refuse(ckpts):
    cfg, scheme = read_config(ckpts["fp8-block+int4"])
    assert [s.heads for s in plan(cfg, 4, scheme)] == [(0, 2), (2, 4), (4, 6), (6, 8)]  # o_proj: 2 heads a block
    with pytest.raises(DsqError, match=r"cannot split 8 attention heads over 8 ranks \(model\.layers\.0\.self_attn"
                                       r"\.o_proj has FP8 128x128 block scales, so a rank takes 2 at a time\)"):
        plan(cfg, 8, scheme)
    int4_shared = Scheme({"quant_method": "compressed-tensors", "config_groups": {"g": {
        "targets": [r"re:.*shared_experts\..*"],
        "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}}}})
    cfg = Config.from_file(ckpts["lite"] / "config.json")  # shared intermediate 256: two INT4 groups
    assert [s.shared for s in plan(cfg, 2, int4_shared)] == [(0, 128), (128, 256)]
    with pytest.raises(DsqError, match="cannot split 256 shared-expert intermediate columns over 4 ranks "
                                       r"\(model\.layers\.1\.mlp\.shared_experts\.down_proj has INT4 groups of 128"):
        plan(cfg, 4, int4_shared)


# --- each rank reads its part only ----------------------------------------------------------------------
class ReadLog:
    """Wraps safetensors' safe_open to record every tensor (or slice) read: name -> elements."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        import dsq.checkpoint

        self.read: dict[str, int] = {}
        real, log = dsq.checkpoint.safe_open, self

        class Handle:
            def __init__(self, *args, **kwargs):
                self.f = real(*args, **kwargs)

            def __enter__(self):
                self.h = self.f.__enter__()
                return self

            def __exit__(self, *exc):
                return self.f.__exit__(*exc)

            def keys(self):
                return self.h.keys()

            def get_tensor(self, name):
                t = self.h.get_tensor(name)
                log.read[name] = t.numel()
                return t

            def get_slice(self, name):
                s = self.h.get_slice(name)

                class Slice:
                    get_shape, get_dtype = s.get_shape, s.get_dtype

                    def __getitem__(self, index):
                        t = s[index]
                        log.read[name] = t.numel()
                        return t

                return Slice()

        monkeypatch.setattr(dsq.checkpoint, "safe_open", Handle)


@pytest.mark.parametrize("name", ["v2", "fp8-channel+int4"])
def test_each_rank_reads_only_its_slices_and_experts(ckpts, monkeypatch, name):
    """Loading rank r of 4 needs no process group, so every rank is loaded here, reads logged: no rank reads
    another's experts, each reads exactly the elements it holds, and weight_bytes is what it allocates."""
    path, world = ckpts[name], 4
    cfg, scheme, ckpt = *read_config(path), Checkpoint(path)
    total = sum(torch.Size(ckpt.shape(n)).numel() for n in ckpt.files)
    for rank, shard in enumerate(plan(cfg, world, scheme)):
        log = ReadLog(monkeypatch)
        model = load_model(path, torch.device("cpu"), torch.float32, rank, world)
        experts = {int(n.split(".experts.")[1].split(".")[0]) for n in log.read if ".experts." in n}
        assert experts == set(range(*shard.experts))
        held = [t for n, t in [*model.named_parameters(), *model.named_buffers()] if n != "inv_freq"]
        assert sum(log.read.values()) == sum(t.numel() for t in checkpoint_tensors(model).values())
        assert sum(log.read.values()) < total / 2
        assert sum(weight_bytes(cfg, scheme, torch.float32, world, rank).values()) == \
            sum(t.numel() * t.element_size() for t in held)


# --- the memory plan of docs/parallel.md ----------------------------------------------------------------
def test_full_v2_memory_plan():
    """The numbers docs/parallel.md quotes, from the real shapes (FP8 channel attention / dense / shared, INT4
    g128 routed experts, BF16 embedding and head, the router in fp32, BF16 W_UK / W_UV)."""
    from dsq.quantize.scheme import Options, quantization_config

    cfg, scheme = Config.preset("deepseek-v2"), Scheme(quantization_config(Options()))
    gb = lambda world: round(sum(weight_bytes(cfg, scheme, world=world).values()) / 1e9, 2)
    assert [gb(w) for w in (1, 2, 4, 8)] == [131.09, 65.97, 33.41, 17.13]
    assert bytes_per_token(cfg, "fp8") == 656 * 60
    # the cache load_quantized plans on an empty GPU of n MiB (what nvidia-smi reports), on the Triton backend
    cache = lambda world, n, use=0.9: rank_plan(cfg, scheme, n << 20, n << 20, utilization=use, world=world)
    tokens = {name: cache(world, n).cache_tokens for name, world, n in
              (("8x80", 8, 81559), ("8x24", 8, 23028), ("4x80", 4, 81559), ("2x80", 2, 81559))}
    assert tokens == {"8x80": 1484753, "8x24": 81380, "4x80": 1048110, "2x80": 174825}
    with pytest.raises(DsqError, match=r"does not fit: it needs 139\.0 GB .* but 135\.7 GB are free"):
        cache(1, 143771)  # one H200 at the default gpu_memory_utilization
    assert cache(1, 143771, 0.95).cache_tokens == 111392


# --- the CLI: launching, following rank 0, and dying cleanly -----------------------------------------------
def test_cli_generate_tp_prints_one_ranks_tokens(ckpts):
    want = dsq.load_quantized(ckpts["v2"]).generate([1, 2, 3], max_new_tokens=NEW)
    done = subprocess.run([*CLI, "generate", str(ckpts["v2"]), "--tp", "2", "--ids", "--prompt", "1 2 3",
                           "--max-new-tokens", str(NEW)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(t) for t in want]  # printed once: only rank 0 prints


@pytest.mark.parametrize("how", ["exit", "hang"])
def test_a_failed_rank_stops_the_job(ckpts, how):
    """Rank 1 exits (the launcher sees it and kills the rest) or hangs (rank 0's next collective times out
    after DSQ_DIST_TIMEOUT) at its 3rd step: the job ends with a line that says so, not a hang. The message
    is what shows it (the 600 s collective timeout of the exit case would end in another one); the
    subprocess timeout only keeps a real hang from stalling the suite."""
    env = {**os.environ, TIMEOUT: "3" if how == "hang" else "600"}
    done = subprocess.run([*FAULTS, "rank", "1", "3", how, "generate", str(ckpts["v2"]), "--tp", "2", "--ids",
                           "--prompt", "1 2 3", "--max-new-tokens", "20"],
                          capture_output=True, text=True, timeout=540, env=env)
    assert done.returncode != 0
    if how == "exit":
        assert "dsq: rank 1 died (exit code 3); stopped the other ranks" in done.stderr
    else:
        assert "another rank has died or stalled (Timed out waiting 3000ms" in done.stderr


@pytest.mark.parametrize("how", ["exit", "hang"])
def test_a_rank_that_fails_while_starting_ends_the_job(ckpts, how):
    """Rank 1 fails while importing, before it joins rank 0's rendezvous. It exits: the watchdog names it at
    once (the rendezvous alone would wait the 300 s default of DSQ_START_TIMEOUT, past this subprocess's
    timeout). It hangs: rank 0 gives up after DSQ_START_TIMEOUT, here 5 s, and stops it."""
    env = {k: v for k, v in os.environ.items() if k != START} | ({START: "5"} if how == "hang" else {})
    done = subprocess.run([*FAULTS, "start", "1", how, "generate", str(ckpts["v2"]), "--tp", "2", "--ids",
                           "--prompt", "1 2 3", "--max-new-tokens", "2"],
                          capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    if how == "exit":
        assert lines == ["dsq: rank 1 died (exit code 1); stopped the other ranks",
                         "rank 1: ImportError: rank 1 fails while importing (injected)"], done.stderr
    else:
        assert len(lines) == 1 and "rank 0: the 2 ranks did not all join within DSQ_START_TIMEOUT=5 s" in lines[0], \
            done.stderr


def test_tp_is_checked_before_a_rank_is_spawned(ckpts, monkeypatch):
    """--tp N that the model cannot split, or that has too few cores or GPUs to run on, is one line before
    `launch` starts anything; tp=N through the API is refused by the plan before joining a process group."""
    monkeypatch.setattr(dsq.launch, "spawn", lambda *args: pytest.fail("ranks were spawned"))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    gen = ["generate", str(ckpts["v2"]), "--ids", "--prompt", "1", "--max-new-tokens", "1", "--tp"]
    cases = [(["7"], "--tp 7: cannot split 6 attention heads over 7 ranks; use fewer ranks"),
             (["3"], "--tp 3: only 2 CPU core(s) are available to this process; use --tp 2 or fewer")]
    for args, fragment in cases:
        result = CliRunner().invoke(app, gen + args)
        assert result.exit_code == 1 and result.stderr.strip() == f"error: {fragment}", result.output
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    result = CliRunner().invoke(app, [*gen, "3", "--device", "cuda"])
    assert result.exit_code == 1, result.output
    assert result.stderr.strip() == "error: --tp 3: only 2 GPU(s) are visible, one per rank; use --tp 2 or fewer"
    with pytest.raises(DsqError, match=r"^tp=7: cannot split 6 attention heads over 7 ranks; use fewer ranks$"):
        dsq.load_quantized(ckpts["v2"], tp=7)  # without the plan first: "tp=7 needs 7 processes"


def test_chat_tp_follows_rank_0_through_ctrl_c(ckpts, tmp_path):
    """Rank 0 reads the terminal; the other rank follows each line, and a Ctrl-C mid-reply stops both at the
    same step, so later turns and commands still run in step (a desync would hang or fail). Ctrl-C goes in
    once a reply is seen streaming, and no reply can end by itself (no end token, a budget near a large
    context), so only the interrupt stops it, however loaded the machine."""
    pexpect = pytest.importorskip("pexpect")
    model = endless(ckpts["lite"], tmp_path / "endless")
    child = pexpect.spawn(sys.executable, ["-m", "dsq.cli.main", "chat", str(model), "--tp", "2",
                                           "--temperature", "0", "--max-new-tokens", "32000", "--context", "32768"],
                          timeout=300, encoding="utf-8", dimensions=(40, 200), env={**os.environ, "TERM": "dumb"})
    for line in ("Tell me a long story", "And another"):
        child.expect("> ")
        child.sendline(line)
        child.expect_exact(f"{line}\r\n")  # the terminal's echo of the line; what follows is the reply
        child.expect(r"\S")  # the first streamed text
        child.sendintr()
        child.expect("reply stopped")
    child.expect("> ")
    child.sendintr()  # at the prompt: rank 0 alone hears it
    child.expect("/exit or Ctrl-D")
    child.sendline("/clear")
    child.expect("conversation cleared")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


if __name__ == "__mp_main__" and os.environ.get(UNROUNDED):  # a rank spawned for an unrounded load
    dsq.quant.fp8_quantize_act = unrounded
if __name__ == "__main__" and sys.argv[2] == "torchrun":  # every process of a torchrun job runs this
    m = dsq.load_quantized(sys.argv[3], tp=int(os.environ["WORLD_SIZE"]), kv_cache_dtype="fp32")  # rank 0 only returns
    greedy = m.generate(PROMPTS, max_new_tokens=NEW)
    m.close()
    torch.save({"greedy": greedy, "left": not torch.distributed.is_initialized()}, sys.argv[1])
elif __name__ == "__main__":
    job(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:])
