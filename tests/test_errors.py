"""Per-sample error records: typed errors that add up to the evaluator's figures, severity, spoken order, files."""

from __future__ import annotations

import json
import random
from collections import Counter

import pandas as pd
import pytest

from bvip_helpers import errors, schema
from bvip_helpers import evaluate as ev
from bvip_helpers.io import ImagePathError, read_jsonl

L = schema.SceneLabels


def _cell(positions: list[str]) -> str:
    return "-".join(p.capitalize() for p in positions) or "not present"


def truth_frame(scenes: list[L], split: str = "test") -> pd.DataFrame:
    """A frame shaped like ``dataset.load_ground_truth`` output, one row per scene."""
    rows = []
    for i, labels in enumerate(scenes):
        row = {"image_path": f"testing/images/{i:04d}.jpg", "image": f"{i:04d}.jpg", "split": split,
               "target": "A street.", "sidewalk_pos": labels.sidewalk_pos, "road_pos": labels.road_pos,
               "road_vs_sidewalk": labels.road_vs_sidewalk, "has_annotation": True}
        for obj in schema.OBJECT_CLASSES:
            row[obj.near_column] = _cell(labels.near.get(obj.name, []))
            row[obj.far_column] = _cell(labels.far.get(obj.name, []))
        row["response"] = schema.compose_caption(labels, "A street.")
        rows.append(row)
    return pd.DataFrame(rows)


def random_scene(rng: random.Random) -> L:
    labels = L(rng.choice(schema.SIDEWALK_VALUES), rng.choice(schema.ROAD_VALUES))
    for obj in schema.OBJECT_CLASSES:
        for where in (labels.near, labels.far):
            if rng.random() < 0.3:
                where[obj.name] = sorted(rng.choices(schema.OBJECT_POSITIONS, k=rng.randint(1, 3)),
                                         key=schema.OBJECT_POSITIONS.index)
    return labels


def perturbed(labels: L, rng: random.Random) -> str:
    """The scene's caption with a few of every kind of mistake a model makes."""
    wrong = L(labels.sidewalk_pos, labels.road_pos, {k: list(v) for k, v in labels.near.items()},
              {k: list(v) for k, v in labels.far.items()})
    roll = rng.random()
    if roll < 0.1:
        wrong.sidewalk_pos = {"left": "right", "right": "left"}.get(labels.sidewalk_pos, "left")
    elif roll < 0.2 and wrong.near:
        wrong.near.pop(rng.choice(sorted(wrong.near)))
    elif roll < 0.3:
        wrong.near[rng.choice(schema.OBJECT_CLASSES).name] = ["left"]
    elif roll < 0.4 and wrong.near:
        name = rng.choice(sorted(wrong.near))
        wrong.near[name] = [rng.choice(schema.OBJECT_POSITIONS) for _ in wrong.near[name]]
    elif roll < 0.5 and wrong.near:
        name = rng.choice(sorted(wrong.near))
        wrong.near[name] = wrong.near[name] + ["center"]
    elif roll < 0.55:
        wrong.far.clear()
    text = schema.compose_caption(wrong, "A street.")
    roll = rng.random()
    if roll < 0.1:
        head, rest = text.split("\n", 1)
        text = rest.replace("Context:", head + "\nContext:")  # fields after Nearby: section order broken
    elif roll < 0.2:
        text = text.replace(f"RoadVsSidewalk: {wrong.road_vs_sidewalk}", "RoadVsSidewalk: crossing_front")
    elif roll < 0.25:
        text = text.replace(f"Road: {wrong.road_pos}.", "")
    elif roll < 0.3:
        text = text.lower()
    return text


@pytest.fixture(scope="module")
def scored() -> tuple[pd.DataFrame, dict[str, list[dict]]]:
    rng = random.Random(7)
    scenes = [random_scene(rng) for _ in range(400)]
    truth = truth_frame(scenes)
    predictions = {}
    for gap, model in enumerate(("A", "B")):  # each model leaves out 1 image in 20, never the same one
        preds = [{"image": row.image_path, "text": perturbed(labels, rng)}
                 for i, (row, labels) in enumerate(zip(truth.itertuples(), scenes, strict=True)) if i % 20 != 10 * gap + 1]
        preds.append({**preds[0], "text": "Sidewalk: left."})  # a resumed run: the last line wins
        predictions[model] = preds
    return truth, predictions


