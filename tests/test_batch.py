"""Batch runner: continues past a failing model, resumes, and builds the leaderboard (no real model)."""

from __future__ import annotations

import json
import math

import nbformat
import pandas as pd
import pytest

from bvip_helpers import batch

EVAL_CELL = """
import json, pathlib
if model == "broken":
    raise RuntimeError("boom from the dummy notebook")
out = pathlib.Path(runs_dir) / model / "eval"
out.mkdir(parents=True, exist_ok=True)
acc = {"good": 0.9, "better": 1.0}.get(model, 0.5)
report = {"n": 4, "split": "test",
          "presence": {"sidewalk_pos": 1.0, "road_pos": 1.0, "road_vs_sidewalk": 1.0},
          "accuracy": {"sidewalk_pos": acc, "road_pos": acc, "road_vs_sidewalk": acc - 0.3},
          "structured": {"near_objects": {"recall": 0.8, "precision": 0.7},
                         "critical_miss_rate": 0.1, "hallucination_rate": 0.05},
          "extra": EXTRA}
(out / "eval_test.json").write_text(json.dumps(report))
(pathlib.Path(runs_dir) / model / "calls.txt").open("a").write("run\\n")
"""


def _notebook(path, extra_default=0):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell(f'model = "x"\nruns_dir = "runs"\nEXTRA = {extra_default}\nSMOKE = False')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# dummy"), params, nbformat.v4.new_code_cell(EVAL_CELL)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


@pytest.fixture()
def nb_dir(tmp_path):
    d = tmp_path / "notebooks"
    d.mkdir()
    _notebook(d / "03_dummy_train.ipynb")
    return d


def _calls(runs, model):
    path = runs / model / "calls.txt"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.slow
def test_batch_continues_past_failure_resumes_and_ranks(nb_dir, tmp_path):
    runs = tmp_path / "runs"
    params = tmp_path / "params.yaml"
    params.write_text("global:\n  EXTRA: 1\nmodels:\n  better:\n    EXTRA: 2\n")
    report = batch.run_batch(["good", "broken", "better"], ["03"], params_file=params, runs_dir=runs,
                             notebooks_dir=nb_dir)
    status = {r.model: r.status for r in report.results}
    assert status == {"good": "done", "broken": "failed", "better": "done"}
    failed = json.loads((runs / "broken" / "03_dummy_train.failed.json").read_text())
    assert "boom from the dummy notebook" in failed["error"]
    assert (runs / "good" / "03_dummy_train.ipynb").is_file()
    marker = json.loads((runs / "better" / "03_dummy_train.done.json").read_text())
    assert marker["params"]["EXTRA"] == 2 and marker["params"]["model"] == "better"
    assert json.loads((runs / "good" / "eval" / "eval_test.json").read_text())["extra"] == 1

    board = pd.read_csv(runs / "leaderboard.csv")
    assert list(board["model"]) == ["better", "good"]  # sorted by mean mandatory accuracy
    assert board.loc[0, "mandatory_acc_mean"] == pytest.approx((1.0 + 1.0 + 0.7) / 3)
    assert board.loc[0, "run"] == "better/eval"
    assert "| 1 | better |" in (runs / "leaderboard.md").read_text()

    # resume: done pairs are skipped (the notebook does not run again), the failed one reruns
    again = batch.run_batch(["good", "broken", "better"], ["03"], params_file=params, runs_dir=runs,
                            notebooks_dir=nb_dir)
    assert {r.model: r.status for r in again.results} == {"good": "skipped", "broken": "failed",
                                                          "better": "skipped"}
    assert _calls(runs, "good") == 1
    # changed parameters or --force rerun
    params.write_text("global:\n  EXTRA: 3\n")
    third = batch.run_batch(["good"], ["03"], params_file=params, runs_dir=runs, notebooks_dir=nb_dir)
    assert third.results[0].status == "done" and _calls(runs, "good") == 2
    forced = batch.run_batch(["good"], ["03"], params_file=params, runs_dir=runs, notebooks_dir=nb_dir,
                             force=True)
    assert forced.results[0].status == "done" and _calls(runs, "good") == 3


@pytest.mark.slow
def test_cli_exit_code_nonzero_when_a_model_fails(nb_dir, tmp_path, capsys):
    from bvip_helpers.cli import main

    runs = tmp_path / "runs"
    code = main(["batch", "--models", "broken,good", "--notebooks", "03", "--runs_dir", str(runs),
                 "--notebooks_dir", str(nb_dir), "--smoke"])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAILED broken" in out and "boom" in out
    assert json.loads((runs / "good" / "03_dummy_train.done.json").read_text())["params"]["SMOKE"] is True


