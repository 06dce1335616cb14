"""The evaluator: seed-compatible figures, structured figures, baselines, inputs and CLI."""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pandas as pd
import pytest

from bvip_helpers import evaluate as ev
from bvip_helpers import schema
from bvip_helpers.cli import main as bvip_main
from bvip_helpers.io import JsonlError, write_jsonl

REFERENCE_DIR = Path(os.environ.get("BVIP_REFERENCE_DIR")
                     or Path(__file__).resolve().parents[1].parent / "shared/reference/sensation")


def _cell(positions: list[str]) -> str:
    return "-".join(p.capitalize() for p in positions) or "not present"


def gt_frame(scenes: list[tuple[str, schema.SceneLabels, str]], context: str = "A sidewalk is shown.") -> pd.DataFrame:
    """A ground-truth frame shaped like ``dataset.load_ground_truth`` output, from (split, labels, target)."""
    rows = []
    for i, (split, labels, target) in enumerate(scenes):
        row = {"image_path": f"{split}/images/{i:04d}.jpg", "image": f"{i:04d}.jpg", "split": split,
               "target": target, "sidewalk_pos": labels.sidewalk_pos, "road_pos": labels.road_pos,
               "road_vs_sidewalk": labels.road_vs_sidewalk, "has_annotation": True}
        for obj in schema.OBJECT_CLASSES:
            row[obj.near_column] = _cell(labels.near.get(obj.name, []))
            row[obj.far_column] = _cell(labels.far.get(obj.name, []))
        row["response"] = schema.compose_caption(labels, context)
        rows.append(row)
    return pd.DataFrame(rows)


L = schema.SceneLabels
SCENES = [
    ("test", L("right", "left", {"person": ["center"], "obstacle": ["left", "right"]}, {"traffic light": ["left"]}),
     "A pedestrian walks ahead."),
    ("test", L("center", "front", {}, {"car": ["right"]}), "A crossing ahead."),
    ("test", L("left", "unknown", {"car": ["left", "left"], "bicycle": ["right"]}, {}), "Cars parked."),
    ("test", L("center", "right", {"traffic sign": ["center"]}, {"person": ["left", "right"]}), "A sign."),
    ("train", L("center", "right"), "Train scene."),
    ("train", L("center", "left"), "Train scene."),
    ("train", L("left", "right"), "Train scene."),
]


@pytest.fixture
def gt() -> pd.DataFrame:
    return gt_frame(SCENES)


def preds_from(frame: pd.DataFrame, split: str = "test", column: str = "response") -> list[dict]:
    rows = frame[frame["split"] == split]
    return [{"image": path, "text": text} for path, text in zip(rows["image_path"], rows[column], strict=True)]


def test_builder_responses_score_perfectly(gt):
    report = ev.evaluate_predictions(preds_from(gt), gt, "test")
    assert report["n"] == 4
    for group in ("presence", "accuracy"):
        assert report[group] == {k: 1.0 for k in ev.FIELDS}
    s = report["structured"]
    assert s["hallucinated_objects"] == 0 and s["hallucination_rate"] == 0.0
    assert s["near_objects"]["recall"] == s["near_objects"]["precision"] == 1.0
    assert s["far_objects"]["recall"] == s["far_objects"]["precision"] == 1.0
    assert s["position_accuracy"] == s["count_accuracy"] == 1.0
    assert s["critical_misses"] == 0 and s["critical_miss_rate"] == 0.0
    assert s["section_order_ok"] == s["relation_consistency"] == 1.0
    assert s["macro_f1"] == {k: 1.0 for k in ev.FIELDS}
    assert report["inputs"] == {"missing_predictions": 0, "matched_predictions": 4, "outside_split": 0,
                                "duplicates": 0, "bad_lines": 0, "prediction_records": 4, "non_string_texts": 0,
                                "normalised_texts": 0}
    json.dumps(report)  # serialisable as is


