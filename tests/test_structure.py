"""The shape of the code: no import cycle among dsq's modules (function-level imports count), the runtime
never imports the offline quantizer or the CLI, the kernels import only dsq's low-level torch modules and only
the Triton backend imports them (inside functions), no product file over 300 lines, no test hooks in product
code."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"dsq": ROOT / "dsq", "dsq.engine": ROOT / "dsq" / "engine", "dsq.kernels": ROOT / "kernels",
            "dsq.quantize": ROOT / "quantize", "dsq.cli": ROOT / "cli"}  # setuptools package-dir
# what the kernels may import from dsq: plain-torch formats and references (and the config data rope reads)
LOW_LEVEL = {"dsq.quant", "dsq.latent", "dsq.rope", "dsq.config", "dsq.fields", "dsq.errors"}


def modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.glob("*.py")):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return out


def nodes(tree: ast.AST, lazy: bool) -> list[ast.AST]:
    """Every node of tree, or (not lazy) those run at import: function bodies left out."""
    if lazy:
        return list(ast.walk(tree))
    out, todo = [], [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        todo += [c for c in ast.iter_child_nodes(node) if not isinstance(c, (ast.FunctionDef, ast.AsyncFunctionDef))]
    return out


def imports(name: str, path: Path, known: set[str], lazy: bool = True) -> set[str]:
    """The dsq modules `name` imports anywhere in its file (module level, functions, methods), or with
    lazy=False those it imports when it is imported."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = set()
    for node in nodes(ast.parse(path.read_text()), lazy):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
    return {m for m in found if m in known and m != name}


def graph(lazy: bool = True) -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods), lazy) for name, path in mods.items()}


def reached(g: dict[str, set[str]], start: list[str]) -> set[str]:
    """`start` and every module it imports, directly or not."""
    reach, todo = set(start), list(start)
    while todo:
        for w in g[todo.pop()] - reach:
            reach.add(w)
            todo.append(w)
    return reach


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component that has one (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_runtime_does_not_import_the_quantizer_or_the_cli():
    g = graph()
    # everything but the quantizer, the CLI and the demo (whose job is to run the quantizer end to end)
    runtime = [m for m in g if not m.startswith(("dsq.quantize", "dsq.cli", "dsq.demo"))]
    assert not {m for m in reached(g, runtime) if m.startswith(("dsq.quantize", "dsq.cli"))}


def test_the_kernels_import_only_low_level_modules_of_dsq():
    g = graph()
    kernels = [m for m in g if m.startswith("dsq.kernels")]
    assert {m for m in reached(g, kernels) if not m.startswith("dsq.kernels")} <= LOW_LEVEL
    assert not {m for m in reached(g, sorted(LOW_LEVEL)) if m.startswith("dsq.kernels")}


def test_only_the_kernels_import_triton_when_imported():
    """The torch backend runs without Triton: outside dsq.kernels nothing imports triton or a kernel module
    at import time (the Triton backend's call sites import dsq.kernels inside functions)."""
    g, mods = graph(lazy=False), modules()
    outside = [m for m in g if not m.startswith("dsq.kernels")]
    assert not {m for m in reached(g, outside) if m.startswith("dsq.kernels")}
    for name in outside:
        at_import = nodes(ast.parse(mods[name].read_text()), lazy=False)
        names = [a.name for n in at_import if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in at_import if isinstance(n, ast.ImportFrom)]
        assert not [m for m in names if m.split(".")[0] == "triton"], name


def test_product_files_are_short_and_free_of_test_hooks():
    for path in modules().values():
        text = path.read_text()
        assert len(text.splitlines()) <= 300, f"{path.relative_to(ROOT)}: {len(text.splitlines())} lines"
        assert "DSQ_TEST_" not in text, f"{path.relative_to(ROOT)} holds a test hook"


def test_every_package_folder_is_listed():
    """PACKAGES (and so the wheel test, which holds pyproject's list against it) names every package folder."""
    roots = {ROOT / "dsq", ROOT / "kernels", ROOT / "quantize", ROOT / "cli"}
    assert {p.parent for root in roots for p in root.rglob("__init__.py")} == set(PACKAGES.values())


def test_the_wheel_holds_every_module(tmp_path):
    """`pip install dsq` (a wheel, not the editable install the tests run on) gets every module and the chat
    template: a package left out of pyproject's list installs without it, and `import dsq` fails."""
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", "tests",
                                                             "bench*", "docs", ".ci"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path / "wheel"), str(src)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    held = set(zipfile.ZipFile(wheel).namelist())
    want = {f"{package.replace('.', '/')}/{p.name}" for package, folder in PACKAGES.items() for p in folder.iterdir()
            if p.suffix in (".py", ".jinja")}
    assert want <= held, sorted(want - held)