def test_later_notebooks_of_a_failed_model_are_blocked(nb_dir, tmp_path, monkeypatch):
    _notebook(nb_dir / "05_dummy_eval.ipynb")
    calls = []

    def fake_run_one(model, notebook, params, runs_dir, **kwargs):
        calls.append((model, notebook.stem))
        status = "failed" if model == "broken" else "done"
        return batch.RunResult(model, notebook.stem, status, runs_dir / model / notebook.name, error="x")

    monkeypatch.setattr(batch, "run_one", fake_run_one)
    report = batch.run_batch(["broken", "good"], ["03", "05"], runs_dir=tmp_path / "runs", notebooks_dir=nb_dir)
    assert calls == [("broken", "03_dummy_train"), ("good", "03_dummy_train"), ("good", "05_dummy_eval")]
    assert [r.status for r in report.results] == ["failed", "blocked", "done", "done"]


def test_find_notebook_errors_name_the_choices(nb_dir):
    assert batch.find_notebook("03", nb_dir).name == "03_dummy_train.ipynb"
    with pytest.raises(FileNotFoundError, match="03_dummy_train.ipynb"):
        batch.find_notebook("07", nb_dir)


def test_params_merge_and_bad_yaml(tmp_path):
    good = tmp_path / "p.yaml"
    good.write_text("global:\n  LR: 0.1\n  EPOCHS: 2\nmodels:\n  m1:\n    LR: 0.5\n")
    merged = batch.params_for("m1", batch.load_params(good), runs_dir=tmp_path, smoke=True)
    assert merged == {"LR": 0.5, "EPOCHS": 2, "model": "m1", "runs_dir": str(tmp_path), "SMOKE": True}
    assert batch.params_hash(merged) != batch.params_hash({**merged, "LR": 0.6})
    bad = tmp_path / "bad.yaml"
    bad.write_text("globals:\n  LR: 1\n")
    with pytest.raises(ValueError, match="'global' and 'models'"):
        batch.load_params(bad)


def test_collect_leaderboard_reads_nested_reports_and_counts_bad_files(tmp_path):
    runs = tmp_path / "runs"
    (runs / "m_a" / "sft" / "final").mkdir(parents=True)
    (runs / "m_b").mkdir(parents=True)
    (runs / "m_a" / "sft" / "final" / "eval_test.json").write_text(json.dumps(
        {"n": 10, "split": "test", "accuracy": {"sidewalk_pos": 0.5, "road_pos": 0.5, "road_vs_sidewalk": 0.5},
         "structured": {"near_objects": {"recall": 0.2}}}))
    (runs / "m_b" / "eval_val.json").write_text(json.dumps(
        {"n": 5, "split": "val", "accuracy": {"sidewalk_pos": 1.0, "road_pos": 0.8, "road_vs_sidewalk": 0.6}}))
    (runs / "m_b" / "eval_broken.json").write_text("{not json")
    (runs / "eval_stray.json").write_text("{}")  # no model folder: ignored
    (runs / "benchmarks" / "sft_run").mkdir(parents=True)  # benchmark scratch: not a model
    (runs / "benchmarks" / "sft_run" / "eval_val.json").write_text(json.dumps({"n": 3, "split": "val"}))
    df = batch.collect_leaderboard(runs)
    assert list(df["model"]) == ["m_b", "m_a"]
    assert df.loc[0, "mandatory_acc_mean"] == pytest.approx(0.8)
    assert df.loc[1, "run"] == "m_a/sft/final" and df.loc[1, "near_recall"] == pytest.approx(0.2)
    assert math.isnan(df.loc[0, "near_recall"])
    assert len(df.attrs["bad_files"]) == 1 and "eval_broken.json" in df.attrs["bad_files"][0]
    csv_path, md_path = batch.write_leaderboard(df, runs)
    assert pd.read_csv(csv_path).shape[0] == 2
    text = md_path.read_text()
    assert "| 1 | m_b |" in text and "0.800" in text


def test_empty_leaderboard_still_writes_files(tmp_path):
    df = batch.collect_leaderboard(tmp_path)
    assert df.empty and "mandatory_acc_mean" in df.columns
    csv_path, md_path = batch.write_leaderboard(df, tmp_path)
    assert csv_path.is_file() and md_path.read_text().startswith("# Leaderboard")
