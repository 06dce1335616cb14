"""Committed notebooks stay clean and follow the course layout (fastbook-style check)."""

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
FORBIDDEN = [r"\bsys\.path\b", r"\binput\(", r"\blogin\(", r"notebook_login", r"trust_remote_code\s*=\s*True"]


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def _source(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks found"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
    dirty = [i for i, c in enumerate(_cells(path)) if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count"))]
    assert not dirty, f"{path.name}: cells {dirty} have outputs; run `make strip-notebooks`"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_course_layout(path):
    cells = _cells(path)
    assert cells[0]["cell_type"] == "markdown" and _source(cells[0]).lstrip().startswith("# "), "first cell: title"
    params = cells[1]
    assert "parameters" in params.get("metadata", {}).get("tags", []), "second cell must be tagged 'parameters'"
    for line in _source(params).splitlines():  # plain values only: papermill overrides them
        line = line.split("#", 1)[0].strip()
        if line:
            assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*\s*=\s*(.+)", line), f"not a plain assignment: {line!r}"
            value = line.split("=", 1)[1].strip()
            assert not re.search(r"[A-Za-z_]\w*\(", value), f"parameters must be plain values: {line!r}"
    assert "notebook_setup" in _source(cells[2]), "third cell: version and setup"
    assert "SMOKE" in _source(params), "parameters need a SMOKE switch"
    assert "What to try next" in _source(cells[-1]), "last cell: 'What to try next' exercises"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_nothing_blocks_a_headless_run(path):
    code = "\n".join(_source(c) for c in _cells(path) if c["cell_type"] == "code")
    for pattern in FORBIDDEN:
        assert not re.search(pattern, code), f"{path.name} uses {pattern}"
