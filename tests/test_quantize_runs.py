"""`dsq quantize` runs that meet each other or a changing world: one run per OUT (the lock), a source changed
between runs or during one, a finished output run again, Ctrl-C, no space, a read-only OUT. Each fault is
made from outside at a point the test chooses (a wrapped function, a lock held by the test), never by timing."""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console
from safetensors.torch import load_file, save_file
from tiny import make_tiny
from typer.testing import CliRunner

import dsq
from dsq.cli.main import app
from dsq.errors import DsqError
from dsq.quantize import run, source
from dsq.quantize.lock import LOCK
from dsq.quantize.run import INDEX, MANIFEST, quantize
from dsq.quantize.writer import sha256

QUIET = dict(console=Console(file=io.StringIO()), shard_size=100_000)
SRC1, SRC2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """A tiny V2-Lite in two source files: layer 2 and the final norm in the second, the rest in the first."""
    folder = make_tiny(tmp_path_factory.mktemp("src") / "ckpt", "lite")
    sd = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    second = {n for n in sd if n.startswith("model.layers.2.") or n == "model.norm.weight"}
    weight_map = {}
    for file, names in ((SRC1, sorted(set(sd) - second)), (SRC2, sorted(second))):
        save_file({n: sd[n] for n in names}, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.fixture
def copy(src, tmp_path) -> Path:
    return Path(shutil.copytree(src, tmp_path / "src"))


def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["quantize", *args, "--shard-size", "100000"])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # an escaped exception is a bug: show it
    return result.exit_code, result.stdout, result.stderr


def hashes(out: Path) -> dict[str, str]:
    return {p.name: sha256(p) for p in sorted(out.glob("model-*.safetensors"))}


def fail_after(monkeypatch, n: int, fault) -> None:
    """Call `fault()` once the n-th source tensor has been converted."""
    convert, calls = run.convert_tensor, [0]

    def wrapped(*args, **kwargs):
        record = convert(*args, **kwargs)
        calls[0] += 1
        if calls[0] == n:
            fault()
        return record

    monkeypatch.setattr(run, "convert_tensor", wrapped)


# --- one run per OUT --------------------------------------------------------------------------------------------
def test_a_held_lock_refuses_a_second_run_naming_its_pid(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, json.dumps({"pid": os.getpid(), "started": "2026-01-01T00:00:00Z"}).encode())
        code, _, err = cli(str(src), str(out))
        assert code == 1 and len(err.strip().splitlines()) == 1, err
        assert f"another dsq quantize is writing this folder (pid {os.getpid()}, started 2026" in err, err
        assert [p.name for p in out.iterdir()] == [LOCK]  # the holder's lock is left alone, nothing written
    finally:
        os.close(fd)
    code, _, err = cli(str(src), str(out))
    assert code == 0, err
    assert (out / MANIFEST).exists() and not (out / LOCK).exists()


