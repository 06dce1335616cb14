"""Run notebooks once per model with papermill, resumably, and rank the runs in a leaderboard.

``bvip batch --models tiny-qwen2-vl,tiny-smolvlm --notebooks 03,05`` executes
``notebooks/03_*.ipynb`` for each model into ``runs/<model>/03_*.ipynb``, passing the
parameters ``model``, ``runs_dir`` (and ``SMOKE`` with ``--smoke``) plus those of a YAML file::

    global:            # every model
      EPOCHS: 1
    models:            # per model, overriding global
      tiny-smolvlm:
        LR: 0.0005

A model that fails does not stop the batch: its traceback is kept in
``runs/<model>/<notebook>.failed.json`` and the exit code is 1 at the end. Success writes
``runs/<model>/<notebook>.done.json`` with a hash of the parameters; a later batch skips
that pair unless the parameters changed or ``--force`` is given. Finally every
``eval_*.json`` under ``runs/<model>/`` is collected into ``runs/leaderboard.{csv,md}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from bvip_helpers.io import atomic_path, repo_root, resolve, write_json, write_text_atomic

# --- Parameters -----------------------------------------------------------------


def load_params(path: str | Path | None) -> dict[str, Any]:
    """Read the YAML parameter file (sections ``global`` and ``models``); ``None`` means no file."""
    if path is None:
        return {"global": {}, "models": {}}
    import yaml

    path = resolve(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"cannot read parameter file {path}: {err}") from err
    if not isinstance(data, dict) or set(data) - {"global", "models"}:
        raise ValueError(f"{path}: top level must have only 'global' and 'models' sections, got {sorted(data)}")
    data.setdefault("global", {})
    data.setdefault("models", {})
    for section in ("global", "models"):
        if not isinstance(data[section] or {}, dict):
            raise ValueError(f"{path}: section {section!r} must be a mapping")
        data[section] = data[section] or {}
    return data


def params_for(model: str, params: dict[str, Any], *, runs_dir: Path, smoke: bool) -> dict[str, Any]:
    """The papermill parameters of one model: global < per-model < model/runs_dir/SMOKE."""
    merged = {**params.get("global", {}), **(params.get("models", {}).get(model) or {})}
    merged.update(model=model, runs_dir=str(runs_dir))
    if smoke:
        merged["SMOKE"] = True
    return merged


def params_hash(params: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --- Notebooks ----------------------------------------------------------------


def find_notebook(key: str, notebooks_dir: Path) -> Path:
    """``03`` -> ``notebooks/03_<name>.ipynb``; a file name or path works too."""
    candidate = resolve(key)
    if candidate.suffix == ".ipynb" and candidate.is_file():
        return candidate
    matches = sorted(notebooks_dir.glob(f"{key}*.ipynb"))
    if len(matches) != 1:
        found = ", ".join(p.name for p in sorted(notebooks_dir.glob("*.ipynb"))) or "none"
        raise FileNotFoundError(f"notebook {key!r} matches {len(matches)} files in {notebooks_dir} "
                                f"(available: {found}); give a longer prefix")
    return matches[0]


@dataclass
class RunResult:
    model: str
    notebook: str
    status: str  # "done" | "skipped" | "failed" | "blocked"
    output: Path
    seconds: float = 0.0
    error: str = ""


@dataclass
class BatchReport:
    results: list[RunResult] = field(default_factory=list)
    leaderboard: tuple[Path, Path] | None = None

    @property
    def failed(self) -> list[RunResult]:
        return [r for r in self.results if r.status in ("failed", "blocked")]

    def summary(self) -> str:
        lines = [f"{r.status:8s} {r.model} / {r.notebook}  ({r.seconds:.1f}s)" for r in self.results]
        for r in (r for r in self.results if r.status == "failed"):
            lines.append(f"\nFAILED {r.model} / {r.notebook}:\n{r.error}")
        if self.leaderboard:
            lines.append(f"\nleaderboard: {self.leaderboard[0]} and {self.leaderboard[1]}")
        return "\n".join(lines)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _error_excerpt(err: BaseException, lines: int = 25) -> str:
    """The end of the traceback, without colour codes (papermill errors carry the cell's traceback)."""
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    tail = getattr(err, "traceback", None)  # PapermillExecutionError: the kernel-side traceback
    if tail:
        text = "\n".join(tail) + f"\n{getattr(err, 'ename', '')}: {getattr(err, 'evalue', '')}"
    return "\n".join(_ANSI.sub("", text).strip().splitlines()[-lines:])


def run_one(model: str, notebook: Path, params: dict[str, Any], runs_dir: Path, *, force: bool = False,
            kernel_name: str = "python3", cell_timeout: int | None = None, smoke: bool = False) -> RunResult:
    """Execute one notebook for one model unless a matching done-marker exists."""
    import papermill

    out_dir = runs_dir / model
    output = out_dir / notebook.name
    done = out_dir / f"{notebook.stem}.done.json"
    failed = out_dir / f"{notebook.stem}.failed.json"
    digest = params_hash(params)
    if done.is_file() and not force:
        try:
            if json.loads(done.read_text(encoding="utf-8")).get("params_hash") == digest:
                return RunResult(model, notebook.stem, "skipped", output)
        except ValueError:
            pass  # a corrupt marker means "not done"
    out_dir.mkdir(parents=True, exist_ok=True)
    done.unlink(missing_ok=True)
    start = time.monotonic()
    previous_smoke = os.environ.get("BVIP_SMOKE")
    if smoke:
        os.environ["BVIP_SMOKE"] = "1"  # the kernel inherits it; notebook_setup honours it
    try:
        papermill.execute_notebook(str(notebook), str(output), parameters=params, kernel_name=kernel_name,
                                   cwd=str(notebook.parent), progress_bar=False, execution_timeout=cell_timeout)
    except Exception as err:  # noqa: BLE001 - any failure of one model must not stop the batch
        seconds = time.monotonic() - start
        excerpt = _error_excerpt(err)
        write_json(failed, {"model": model, "notebook": notebook.name, "params": params, "error": excerpt,
                            "failed_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": round(seconds, 1)})
        return RunResult(model, notebook.stem, "failed", output, seconds, excerpt)
    finally:
        if smoke:
            if previous_smoke is None:
                os.environ.pop("BVIP_SMOKE", None)
            else:
                os.environ["BVIP_SMOKE"] = previous_smoke
    seconds = time.monotonic() - start
    failed.unlink(missing_ok=True)
    write_json(done, {"model": model, "notebook": notebook.name, "params": params, "params_hash": digest,
                      "output": str(output), "seconds": round(seconds, 1),
                      "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return RunResult(model, notebook.stem, "done", output, seconds)


def run_batch(models: list[str], notebooks: list[str], *, params_file: str | Path | None = None,
              runs_dir: str | Path = "runs", notebooks_dir: str | Path | None = None, smoke: bool = False,
              force: bool = False, kernel_name: str = "python3", cell_timeout: int | None = None) -> BatchReport:
    """Run every notebook for every model (models in order, notebooks in order), then the leaderboard."""
    from tqdm.auto import tqdm

    runs = resolve(runs_dir)
    nb_dir = resolve(notebooks_dir) if notebooks_dir else repo_root() / "notebooks"
    paths = [find_notebook(key, nb_dir) for key in notebooks]  # fail fast on a typo, before any run
    params = load_params(params_file)
    unknown = set(params["models"]) - set(models)
    if unknown:
        print(f"note: parameter file has sections for models not in this batch: {', '.join(sorted(unknown))}")
    report = BatchReport()
    for model in tqdm(models, desc="models", disable=len(models) < 2):
        model_params = params_for(model, params, runs_dir=runs, smoke=smoke)
        blocked = False
        for path in paths:
            if blocked:  # later notebooks of a model depend on its earlier ones
                report.results.append(RunResult(model, path.stem, "blocked", runs / model / path.name,
                                                error="an earlier notebook of this model failed"))
                continue
            result = run_one(model, path, model_params, runs, force=force, kernel_name=kernel_name,
                             cell_timeout=cell_timeout, smoke=smoke)
            report.results.append(result)
            blocked = result.status == "failed"
    board = collect_leaderboard(runs)
    report.leaderboard = write_leaderboard(board, runs)
    return report


# --- Leaderboard ----------------------------------------------------------------

#: leaderboard column -> dotted key in the evaluator report
REPORT_COLUMNS: dict[str, str] = {
    "split": "split",
    "n": "n",
    "acc_sidewalk": "accuracy.sidewalk_pos",
    "acc_road": "accuracy.road_pos",
    "acc_relation": "accuracy.road_vs_sidewalk",
    "presence_sidewalk": "presence.sidewalk_pos",
    "presence_road": "presence.road_pos",
    "presence_relation": "presence.road_vs_sidewalk",
    "near_recall": "structured.near_objects.recall",
    "near_precision": "structured.near_objects.precision",
    "critical_miss_rate": "structured.critical_miss_rate",
    "hallucination_rate": "structured.hallucination_rate",
}
MANDATORY_ACC = ("acc_sidewalk", "acc_road", "acc_relation")
LEADERBOARD_COLUMNS = ("model", "run", "eval_file", "mandatory_acc_mean", *REPORT_COLUMNS)


def _dotted(report: dict[str, Any], key: str) -> Any:
    value: Any = report
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return math.nan
        value = value[part]
    return value


#: Folders under ``runs/`` that hold no model's runs: benchmark scratch, smoke runs, executed demo notebooks.
NOT_MODEL_DIRS = frozenset({"benchmarks", "smoke", "demo", "models"})


def collect_leaderboard(runs_dir: str | Path = "runs") -> pd.DataFrame:
    """One row per ``runs/<model>/**/eval_*.json``, sorted by mean mandatory-field accuracy.

    ``model`` is the first folder under ``runs_dir`` (those in :data:`NOT_MODEL_DIRS` are skipped);
    ``run`` is the report's folder relative to ``runs_dir``. Unreadable reports are skipped and
    listed in ``df.attrs["bad_files"]``.
    """
    runs = resolve(runs_dir)
    rows, bad = [], []
    for path in sorted(runs.glob("*/**/eval_*.json")):
        rel = path.relative_to(runs)
        if rel.parts[0] in NOT_MODEL_DIRS:
            continue
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(report, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as err:
            bad.append(f"{path}: {err}")
            continue
        row: dict[str, Any] = {"model": rel.parts[0], "run": rel.parent.as_posix(), "eval_file": rel.name}
        row.update({col: _dotted(report, key) for col, key in REPORT_COLUMNS.items()})
        rows.append(row)
    df = pd.DataFrame(rows, columns=[c for c in LEADERBOARD_COLUMNS if c != "mandatory_acc_mean"])
    for col in REPORT_COLUMNS:
        if col not in ("split",):
            df[col] = pd.to_numeric(df[col], errors="coerce")
    df.insert(3, "mandatory_acc_mean", df[list(MANDATORY_ACC)].mean(axis=1, skipna=False))
    df = df.sort_values(["mandatory_acc_mean", "near_recall", "critical_miss_rate"],
                        ascending=[False, False, True], na_position="last", kind="stable").reset_index(drop=True)
    df.attrs["bad_files"] = bad
    if bad:
        print(f"warning: skipped {len(bad)} unreadable eval reports, e.g. {bad[0]}")
    return df


def leaderboard_markdown(df: pd.DataFrame) -> str:
    """A Markdown table (no tabulate dependency); floats rounded to 3 places."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "-" if math.isnan(v) else f"{v:.3f}"
        return str(v).replace("|", "\\|")

    header = "| rank | " + " | ".join(df.columns) + " |"
    rule = "|" + "---|" * (len(df.columns) + 1)
    body = [f"| {i + 1} | " + " | ".join(cell(v) for v in row) + " |" for i, row in enumerate(df.itertuples(index=False))]
    note = "Sorted by mean mandatory-field accuracy (Sidewalk, Road, RoadVsSidewalk), then near-object recall."
    return "\n".join(["# Leaderboard", "", note, "", header, rule, *body, ""])


def write_leaderboard(df: pd.DataFrame, runs_dir: str | Path = "runs") -> tuple[Path, Path]:
    """Write ``runs/leaderboard.csv`` and ``runs/leaderboard.md`` atomically; returns both paths."""
    runs = resolve(runs_dir)
    csv_path, md_path = runs / "leaderboard.csv", runs / "leaderboard.md"
    with atomic_path(csv_path) as tmp:
        df.to_csv(tmp, index=False)
    write_text_atomic(md_path, leaderboard_markdown(df))
    return csv_path, md_path


# --- CLI --------------------------------------------------------------------


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def configure_cli(parser: argparse.ArgumentParser) -> None:
    from bvip_helpers.io import resolve_cli_path

    parser.add_argument("--models", required=True, help="comma list of registry names or model dirs")
    parser.add_argument("--notebooks", required=True, help="comma list of notebook prefixes, e.g. 03,05")
    parser.add_argument("--params", type=resolve_cli_path, default=None, help="YAML with 'global' and 'models' sections")
    parser.add_argument("--runs_dir", type=resolve_cli_path, default="runs")
    parser.add_argument("--notebooks_dir", type=resolve_cli_path, default=None, help="default: <repo>/notebooks")
    parser.add_argument("--smoke", action="store_true", help="pass SMOKE=True and set BVIP_SMOKE=1")
    parser.add_argument("--force", action="store_true", help="rerun pairs that are already done")
    parser.add_argument("--kernel", default="python3")
    parser.add_argument("--cell_timeout", type=int, default=None, help="seconds per cell")


def run_cli(args: argparse.Namespace) -> int:
    try:
        from bvip_helpers.io import resolve_cli_path

        models = [str(resolve_cli_path(m)) if Path(m).expanduser().is_dir() else m for m in _split(args.models)]
        report = run_batch(models, _split(args.notebooks), params_file=args.params,
                           runs_dir=args.runs_dir, notebooks_dir=args.notebooks_dir, smoke=args.smoke,
                           force=args.force, kernel_name=args.kernel, cell_timeout=args.cell_timeout)
    except (FileNotFoundError, ValueError) as err:
        print(f"bvip batch: error: {err}", file=sys.stderr)
        return 2
    print(report.summary())
    return 1 if report.failed else 0
