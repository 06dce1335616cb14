"""environment.yml (conda) and pyproject.toml (pip, make venv) install the same packages, and CI pins them all."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib
import yaml

REPO = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject() -> dict[str, set[str]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    groups = {"core": project["dependencies"], **project["optional-dependencies"]}
    return {group: {_name(r) for r in reqs} for group, reqs in groups.items()}


def test_environment_yml_lists_what_pyproject_installs():
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip = next(item["pip"] for item in env["dependencies"] if isinstance(item, dict))
    conda_pip = {_name(r) for r in pip if not r.startswith("-e")}
    groups = _pyproject()
    wanted = groups["core"] | groups["metrics"] | groups["export"] | groups["serve"] | groups["dev"]  # what make venv installs
    assert conda_pip == wanted, f"only in environment.yml: {sorted(conda_pip - wanted)}; " \
                                f"only in pyproject.toml: {sorted(wanted - conda_pip)}"
    assert "bitsandbytes" in (REPO / "environment.yml").read_text()  # the GPU extra, commented out


def test_jupyterlab_is_a_dependency():
    assert {"jupyterlab", "nbconvert"} <= _pyproject()["core"]


def test_ci_pins_every_package_make_venv_installs():
    pinned = {_name(line) for line in (REPO / "scripts" / "constraints.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    groups = _pyproject()
    unpinned = (groups["core"] | groups["serve"] | groups["dev"]) - pinned
    assert not unpinned, f"not pinned in scripts/constraints.txt: {sorted(unpinned)}"