def test_the_lock_of_a_dead_run_is_taken_over(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    take = ("import fcntl, json, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, json.dumps({'pid': os.getpid()}).encode())")
    subprocess.run([sys.executable, "-c", take, str(out / LOCK)], check=True, timeout=60)  # exits holding it
    assert (out / LOCK).exists()
    code, _, err = cli(str(src), str(out))
    assert code == 0, err
    assert not (out / LOCK).exists()


def test_a_lock_that_is_a_symlink_is_not_followed(src, tmp_path):
    out, target = tmp_path / "out", tmp_path / "precious.txt"
    out.mkdir()
    target.write_text("keep me")
    (out / LOCK).symlink_to(target)
    code, _, err = cli(str(src), str(out))
    assert code == 1 and len(err.strip().splitlines()) == 1 and f"{out}: cannot write the output folder" in err, err
    assert target.read_text() == "keep me"


# --- a changed source -----------------------------------------------------------------------------------------
def test_resume_redoes_the_shards_of_a_changed_source_file(copy, tmp_path):
    """Rewriting one source file (same size: only its values and mtime change) makes a re-run redo exactly
    the output shards made from it; the result is the fresh quantization of the new source."""
    out = tmp_path / "out"
    quantize(copy, out, **QUIET)
    before = hashes(out)
    weight_map = json.loads((out / INDEX).read_text())["weight_map"]
    from_second = {s for n, s in weight_map.items() if n.startswith("model.layers.2.") or n.startswith("model.norm")}
    assert 0 < len(from_second) < len(before)
    sd = load_file(copy / SRC2)
    sd["model.layers.2.self_attn.o_proj.weight"] *= 2
    stat = os.stat(copy / SRC2)
    save_file(sd, copy / SRC2, metadata={"format": "pt"})
    os.utime(copy / SRC2, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # an edit is a later mtime
    assert os.stat(copy / SRC2).st_size == stat.st_size

    report = quantize(copy, out, **QUIET)
    assert report.resumed == len(before) - len(from_second)
    quantize(copy, tmp_path / "fresh", **QUIET)
    assert hashes(out) == hashes(tmp_path / "fresh")
    assert any(hashes(out)[s] != before[s] for s in from_second)  # redone from the new values, not trusted


def test_a_source_touched_during_the_run_is_not_committed(copy, tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = copy / SRC1
    fail_after(monkeypatch, 1, lambda: os.utime(first, ns=(0, os.stat(first).st_mtime_ns + 10**9)))
    code, _, err = cli(str(copy), str(out))
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert f"{first}: changed during the run" in err and "run the same command again" in err, err
    assert not hashes(out) and not list(out.glob("*tmp")) and not (out / LOCK).exists()
    monkeypatch.undo()
    assert quantize(copy, out, **QUIET).resumed == 0
    quantize(copy, tmp_path / "fresh", **QUIET)
    assert hashes(out) == hashes(tmp_path / "fresh")


@pytest.mark.parametrize("how", ["deleted", "truncated"])
def test_a_source_deleted_or_cut_during_the_run_is_one_line(copy, tmp_path, monkeypatch, how):
    """The reader reads one tensor ahead at most (PREFETCH_BYTES 0), so the second tensor is read after the
    first one's conversion has changed the file."""
    monkeypatch.setattr(source, "PREFETCH_BYTES", 0)
    first = copy / SRC1
    fail_after(monkeypatch, 1, first.unlink if how == "deleted" else lambda: os.truncate(first, 1000))
    code, _, err = cli(str(copy), str(tmp_path / "out"))
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert str(first) in err and "changed during the run" in err and "resume" in err, err


# --- telling the user where they are --------------------------------------------------------------------------
def test_a_finished_output_run_again_says_it_is_complete(src, tmp_path):
    out = tmp_path / "out"
    assert cli(str(src), str(out))[0] == 0
    manifest = (out / MANIFEST).read_bytes()
    code, text, err = cli(str(src), str(out))
    assert code == 0, err
    flat = " ".join(text.split())
    assert f"{out} is complete: all {len(hashes(out))} shards were already written" in flat, text
    assert "MB/s" not in flat and "resumed" not in flat
    assert (out / MANIFEST).read_bytes() == manifest  # nothing rewritten


def test_ctrl_c_says_how_to_resume_and_the_same_command_finishes(src, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def interrupt() -> None:
        raise KeyboardInterrupt

    fail_after(monkeypatch, 40, interrupt)
    code, _, err = cli(str(src), str(out))
    assert code == 130, err
    assert f"interrupted: the finished shards in {out} are kept; run the same command again to resume" in err
    kept = hashes(out)
    assert kept and not (out / LOCK).exists() and not (out / "config.json").exists()
    with pytest.raises(DsqError, match=rf"unfinished dsq quantize output .*`dsq quantize {src} {out} "
                                       r"--shard-size 100000` again"):
        dsq.load_quantized(out)
    monkeypatch.undo()
    code, text, err = cli(str(src), str(out))
    assert code == 0, err
    assert f"({len(kept)} resumed)" in " ".join(text.split())
    quantize(src, tmp_path / "fresh", **QUIET)
    assert hashes(out) == hashes(tmp_path / "fresh")


SIGTERM_CHILD = """import os, signal, sys
from dsq.cli.main import app
from dsq.quantize import run
convert, calls = run.convert_tensor, [0]
def wrapped(*args, **kwargs):  # SIGTERM once the 40th tensor is converted, as `timeout` or a scheduler sends it
    record = convert(*args, **kwargs)
    calls[0] += 1
    if calls[0] == 40:
        os.kill(os.getpid(), signal.SIGTERM)
    return record
run.convert_tensor = wrapped
app(args=["quantize", *sys.argv[1:], "--shard-size", "100000"], prog_name="dsq")
"""


def test_sigterm_is_taken_as_ctrl_c(src, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", SIGTERM_CHILD, str(src), str(out)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 143, done.stderr
    assert "terminated: the finished shards" in done.stderr and "Traceback" not in done.stderr, done.stderr
    kept = hashes(out)
    assert kept and not (out / LOCK).exists() and not list(out.glob("*tmp"))
    code, text, err = cli(str(src), str(out))
    assert code == 0 and f"({len(kept)} resumed)" in " ".join(text.split()), err


def test_an_unfinished_run_names_its_whole_command(src, tmp_path, monkeypatch):
    """The hints give the interrupted run's options, so the command they print is the one that resumes it."""
    out = tmp_path / "out"

    def interrupt() -> None:
        raise KeyboardInterrupt

    fail_after(monkeypatch, 40, interrupt)
    assert cli(str(src), str(out), "--experts", "fp8", "--no-clip-search")[0] == 130
    monkeypatch.undo()
    kept = hashes(out)
    command = f"dsq quantize {src} {out} --experts fp8 --no-clip-search --shard-size 100000"
    with pytest.raises(DsqError, match=f"run `{re.escape(command)}` again to finish it"):
        dsq.load_quantized(out)
    code, _, err = cli(str(src), str(out))  # the defaults: not the run that is in OUT
    assert code == 1 and f"holds an unfinished run of another source or options, which `{command}` finishes" in (
        " ".join(err.split())), err
    assert hashes(out) == kept  # refused, nothing removed
    result = CliRunner().invoke(app, shlex.split(command)[1:])
    assert result.exit_code == 0, result.stderr
    assert f"({len(kept)} resumed)" in " ".join(result.stdout.split())


def test_no_space_leaves_no_empty_out(src, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**6, 10**6, 0))
    out = tmp_path / "out"
    code, _, err = cli(str(src), str(out))
    assert code == 1 and len(err.strip().splitlines()) == 1 and "only 0 B is free" in err, err
    assert not out.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_a_read_only_out_is_one_line(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        code, _, err = cli(str(src), str(out))
    finally:
        out.chmod(0o755)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert f"{out}: cannot write the output folder (Permission denied)" in err, err
    assert not any(out.iterdir())
