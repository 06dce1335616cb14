"""bvip_helpers.runs: the records a split is captioned on, the truth they are scored against, where runs go."""

from __future__ import annotations

import json

import pandas as pd

from bvip_helpers import runs, schema
from bvip_helpers.io import resolve, write_jsonl


def _truth() -> pd.DataFrame:
    rows = [("training/images/a.jpg", "train"), ("testing/images/b.jpg", "test"), ("testing/images/c.jpg", "test")]
    return pd.DataFrame({"image_path": [p for p, _ in rows], "split": [s for _, s in rows],
                         "image": [p.rsplit("/", 1)[1] for p, _ in rows]})


def test_split_records_reads_the_sft_file_or_falls_back_to_the_default_prompt(tmp_path, capsys):
    truth = _truth()
    fallback = runs.split_records(tmp_path, "test", truth)
    assert fallback == [{"image": "testing/images/b.jpg", "prompt": schema.DEFAULT_PROMPT},
                        {"image": "testing/images/c.jpg", "prompt": schema.DEFAULT_PROMPT}]
    assert "not found" in capsys.readouterr().out
    write_jsonl(tmp_path / "bvpi_sft_test.jsonl", [{"image": "testing/images/c.jpg", "prompt": "p", "response": "r"}])
    assert runs.split_records(tmp_path, "test", truth) == [{"image": "testing/images/c.jpg", "prompt": "p",
                                                             "response": "r"}]
    assert len(runs.split_records(tmp_path, "test", truth, limit=0)) == 1


def test_scored_truth_cuts_only_the_scored_split():
    kept = runs.scored_truth(_truth(), "test", [{"image": "testing/images/c.jpg"}])
    assert kept["image"].tolist() == ["a.jpg", "c.jpg"]  # train stays for the majority baseline


def test_eval_variants_read_the_base_of_an_adapter(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/models/base"}))
    variants = runs.eval_variants(["base"], [str(adapter)], also_constrained=True)
    assert [v["label"] for v in variants] == ["zero-shot", "zero-shot + constrained", "SFT", "SFT + constrained"]
    assert variants[2]["model"] == "/models/base" and variants[2]["adapter"] == str(adapter)
    assert runs.eval_variants(["a", "b"], [], also_constrained=False)[1]["label"] == "zero-shot b"
    assert runs.adapter_labels(["runs/m/sft", "runs/m/dpo"]) == ["SFT", "DPO"]
    assert runs.adapter_labels(["runs/a/sft", "runs/b/sft"]) == ["SFT runs/a/sft", "SFT runs/b/sft"]
    assert runs.adapter_labels(["checkpoints/run7"]) == ["SFT"]


def test_run_dir_keeps_a_smoke_run_inside_its_own_runs_folder():
    smoke = resolve("runs/smoke")
    assert runs.run_dir({"model": "m", "constrained": True}, smoke) == smoke / "m" / "zero_shot_constrained"
    inside = {"model": "m", "adapter": "runs/smoke/m/sft", "constrained": False}
    assert runs.run_dir(inside, smoke) == smoke / "m" / "sft" / "eval"  # not runs/smoke/smoke/...
    real = {"model": "m", "adapter": "runs/m/sft", "constrained": True}
    assert runs.run_dir(real, smoke) == smoke / "m" / "sft" / "constrained"
    assert runs.run_dir(real, resolve("runs")) == resolve("runs/m/sft/constrained")