def test_missing_prediction_and_missing_field_count_as_wrong(gt):
    preds = preds_from(gt)[1:]  # first image has no prediction
    preds[0]["text"] = preds[0]["text"].replace("Road: front.", "")  # second image lacks Road
    report = ev.evaluate_predictions(preds, gt, "test")
    assert report["inputs"]["missing_predictions"] == 1
    assert report["presence"] == {"sidewalk_pos": 0.75, "road_pos": 0.5, "road_vs_sidewalk": 0.75}
    assert report["accuracy"] == {"sidewalk_pos": 0.75, "road_pos": 0.5, "road_vs_sidewalk": 0.75}
    # the missing image had a close person: a critical miss, and recall drops
    assert report["structured"]["critical_misses"] == 1
    assert report["structured"]["section_order_ok"] == 0.75


def preds_missing_the_bicycle(gt: pd.DataFrame) -> list[dict]:
    """The builder's responses, with the close bicycle of the car + bicycle scene left out."""
    preds = preds_from(gt)
    preds[2]["text"] = preds[2]["text"].replace("a bicycle close on the right; ", "")
    assert "bicycle" not in preds[2]["text"]
    return preds


def test_near_recall_by_crowding_groups_scenes_by_their_close_classes(gt):
    report = ev.evaluate_predictions(preds_missing_the_bicycle(gt), gt, "test")
    # two scenes with 2 close classes (person + obstacle, car + bicycle), one with 1 (traffic sign)
    assert report["structured"]["near_recall_by_crowding"] == {"1": {"pairs": 1, "found": 1, "recall": 1.0},
                                                               "2": {"pairs": 4, "found": 3, "recall": 0.75},
                                                               "3+": {"pairs": 0, "found": 0, "recall": None}}
    assert "2: 0.750 (3/4)" in ev.format_report(report)


def test_crowding_figure_draws_each_models_recall_per_group(gt):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bvip_helpers import plots

    reports = {"perfect": ev.evaluate_predictions(preds_from(gt), gt, "test"),
               "no bicycle": ev.evaluate_predictions(preds_missing_the_bicycle(gt), gt, "test")}
    fig = plots.plot_near_recall_by_crowding(reports)
    heights = [bar.get_height() for bar in fig.axes[0].patches]
    assert heights == [1.0, 1.0, 0.0, 1.0, 0.75, 0.0]  # per model: groups 1, 2, 3+ (3+ absent: no bar height)
    assert "(4 pairs)" in fig.axes[0].get_xticklabels()[1].get_text()
    plt.close(fig)


def test_wrong_value_is_present_but_inaccurate(gt):
    preds = preds_from(gt)
    preds[0]["text"] = preds[0]["text"].replace("Sidewalk: right", "sidewalk : CENTRE")
    report = ev.evaluate_predictions(preds, gt, "test")
    assert report["presence"]["sidewalk_pos"] == 1.0
    assert report["accuracy"]["sidewalk_pos"] == 0.75
    conf = report["structured"]["confusion"]["sidewalk_pos"]
    labels = conf["labels"]
    assert labels[-1] == ev.MISSING and labels[:3] == ["left", "center", "right"]
    assert conf["matrix"][labels.index("right")][labels.index("center")] == 1
    assert sum(map(sum, conf["matrix"])) == 4


def test_text_or_response_and_basename_matching(gt):
    rows = gt[gt["split"] == "test"]
    preds = [{"image": "C:\\any\\where\\" + img, "response": r} for img, r in zip(rows["image"], rows["response"], strict=True)]
    preds[0]["text"] = ""  # empty text falls back to response, as the seed's `text or response`
    report = ev.evaluate_predictions(preds, gt, "test")
    assert report["accuracy"] == {k: 1.0 for k in ev.FIELDS}


