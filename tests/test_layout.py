"""The house rules of the package: the pipeline never imports the demo machinery, and no module imports itself
back through another."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "bvip_helpers"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, *, top_level_only: bool) -> set[str]:
    """Every ``bvip_helpers`` module that ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rsplit(".", 1)[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.add(module)
            found |= {f"{module}.{alias.name}" for alias in node.names}  # `from pkg import module`
    return {name for name in found if name.startswith("bvip_helpers")}


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_the_pipeline_never_imports_the_demo_package():
    core = {name: path for name, path in _modules().items() if not name.startswith("bvip_helpers.demo")}
    assert "bvip_helpers.sft" in core and "bvip_helpers.predict" in core  # the walk found the package
    offenders = {name: sorted(i for i in _imports(path, top_level_only=False) if i.startswith("bvip_helpers.demo"))
                 for name, path in core.items()}
    offenders = {name: found for name, found in offenders.items() if found}
    assert not offenders, f"core modules import the demo machinery: {offenders}"


def test_the_rule_sees_an_import_inside_a_function(tmp_path):
    """The check above must catch the import that hides in a function body, and relative ones."""
    module = tmp_path / "bvip_helpers" / "sneaky.py"
    module.parent.mkdir()
    module.write_text("def f():\n    from .demo import synth\n    import bvip_helpers.demo.twins\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path / "bvip_helpers"
    try:
        assert _imports(module, top_level_only=False) >= {"bvip_helpers.demo.synth", "bvip_helpers.demo.twins"}
    finally:
        PACKAGE = saved


def test_no_import_cycle_at_module_level():
    modules = _modules()
    graph = {name: {i for i in _imports(path, top_level_only=True) if i in modules and i != name}
             for name, path in modules.items()}
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for nxt in sorted(graph[name]):
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join([*trail, name, nxt]))
            if nxt not in state:
                visit(nxt, [*trail, name])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_one_format_prompt():
    """The prompt text of a family is built in one place (bvip_helpers.families)."""
    owners = [name for name, path in _modules().items()
              if any(isinstance(n, ast.FunctionDef) and n.name == "format_prompt"
                     for n in ast.parse(path.read_text(encoding="utf-8")).body)]
    assert owners == ["bvip_helpers.families"]


def test_readme_is_user_documentation_of_at_most_150_lines():
    readme = (PACKAGE.parent / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 150
    named = set(re.findall(r"notebooks/(\d\d_\w+)\.ipynb", readme))
    existing = {p.stem for p in (PACKAGE.parent / "notebooks").glob("*.ipynb")}
    assert named == existing, f"README links {sorted(named - existing)}; misses {sorted(existing - named)}"
    for link in re.findall(r"\]\(([^)#]+)\)", readme):
        assert (PACKAGE.parent / link).exists(), f"README links {link}, which does not exist"