def test_records_add_up_to_the_evaluators_figures(scored):
    truth, predictions = scored
    records = errors.build_records(predictions, truth, "test")
    assert len(records) == 2 * len(truth)
    for model, preds in predictions.items():
        report = ev.evaluate_predictions(preds, truth, "test")
        s = report["structured"]
        mine = [r for r in records if r["model"] == model]
        kinds = Counter(e["type"] for r in mine for e in r["errors"])
        assert kinds["critical_miss"] == s["critical_misses"] > 0
        assert kinds["hallucinated_close"] == s["hallucinated_objects"] > 0
        assert kinds["critical_miss"] + kinds["missed_close"] == s["near_objects"]["fn"]
        assert kinds["far_missed"] == s["far_objects"]["fn"] > 0
        assert kinds["far_hallucinated"] == s["far_objects"]["fp"]
        assert kinds["no_prediction"] == report["inputs"]["missing_predictions"] > 0
        for key in schema.FIELD_LABELS:
            wrong = sum(e["field"] == key and e["type"].startswith("field_") for r in mine for e in r["errors"])
            assert (len(mine) - wrong) / len(mine) == pytest.approx(report["accuracy"][key])
        matched = s["matched_near_pairs"]
        assert 1 - kinds["wrong_count"] / matched == pytest.approx(s["count_accuracy"])
        assert 1 - (kinds["wrong_count"] + kinds["wrong_side"]) / matched == pytest.approx(s["position_accuracy"])
        assert 1 - kinds["section_order"] / len(mine) == pytest.approx(s["section_order_ok"])
        complete = sum(all(r["prediction"]["fields"].values()) for r in mine)
        assert 1 - kinds["relation_inconsistent"] / complete == pytest.approx(s["relation_consistency"])
        hallucinating = sum(any(e["type"] == "hallucinated_close" for e in r["errors"]) for r in mine)
        assert hallucinating / len(mine) == pytest.approx(s["hallucination_rate"])
        assert kinds["field_flipped"] and kinds["field_wrong"] and kinds["field_missing"] and kinds["wrong_side"]


def test_the_last_line_of_a_resumed_run_wins(scored):
    truth, predictions = scored
    records = errors.build_records({"A": predictions["A"]}, truth, "test")
    first = next(r for r in records if r["image_path"] == predictions["A"][0]["image"])
    assert first["prediction"]["text"] == "Sidewalk: left."


def test_severity_puts_a_missed_close_hazard_and_a_flipped_side_first():
    scenes = [L("left", "right", {"person": ["left"]}), L("left", "right", {"car": ["left", "left"]}),
              L("left", "right", {"obstacle": ["center"]}), L("left", "right")]
    truth = truth_frame(scenes)
    texts = ["Sidewalk: left. Road: right. RoadVsSidewalk: right_of.\nNearby: nothing close.",
             "Sidewalk: left. Road: right. RoadVsSidewalk: right_of.\nNearby: a car close on the left.",
             "Sidewalk: left. Road: right. RoadVsSidewalk: right_of.\nNearby: an obstacle close on the center.",
             "Sidewalk: right. Road: right. RoadVsSidewalk: unknown.\nNearby: nothing close."]
    preds = [{"image": path, "text": text} for path, text in zip(truth["image_path"], texts, strict=True)]
    records = errors.build_records({"m": preds}, truth, "test")
    assert [r["image"] for r in records] == ["0003.jpg", "0000.jpg", "0001.jpg", "0002.jpg"]
    assert [e["type"] for e in records[0]["errors"]] == ["field_flipped", "field_wrong"]
    assert records[1]["errors"][0]["type"] == "critical_miss"
    assert records[1]["errors"][0]["why"] == "truth: person close left; Nearby: nothing close."
    assert records[2]["errors"] == [{"type": "wrong_count", "severity": errors.SEVERITY["wrong_count"],
                                     "field": None, "object": "car", "expected": ["left", "left"],
                                     "predicted": ["left"], "why": "truth: 2 cars close (left, left); caption: 1 car (left)"}]
    assert records[3]["errors"] == [] and records[3]["severity"] == 0
    assert [r["severity"] for r in records] == [90 + 40, 100, 20, 0]  # a record's severity sums its errors
    assert list(errors.ERROR_TYPES[:2]) == ["critical_miss", "field_flipped"]