def test_duplicates_keep_last_and_outside_split_counted(gt):
    preds = preds_from(gt)
    preds.insert(0, {"image": preds[0]["image"], "text": "garbage"})  # earlier line superseded
    preds.append({"image": "elsewhere/0004.jpg", "text": "train image"})  # a train image
    preds.append({"image": "unknown.jpg", "text": "not in the data"})
    preds.append({"image": "unknown.jpg", "text": "again"})
    report = ev.evaluate_predictions(preds, gt, "test")
    assert report["inputs"]["duplicates"] == 2
    assert report["inputs"]["outside_split"] == 2
    assert report["accuracy"]["sidewalk_pos"] == 1.0  # the last line for image 0 is the good one


def test_keyword_proxy_is_substring_but_structured_uses_word_boundaries(gt):
    preds = preds_from(gt)
    # image 1 has no sign anywhere; "design" is a legacy hit, never a structured one
    preds[1]["text"] = preds[1]["text"].replace("Nearby: nothing close.", "Nearby: a design close on the left.")
    report = ev.evaluate_predictions(preds, gt, "test")
    legacy = report["legacy_objects"]["m_traffic_sign"]
    assert legacy == {"gt_present": 1, "tp": 1, "fn": 0, "fp": 1, "recall": 1.0, "precision": 0.5}
    near_sign = report["structured"]["near_objects"]["per_object"]["traffic sign"]
    assert (near_sign["tp"], near_sign["fp"]) == (1, 0)
    assert report["structured"]["hallucinated_objects"] == 0


def test_legacy_object_rules_follow_the_seed():
    frame = gt_frame([("test", L("left", "left"), "")] * 4)
    frame["image"] = [f"{i}.jpg" for i in range(4)]
    frame["m_person"] = ["Left", "  Not Present ", None, "NONE"]
    frame["m_car"] = ["Outside", "not present", "not present", ""]  # any other non-empty cell counts
    texts = ["A MAN waits", "a woman", "", "the people and a scar"]
    report = ev.evaluate_predictions([{"image": f"{i}.jpg", "text": t} for i, t in enumerate(texts)], frame, "test",
                                     structured=False)
    assert report["legacy_objects"]["m_person"] == {"gt_present": 1, "tp": 1, "fn": 0, "fp": 2,
                                                    "recall": 1.0, "precision": 1 / 3}
    assert report["legacy_objects"]["m_car"] == {"gt_present": 1, "tp": 0, "fn": 1, "fp": 1,
                                                 "recall": 0.0, "precision": 0.0}
    assert report["legacy_objects"]["m_bicycle"]["recall"] is None
    assert "structured" not in report


def test_critical_miss_hallucination_positions_counts(gt):
    preds = preds_from(gt)
    # image 0: person dropped (critical), obstacles on the wrong side; image 3: a hallucinated bike
    preds[0]["text"] = preds[0]["text"].replace(
        "Nearby: 2 obstacles close on the left and right; a person close on the center.",
        "Nearby: 2 obstacles close on the left.")
    preds[3]["text"] = preds[3]["text"].replace("Nearby: ", "Nearby: a bike close on the left; ")
    # image 2: one car instead of two
    preds[2]["text"] = preds[2]["text"].replace("2 cars close on the left and left", "a car close on the left")
    s = ev.evaluate_predictions(preds, gt, "test")["structured"]
    assert s["critical_misses"] == 1
    assert s["critical_miss_rate"] == pytest.approx(1 / 3)  # GT critical pairs: person (0), car and bicycle (2)
    assert s["hallucinated_objects"] == 1 and s["hallucination_rate"] == 0.25
    # matched pairs: obstacle(0, wrong), car(2, count wrong), bicycle(2, ok), traffic sign(3, ok)
    assert s["matched_near_pairs"] == 4
    assert s["position_accuracy"] == 0.5
    assert s["count_accuracy"] == 0.75
    assert s["near_objects"]["tp"] == 4 and s["near_objects"]["fn"] == 1 and s["near_objects"]["fp"] == 1


