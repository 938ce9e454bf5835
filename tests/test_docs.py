"""The documentation cannot rot: the mkdocs site builds with ``--strict`` (every page in the nav,
every link and anchor resolves), and every python code block of README.md and docs/*.md runs.

A code block runs as-is, in its own process (repository root on ``PYTHONPATH``, a fresh temporary
working directory, a timeout). A block that needs a GPU, several processes or the dataset begins
with ``# doc-test: skip (reason)``, and the reason names the test that covers it
(``tests/test_x.py`` or ``tests/test_x.py::test_name``), which must exist.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
SKIP = re.compile(r"^# doc-test: skip \((?P<reason>.+)\)\s*$")
COVERED_BY = re.compile(r"tests/(?P<file>test_\w+\.py)(?:::(?P<name>\w+))?")
BLOCK_TIMEOUT_S = 600   # a loaded 2-core machine; each block is meant to take seconds
BUILD_TIMEOUT_S = 600


def python_blocks(text: str) -> List[Tuple[int, str]]:
    """``(line number, code)`` of every fenced block opened by a line that is exactly
    ```` ```python ```` (at the start of a line) and closed by a line that is exactly ```` ``` ````."""
    blocks, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        if lines[i].rstrip() == "```python":
            start, body = i + 1, []
            i += 1
            while i < len(lines) and lines[i].rstrip() != "```":
                body.append(lines[i])
                i += 1
            if i == len(lines):
                raise ValueError(f"unclosed ```python block opened at line {start}")
            blocks.append((start, "\n".join(body) + "\n"))
        i += 1
    return blocks


def skip_reason(code: str):
    """The reason of a ``# doc-test: skip (reason)`` first line, or None.

    Raises:
        ValueError: the reason names no existing test file (or test function) covering the block.
    """
    m = SKIP.match(code.split("\n", 1)[0])
    if m is None:
        return None
    reason = m.group("reason")
    cov = COVERED_BY.search(reason)
    if cov is None:
        raise ValueError(f"skip reason {reason!r} names no covering test (tests/test_x.py[::name])")
    path = ROOT / "tests" / cov.group("file")
    if not path.exists():
        raise ValueError(f"skip reason {reason!r}: {path} does not exist")
    if cov.group("name") and f"def {cov.group('name')}(" not in path.read_text():
        raise ValueError(f"skip reason {reason!r}: {path.name} has no test {cov.group('name')}")
    return reason


def _all_blocks():
    out = []
    for f in DOC_FILES:
        for line, code in python_blocks(f.read_text()):
            out.append(pytest.param(f, line, code, id=f"{f.relative_to(ROOT)}:{line}"))
    return out


BLOCKS = _all_blocks()


def test_block_extraction_and_skip_markers():
    text = "x\n```python\nprint(1)\n```\n```bash\nls\n```\n```python\n# doc-test: skip (GPU; tests/test_docs.py)\n```\n"
    blocks = python_blocks(text)
    assert [b[0] for b in blocks] == [2, 8]
    assert skip_reason(blocks[0][1]) is None
    assert skip_reason(blocks[1][1]) == "GPU; tests/test_docs.py"
    with pytest.raises(ValueError, match="names no covering test"):
        skip_reason("# doc-test: skip (needs a GPU)\n")
    with pytest.raises(ValueError, match="does not exist"):
        skip_reason("# doc-test: skip (tests/test_nothing_here.py)\n")
    with pytest.raises(ValueError, match="has no test"):
        skip_reason("# doc-test: skip (tests/test_docs.py::test_nothing_here)\n")
    with pytest.raises(ValueError, match="unclosed"):
        python_blocks("```python\nprint(1)\n")
    # the README has its usage example, and the docs have blocks to run
    assert any(f.name == "README.md" for f, *_ in (p.values for p in BLOCKS))
    assert len(BLOCKS) >= 4


@pytest.mark.slow
@pytest.mark.parametrize("path, line, code", BLOCKS)
def test_python_code_block_runs(path, line, code, tmp_path):
    reason = skip_reason(code)
    if reason is not None:
        pytest.skip(f"{path.name}:{line}: {reason}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    script = tmp_path / "block.py"
    script.write_text(code)
    try:
        r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{path.name}:{line}: the code block ran past {BLOCK_TIMEOUT_S} s")
    assert r.returncode == 0, (f"{path.name}:{line}: the code block failed (status {r.returncode}):\n"
                               f"{r.stderr[-4000:]}")


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (requirements-dev.txt installs it)")
    pytest.importorskip("material", reason="mkdocs-material is not installed (requirements-dev.txt)")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    try:
        r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                            str(tmp_path / "site"), "--config-file", str(ROOT / "mkdocs.yml")],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"mkdocs build ran past {BUILD_TIMEOUT_S} s")
    assert r.returncode == 0, f"mkdocs build --strict failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert (tmp_path / "site" / "index.html").exists()