def test_field_errors_tell_missing_flipped_and_wrong_apart():
    truth = {"sidewalk_pos": "left", "road_pos": "right", "road_vs_sidewalk": "right_of"}
    found = errors.field_errors(truth, {"sidewalk_pos": "right", "road_pos": "front", "road_vs_sidewalk": None})
    assert [(e["type"], e["field"], e["expected"], e["predicted"]) for e in found] == [
        ("field_flipped", "sidewalk_pos", "left", "right"), ("field_wrong", "road_pos", "right", "front"),
        ("field_missing", "road_vs_sidewalk", "right_of", None)]
    assert found[2]["why"] == "truth: RoadVsSidewalk right_of; caption: no RoadVsSidewalk field"
    assert errors.field_errors(truth, {**truth, "road_vs_sidewalk": "left_of"})[0]["type"] == "field_flipped"


def test_hallucination_of_a_far_object_says_so():
    truth = truth_frame([L("left", "right", {}, {"car": ["right"]})])
    text = "Sidewalk: left. Road: right. RoadVsSidewalk: right_of.\nNearby: a car close on the right."
    (record,) = errors.build_records({"m": [{"image": "0000.jpg", "text": text}]}, truth, "test")
    kinds = {e["type"]: e for e in record["errors"]}
    assert set(kinds) == {"hallucinated_close", "far_missed"}
    assert kinds["hallucinated_close"]["why"] == "truth: no car close (car far right); Nearby: a car close on the right."


def test_spoken_order_counts_the_words_before_the_first_and_the_last_hazard():
    hazards = {"person", "car"}
    caption = "Sidewalk: left. Road: right. RoadVsSidewalk: right_of.\nNearby: a person close on the left; a car close on the right."
    spoken = errors.spoken_order(caption, schema.parse_caption(caption), hazards)
    # 7 words ("Sidewalk: left. ... Nearby:") before "a person"; 7 more before "a car"
    assert spoken == {"hazards": 2, "heard": 2, "words_to_first": 7, "words_to_last": 13,
                      "seconds_to_first": 2.8, "seconds_to_last": 5.2}
    late = "Sidewalk: left. Road: right. RoadVsSidewalk: right_of. Far: a traffic light farther away on the left.\n" \
           "Nearby: a car close on the right."
    spoken = errors.spoken_order(late, schema.parse_caption(late), hazards)
    assert spoken["words_to_first"] == 16 and spoken["heard"] == 1 and spoken["words_to_last"] is None
    missed = errors.spoken_order("Nearby: nothing close.", schema.parse_caption("Nearby: nothing close."), hazards)
    assert missed["words_to_first"] is None and missed["seconds_to_first"] is None
    assert errors.spoken_order(caption, schema.parse_caption(caption), set())["hazards"] == 0


def test_spoken_order_table_has_the_truth_as_reference():
    truth = truth_frame([L("left", "right", {"person": ["left"]}), L("left", "right")])
    late = "Sidewalk: left. Far: a traffic light farther away on the left and the right.\nNearby: a person close on the left."
    records = errors.build_records({"m": [{"image": "0000.jpg", "text": late}, {"image": "0001.jpg", "text": ""}]},
                                   truth, "test")
    table = errors.spoken_order_table(records).set_index("model")
    assert table.loc["m", "words to first hazard"] == 15 and table.loc["m", "scenes with hazards"] == 1
    assert table.loc["priority caption (truth)", "words to first hazard"] == 7
    assert table.loc["priority caption (truth)", "seconds to first hazard"] == 2.8