def test_relation_consistency_and_section_order(gt):
    preds = preds_from(gt)
    preds[0]["text"] = "Sidewalk: left. Road: right. RoadVsSidewalk: left_of. Nearby: nothing close."  # inconsistent
    preds[1]["text"] = "Nearby: nothing close. Sidewalk: center. Road: front. RoadVsSidewalk: crossing_front."
    preds[2]["text"] = "Sidewalk: left. Road: left."  # no relation: excluded from consistency; no Nearby
    s = ev.evaluate_predictions(preds, gt, "test")["structured"]
    assert s["relation_consistency"] == pytest.approx(2 / 3)
    assert s["section_order_ok"] == 0.5  # images 0 and 3


def test_baselines_on_a_handmade_case(gt):
    report = ev.evaluate_predictions(preds_from(gt), gt, "test")
    base = report["structured"]["baselines"]
    # train rows: sidewalk center, center, left; road right, left, right; relation right_of, right_of, right_of
    assert base["majority"]["computed_on"] == "train"
    assert base["majority"]["value"] == {"sidewalk_pos": "center", "road_pos": "right", "road_vs_sidewalk": "right_of"}
    # test GT: sidewalk right, center, left, center; road left, front, unknown, right;
    # relation left_of, crossing_front, unknown, right_of
    assert base["majority"]["accuracy"] == {"sidewalk_pos": 0.5, "road_pos": 0.25, "road_vs_sidewalk": 0.25}
    orig = base["original_caption"]
    assert orig["presence"] == orig["accuracy"] == {k: 0.0 for k in ev.FIELDS}
    # targets: "A pedestrian walks ahead." (person: hit), "Cars parked." (car: hit), "A sign." (sign: hit)
    # GT near pairs: obstacle, person, car, bicycle, traffic sign = 5 -> recall 3/5, no false positive
    assert orig["near_objects"] == {"recall": 0.6, "precision": 1.0}


def test_majority_falls_back_to_evaluated_split(gt):
    report = ev.evaluate_predictions(preds_from(gt), gt[gt["split"] == "test"], "test")
    majority = report["structured"]["baselines"]["majority"]
    assert majority["computed_on"] == "test"
    assert majority["value"]["sidewalk_pos"] == "center" and majority["accuracy"]["sidewalk_pos"] == 0.5


def test_unknown_split_is_a_clear_error(gt):
    with pytest.raises(ValueError, match="splits present"):
        ev.evaluate_predictions([], gt, "validation")


def test_flatten_and_format(gt):
    report = ev.evaluate_predictions(preds_from(gt), gt, "test")
    flat = ev.flatten_report(report)
    assert flat["presence.sidewalk_pos"] == 1.0
    assert flat["structured.near_objects.recall"] == 1.0
    assert flat["structured.baselines.majority.accuracy.road_pos"] == 0.25
    assert all(isinstance(v, float) for v in flat.values())
    assert not any(k.startswith("structured.confusion") for k in flat)
    text = ev.format_report(report)
    assert "sidewalk_pos" in text and "majority values from train" in text and "critical misses 0" in text


# --- files and CLI -------------------------------------------------------------------


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_bad_line_error_names_line_number(tmp_path, gt):
    good = [json.dumps(p) for p in preds_from(gt)]
    path = _write_lines(tmp_path / "preds.jsonl", [good[0], "", '{"image": "x.jpg", "text": ', good[1]])
    with pytest.raises(JsonlError, match="line 3"):
        ev.read_predictions(path)
    frame, bad = ev.read_predictions(path, skip_bad_lines=True)
    assert bad == 1 and len(frame) == 2


def test_record_without_text_is_bad(tmp_path):
    path = _write_lines(tmp_path / "preds.jsonl", ['{"image": "a.jpg", "text": "x"}', '', '{"image": "b.jpg"}'])
    with pytest.raises(ValueError, match="line 3 lacks 'image' or 'text'"):
        ev.read_predictions(path)
    assert ev.read_predictions(path, skip_bad_lines=True)[1] == 1


