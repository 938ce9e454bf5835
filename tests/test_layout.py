"""The package's layout: no import circles between its modules, and small files.

The circle check reads the source with :mod:`ast` (nothing is imported), so it is fast and cannot
be fooled by lazy imports inside functions: every ``import``/``from ... import`` statement anywhere
in a module counts as an edge. The size check covers every source file git tracks (Python, C++,
CUDA, headers, shell scripts), wherever it lives.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "contsup_fast"
MAX_LINES = 600


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, modules: Set[str]) -> Set[str]:
    """The package modules ``path`` imports (absolute or relative; ``from . import x`` resolves
    to the submodule ``x`` when there is one)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            # the longest package module the target names (``a.b.c`` -> ``a.b`` when c is a name)
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _graph() -> Dict[str, Set[str]]:
    files = sorted((ROOT / PACKAGE).rglob("*.py"))
    modules = {_module_name(f) for f in files}
    return {_module_name(f): _imports(f, modules) for f in files}


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Every import circle between two modules where neither is a package ``__init__`` of the
    other (a package importing its own submodules, which import siblings, is no circle)."""
    found = []
    for a, deps in graph.items():
        for b in deps:
            if a in graph.get(b, ()) and a < b and not (b.startswith(a + ".") or a.startswith(b + ".")):
                found.append([a, b])
    # longer circles: depth-first search over non-package edges
    def strip(m: str, deps: Set[str]) -> Set[str]:
        return {d for d in deps if not m.startswith(d + ".") and not d.startswith(m + ".")}
    g = {m: strip(m, d) for m, d in graph.items()}
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                cyc = stack[stack.index(d):]
                if len(cyc) > 2:
                    found.append(cyc)
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)
    return found


def test_the_cycle_finder_finds_a_planted_circle():
    graph = {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p.d": {"p.a"}, "p": {"p.a"}}
    assert _cycles(graph) == [["p.a", "p.b", "p.c"]]
    assert _cycles({"p.a": {"p.b"}, "p.b": {"p.a"}}) == [["p.a", "p.b"]]
    assert _cycles({"p.a": {"p.b"}, "p.b": set()}) == []


def test_no_import_circles_between_package_modules():
    graph = _graph()
    assert "contsup_fast.local" in graph and "contsup_fast.cuda_graphs" in graph["contsup_fast.local"]
    assert _cycles(graph) == []


#: what counts as a source file for the size limit
SOURCE_SUFFIXES = (".py", ".cpp", ".cu", ".h", ".cuh", ".sh")


def _tracked_sources() -> List[Path]:
    """Every source file git tracks or would track (``git ls-files``, plus new files git does not
    ignore: the library, kernels/, csrc/, scripts/, bench/, tests/, ...), or, outside a git
    checkout, every such file under the root."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, check=True,
                             timeout=60).stdout.decode()
        files = [ROOT / f for f in out.split("\0") if f]
    except (OSError, subprocess.SubprocessError):
        files = [f for f in ROOT.rglob("*") if ".git" not in f.parts]
    return sorted(f for f in files if f.suffix in SOURCE_SUFFIXES and f.is_file())


def _over_limit(files: List[Path]) -> Dict[str, int]:
    sizes = {str(f.relative_to(ROOT)): len(f.read_text(errors="replace").splitlines()) for f in files}
    return {name: n for name, n in sizes.items() if n > MAX_LINES}


def test_the_size_check_sees_every_kind_of_source_and_names_an_offender(tmp_path, monkeypatch):
    sources = {str(f.relative_to(ROOT)) for f in _tracked_sources()}
    for must in ("setup.py", "csrc/contsup_ops.h", "csrc/op_registration.cpp", "csrc/cuda_common.cuh",
                 "csrc/cuda_image_context.cu", "scripts/setup.sh", "bench/common.py", "tests/test_layout.py"):
        assert must in sources, must
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "long.cu").write_text("x\n" * (MAX_LINES + 1))
    (tmp_path / "short.cu").write_text("x\n" * MAX_LINES)
    assert _over_limit([tmp_path / "long.cu", tmp_path / "short.cu"]) == {"long.cu": MAX_LINES + 1}


def test_every_tracked_source_file_is_at_most_600_lines():
    long = _over_limit(_tracked_sources())
    assert long == {}, f"files over {MAX_LINES} lines (split them into modules with one job each): {long}"