def test_label_error_flag_needs_every_model_to_agree_against_the_annotation():
    truth = truth_frame([L("left", "right", {"person": ["left"]}), L("center", "right")])
    says_right = "Sidewalk: right. Road: right. RoadVsSidewalk: unknown.\nNearby: a person close on the right."
    says_left = "Sidewalk: left. Road: right. RoadVsSidewalk: right_of.\nNearby: nothing close."
    preds = {"A": [{"image": "0000.jpg", "text": says_right}, {"image": "0001.jpg", "text": says_left}],
             "B": [{"image": "0000.jpg", "text": says_right}, {"image": "0001.jpg", "text": "Nearby: nothing close."}]}
    records = {(r["model"], r["image"]): r for r in errors.build_records(preds, truth, "test")}
    assert records["A", "0000.jpg"]["label_suspect"] == [
        "all 2 models say Sidewalk right (annotation: left)",
        "all 2 models say RoadVsSidewalk unknown (annotation: right_of)",
        "all 2 models put the person right (annotation: left)"]
    assert records["B", "0000.jpg"]["label_suspect"] == records["A", "0000.jpg"]["label_suspect"]
    assert records["A", "0001.jpg"]["label_suspect"] == []  # B has no Sidewalk: no agreement
    alone = errors.build_records({"A": preds["A"]}, truth, "test")
    assert all(r["label_suspect"] == [] for r in alone)  # one model agrees with nobody


def test_images_no_model_captioned_are_left_out_and_gaps_are_no_prediction(scored):
    truth, _ = scored
    preds = {"A": [{"image": "0000.jpg", "text": "x"}, {"image": "0001.jpg", "text": "y"}],
             "B": [{"image": "0001.jpg", "text": "y"}]}
    records = errors.build_records(preds, truth, "test")
    assert sorted((r["model"], r["image"]) for r in records) == [("A", "0000.jpg"), ("A", "0001.jpg"),
                                                                 ("B", "0000.jpg"), ("B", "0001.jpg")]
    gap = next(r for r in records if r["model"] == "B" and r["image"] == "0000.jpg")
    assert gap["prediction"]["text"] is None and gap["errors"][0]["type"] == "no_prediction"


def test_summary_and_errors_frame(scored):
    truth, predictions = scored
    records = errors.build_records(predictions, truth, "test")
    summary = errors.summarize(records).set_index("model")
    report = ev.evaluate_predictions(predictions["B"], truth, "test")
    assert summary.loc["B", "accuracy Sidewalk"] == pytest.approx(report["accuracy"]["sidewalk_pos"])
    assert summary.loc["B", "critical misses"] == report["structured"]["critical_misses"]
    frame = errors.errors_frame(records)
    assert len(frame) == sum(r["n_errors"] for r in records)
    assert set(frame["crowding"]) <= {"0", "1", "2", "3+"} and set(frame["type"]) <= set(errors.SEVERITY)


def test_save_records_writes_jsonl_and_parquet(tmp_path, scored):
    truth, predictions = scored
    records = errors.build_records(predictions, truth, "test")[:20]
    written = errors.save_records(records, tmp_path / "errors.jsonl")
    assert [p.name for p in written] == ["errors.jsonl", "errors.parquet"]
    assert read_jsonl(written[0]) == json.loads(json.dumps(records))
    table = pd.read_parquet(written[1])
    assert len(table) == 20 and table["severity"].tolist() == [r["severity"] for r in records]
    assert json.loads(table["errors"][0]) == records[0]["errors"]


def test_from_files_and_a_missing_image_is_a_clear_error(tmp_path, sample_dir):
    captions, annotations = sample_dir / "complete_captions_sensation.csv", sample_dir / "annotations_with_obj_pos.csv"
    test_images = pd.read_csv(captions).query("split == 'test'")["image_path"].tolist()
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps({"image": p, "text": "Sidewalk: left."}) + "\n" for p in test_images))
    records = errors.build_records_from_files({"m": preds}, captions, annotations, sample_dir)
    assert len(records) == len(test_images)
    with pytest.raises(ImagePathError, match=r"image not found: testing/images/\d+\.jpg under .*empty"):
        errors.build_records_from_files({"m": preds}, captions, annotations, tmp_path / "empty")