@pytest.fixture
def fake_dataset(monkeypatch, gt):
    """Stand-in for ``dataset.load_ground_truth`` so the CLI is tested on its own."""
    module = types.ModuleType("bvip_helpers.dataset")
    module.load_ground_truth = lambda captions_csv, annotations_csv: gt
    monkeypatch.setitem(sys.modules, "bvip_helpers.dataset", module)
    return module


def test_cli_skip_bad_lines_and_json(tmp_path, gt, fake_dataset, capsys):
    lines = [json.dumps(p) for p in preds_from(gt)]
    path = _write_lines(tmp_path / "preds.jsonl", [lines[0], "not json", *lines[1:], '{"truncated'])
    args = ["evaluate", "--pred_jsonl", str(path), "--captions_csv", "c.csv", "--annotations_csv", "a.csv"]
    assert bvip_main(args) == 2
    assert "line 2" in capsys.readouterr().err
    out = tmp_path / "report" / "eval.json"
    assert bvip_main([*args, "--skip_bad_lines", "--json", str(out)]) == 0
    assert "BVIP evaluation" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["inputs"]["bad_lines"] == 2
    assert report["accuracy"]["road_pos"] == 1.0 and report["pred_file"] == str(path)
    assert not list(out.parent.glob(".*.tmp"))  # atomic write left no temporary behind


@pytest.mark.reference
def test_reference_responses_score_perfectly(tmp_path):
    captions, annotations = REFERENCE_DIR / "complete_captions_sensation.csv", REFERENCE_DIR / "annotations_with_obj_pos.csv"
    if not captions.is_file() or not annotations.is_file():
        pytest.skip(f"reference CSVs not found under {REFERENCE_DIR}")
    from bvip_helpers import dataset
    gt = dataset.load_ground_truth(captions, annotations)
    rows = gt[gt["split"] == "test"]
    pred_jsonl = tmp_path / "preds.jsonl"
    write_jsonl(pred_jsonl, ({"image": p, "response": r} for p, r in zip(rows["image_path"], rows["response"], strict=True)))
    report = ev.evaluate_files(pred_jsonl, captions, annotations, "test", json_out=tmp_path / "report.json")
    assert json.loads((tmp_path / "report.json").read_text())["n"] == len(rows) == report["n"]
    assert report["presence"] == {k: 1.0 for k in ev.FIELDS}
    assert report["accuracy"] == {k: 1.0 for k in ev.FIELDS}
    s = report["structured"]
    assert s["hallucinated_objects"] == 0
    assert s["near_objects"]["recall"] == 1.0 and s["near_objects"]["precision"] == 1.0
    assert s["section_order_ok"] == 1.0 and s["relation_consistency"] == 1.0


def test_no_predictions_at_all(gt):
    report = ev.evaluate_predictions([], gt, "test")
    assert report["inputs"]["missing_predictions"] == 4
    assert report["accuracy"] == report["presence"] == {k: 0.0 for k in ev.FIELDS}
    assert report["structured"]["critical_misses"] == 3 and report["structured"]["near_objects"]["recall"] == 0.0


def test_predictions_of_another_split_are_refused_unless_min_matched_is_0(tmp_path, gt):
    preds = pd.DataFrame({"image": ["0004.jpg", "0005.JPG"], "text": ["x", "y"]})  # train images, one misspelt
    with pytest.raises(ev.UnmatchedPredictionsError, match=r"only 0 of 2 .*'test' split \(4 images\).*they are in "
                                                           r"train \(1\).*closest to '0004.jpg'"):
        ev.check_matched(preds, gt, "test", 0.5)
    ev.check_matched(preds, gt, "test", 0)  # asked to score anyway
    half = pd.DataFrame({"image": ["0000.jpg", "0004.jpg"], "text": ["x", "y"]})
    ev.check_matched(half, gt, "test", 0.5)  # one of two in the split: enough
