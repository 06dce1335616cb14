"""The dataset builder: join, normalisation, captions, DPO rules, outputs and every bad-input case."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from bvip_helpers import cli, schema
from bvip_helpers.dataset import (
    CHAT_TEMPLATE,
    OBJECT_COLUMNS,
    SFT_TEMPLATE,
    BuildReport,
    DatasetError,
    _json_column,
    _map_unique,
    _write_records,
    build_dataset,
    caption_claims,
    load_ground_truth,
)
from bvip_helpers.io import read_jsonl

HEADER = ("image,status,sidewalk_pos,road_pos,Object_present,Object_present_outside,m_bicycle,m_car,m_person,"
          "m_traffic_sign,traffic_light,m_obstacle,m_grass,m_plants,m_trees,m_bicycle_outside,m_car_outside,"
          "m_person_outside,m_traffic_sign_outside,traffic_light_outside,m_obstacle_outside,m_grass_outside,"
          "m_plants_outside,m_trees_outside").split(",")
NP = "not present"


def annotation(image: str, sidewalk: str = "Center", road: str = "Left", **objects: str) -> dict[str, str]:
    row = {c: NP for c in HEADER}
    row.update(image=image, status="done", sidewalk_pos=sidewalk, road_pos=road, Object_present="No",
               Object_present_outside="No")
    row.update(objects)
    return row


def write_csvs(tmp_path: Path, captions: list[dict], annotations: list[dict]) -> tuple[Path, Path]:
    cap, ann = tmp_path / "captions.csv", tmp_path / "annotations.csv"
    pd.DataFrame(captions, columns=["image_path", "target", "split"]).to_csv(cap, index=False)
    pd.DataFrame(annotations, columns=HEADER).to_csv(ann, index=False)
    return cap, ann


@pytest.fixture
def scenes(tmp_path: Path) -> tuple[Path, Path]:
    captions = [
        {"image_path": "training/images/a.jpg", "target": "The sidewalk is centered. A person walks ahead.",
         "split": "train"},
        {"image_path": "training/images/b.jpg", "target": "The sidewalk is on the left side of the view.",
         "split": "train"},
        {"image_path": "training/images/c.jpg", "target": "", "split": "train"},
        {"image_path": "validation/images/d.jpg", "target": "A road runs parallel on the right side.",
         "split": "val"},
        {"image_path": "validation/images/e.jpg", "target": "Cars everywhere, \"quoted\" \\ text.", "split": "Val"},
        {"image_path": "testing/images/f.jpg", "target": "The sidewalk ends at a crossing.", "split": "test"},
        {"image_path": "testing/images/g.jpg", "target": "Obstacles on both sides.", "split": "test"},
        {"image_path": "training/images/h.jpg", "target": "A lonely caption.", "split": "train"},
    ]
    annotations = [
        annotation("a.jpg", "Centre", "Right", m_person="Left-Center", m_car_outside="Right-Right"),
        annotation("b.jpg", " left ", "Front", m_obstacle="Center", traffic_light_outside="Left"),
        annotation("c.jpg", "Outside", NP, m_bicycle="Right-Left-Right", m_traffic_sign="Center"),
        annotation("d.jpg", "Right", "Left", m_traffic_sign_outside="Left-Right", m_person_outside="Center"),
        annotation("e.jpg", "", "", m_car="Left"),
        annotation("f.jpg", "Left", "Front", traffic_light="Center-Center", m_obstacle="Left-Right-Right"),
        annotation("g.jpg", "Center", "Center", m_obstacle_outside="Left"),
        annotation("x.jpg", "Left", "Right"),  # no caption; h.jpg has no annotation
    ]
    return write_csvs(tmp_path, captions, annotations)


def build(scenes: tuple[Path, Path], tmp_path: Path, **kwargs) -> tuple[BuildReport, Path]:
    out = tmp_path / "out"
    return build_dataset(*scenes, out, show_progress=False, **kwargs), out


# --- join, normalisation, relation ---------------------------------------------------


def test_ground_truth_join_normalisation_and_order(scenes):
    report = BuildReport()
    gt = load_ground_truth(*scenes, report=report)
    assert gt["image_path"].tolist() == [f"{d}/images/{c}.jpg" for d, c in zip(
        ["training"] * 3 + ["validation"] * 2 + ["testing"] * 2 + ["training"], "abcdefgh", strict=True)]
    assert gt["image"].tolist() == [f"{c}.jpg" for c in "abcdefgh"]
    assert gt["split"].tolist() == ["train"] * 3 + ["val"] * 2 + ["test"] * 2 + ["train"]  # "Val" -> val
    assert gt["sidewalk_pos"].tolist() == ["center", "left", "unknown", "right", "unknown", "left", "center",
                                           "unknown"]
    assert gt["road_pos"].tolist() == ["right", "front", "unknown", "left", "unknown", "front", "center", "unknown"]
    assert gt["road_vs_sidewalk"].tolist() == [
        schema.derive_relation(s, r) for s, r in zip(gt["sidewalk_pos"], gt["road_pos"], strict=True)]
    assert gt["road_vs_sidewalk"].tolist()[:4] == ["right_of", "crossing_front", "unknown", "left_of"]
    assert gt["has_annotation"].tolist() == [True] * 7 + [False]
    assert gt.loc[7, "m_person"] != gt.loc[7, "m_person"]  # NaN without annotation
    assert gt.loc[0, "m_person"] == "Left-Center"
    assert set(OBJECT_COLUMNS) <= set(gt.columns)
    assert gt.loc[0, "annotation_line"] == 2 and gt.loc[7, "annotation_line"] == 0
    assert report.captions_without_annotation == 1
    assert report.captions_without_annotation_examples == ["training/images/h.jpg"]
    assert report.annotations_without_caption == 1
    assert report.unknown_values["sidewalk_pos"] == {"count": 1, "examples": {"Outside": 1}}
    assert report.unknown_values["road_pos"]["count"] == 0  # "not present" and empty are accepted markers


def test_responses_use_schema_composition(scenes):
    gt = load_ground_truth(*scenes)
    first = gt.iloc[0]
    labels = schema.SceneLabels("center", "right", near={"person": ["left", "center"]},
                                far={"car": ["right", "right"]})
    assert first["response"] == schema.compose_caption(labels, "The sidewalk is centered. A person walks ahead.")
    assert gt.loc[2, "response"] == ("Sidewalk: unknown. Road: unknown. RoadVsSidewalk: unknown.\n"
                                     "Nearby: 3 bicycles close on the left, right and right; "
                                     "a traffic sign close on the center.")  # no Context for an empty caption
    # a caption without annotation: unknown fields, no objects, Context kept
    assert gt.loc[7, "response"] == schema.compose_caption(schema.SceneLabels(), "A lonely caption.")


def test_every_sft_row_parses_back_to_its_annotation(scenes, tmp_path):
    _, out = build(scenes, tmp_path)
    gt = load_ground_truth(*scenes).set_index("image_path")
    n = 0
    for split in ("train", "val", "test"):
        for record in read_jsonl(out / f"bvpi_sft_{split}.jsonl"):
            truth = gt.loc[record["image"]]
            parsed = schema.parse_caption(record["response"])
            for name in schema.FIELD_LABELS:
                assert parsed.fields[name] == truth[name] == record[name]
            for obj in schema.OBJECT_CLASSES:
                assert parsed.near.get(obj.name, []) == schema.parse_object_cell(truth[obj.near_column])[0]
                assert parsed.far.get(obj.name, []) == schema.parse_object_cell(truth[obj.far_column])[0]
            assert parsed.section_order[:2] == ["fields", "nearby"]
            n += 1
    assert n == 8


def test_synthetic_dataset_round_trip(tmp_path):
    from bvip_helpers.demo import synth
    if not hasattr(synth, "generate_dataset"):
        pytest.skip("bvip_helpers.demo.synth.generate_dataset not available")
    paths = synth.generate_dataset(tmp_path / "synth", n=30, seed=0, show_progress=False)
    report = build_dataset(paths["captions_csv"], paths["annotations_csv"], tmp_path / "out",
                           image_root=paths["image_root"], show_progress=False)
    gt = load_ground_truth(paths["captions_csv"], paths["annotations_csv"]).set_index("image_path")
    assert sum(report.sft_counts.values()) == len(gt) == 30 and not report.missing_images
    assert report.duplicate_annotations["identical"] == 1  # the generator's deliberate quirk
    for split in ("train", "val", "test"):
        for record in read_jsonl(tmp_path / "out" / f"bvpi_sft_{split}.jsonl"):
            truth, parsed = gt.loc[record["image"]], schema.parse_caption(record["response"])
            assert all(parsed.fields[f] == truth[f] == record[f] for f in schema.FIELD_LABELS)
            for obj in schema.OBJECT_CLASSES:
                assert parsed.near.get(obj.name, []) == schema.parse_object_cell(truth[obj.near_column])[0]
                assert parsed.far.get(obj.name, []) == schema.parse_object_cell(truth[obj.far_column])[0]


def test_map_unique_keeps_list_results_one_per_row():
    """Equal-length list results (all empty, all pairs) once made a 2-D array and crashed the Series."""
    values = pd.Series(["a", "b", "a"] * 8, index=range(10, 34))
    empty = _map_unique(values, lambda v: [])
    assert len(empty) == 24 and list(empty.index) == list(values.index) and all(x == [] for x in empty)
    pairs = _map_unique(values, lambda v: [v, v.upper()])
    assert pairs.iloc[0] == ["a", "A"] and pairs.iloc[1] == ["b", "B"]
    assert _map_unique(values.iloc[:0], lambda v: []).empty


# --- outputs --------------------------------------------------------------------------


def test_outputs_and_record_layouts(scenes, tmp_path):
    report, out = build(scenes, tmp_path, prompt="Describe.")
    assert report.split_counts == {"train": 4, "val": 2, "test": 2}
    assert report.sft_counts == report.chat_counts == {"train": 4, "val": 2, "test": 2}
    names = {p.name for p in out.iterdir()}
    assert names >= {f"bvpi_sft_{s}.jsonl" for s in ("train", "val", "test")} | {
        f"bvpi_chat_{s}.jsonl" for s in ("train", "val", "test")} | {
        "bvpi_dpo_train.jsonl", "bvpi_dpo_val.jsonl", "merged_captions_with_positions.csv", "build_report.json",
        "caption_contradictions.csv", "caption_omissions.csv"}
    assert "bvpi_dpo_test.jsonl" not in names
    assert not [n for n in names if n.endswith(".tmp")]
    sft = read_jsonl(out / "bvpi_sft_train.jsonl")
    assert list(sft[0]) == ["image", "prompt", "response", "sidewalk_pos", "road_pos", "road_vs_sidewalk"]
    assert [r["image"] for r in sft] == ["training/images/a.jpg", "training/images/b.jpg", "training/images/c.jpg",
                                         "training/images/h.jpg"]
    chat = read_jsonl(out / "bvpi_chat_train.jsonl")[0]
    assert chat == {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]},
            {"role": "assistant", "content": [{"type": "text", "text": sft[0]["response"]}]},
        ],
        "images": ["training/images/a.jpg"], "image": "training/images/a.jpg",
        "sidewalk_pos": "center", "road_pos": "right", "road_vs_sidewalk": "right_of",
    }
    merged = pd.read_csv(out / "merged_captions_with_positions.csv", keep_default_na=False)
    assert len(merged) == 8 and merged["response"].tolist()[0] == sft[0]["response"]
    saved = json.loads((out / "build_report.json").read_text())
    assert saved["sft_counts"] == report.sft_counts and saved["captions_without_annotation"] == 1
    text = report.summary()
    assert "captions without annotation: 1" in text and "SFT rows: train=4, val=2, test=2" in text


def test_dpo_pairs_train_val_only_and_skip_empty_caption(scenes, tmp_path):
    report, out = build(scenes, tmp_path)
    train = read_jsonl(out / "bvpi_dpo_train.jsonl")
    assert [r["image"] for r in train] == ["training/images/a.jpg", "training/images/b.jpg", "training/images/h.jpg"]
    assert report.dpo_counts == {"train": 3, "val": 2}
    assert report.dpo_skipped["train"] == {"empty_caption": 1, "same_as_chosen": 0}
    sft = {r["image"]: r for r in read_jsonl(out / "bvpi_sft_train.jsonl")}
    for pair in train:
        assert list(pair) == ["image", "prompt", "chosen", "rejected", "sidewalk_pos", "road_pos", "road_vs_sidewalk"]
        assert pair["chosen"] == sft[pair["image"]]["response"] != pair["rejected"]
    assert train[0]["rejected"] == "The sidewalk is centered. A person walks ahead."


def test_fast_jsonl_writer_matches_json_dumps(tmp_path):
    tricky = ['plain', 'with "quotes"', "back\\slash", "new\nline", "tab\t", "ctrl\x01", "ünïcødé ✓", "", "\u2028"]
    frame = pd.DataFrame({"image_path": tricky, "response": tricky[::-1], "sidewalk_pos": "left",
                          "road_pos": "right", "road_vs_sidewalk": "left_of", "prompt": "p\"q"})
    encoded = {c: _json_column(frame[c]) for c in frame.columns}
    assert list(encoded["image_path"]) == [json.dumps(t, ensure_ascii=False) for t in tricky]
    for template in (SFT_TEMPLATE, CHAT_TEMPLATE):
        path = tmp_path / "x.jsonl"
        _write_records(path, template, encoded, pd.RangeIndex(len(frame)).to_numpy())
        expected = []
        for _, row in frame.iterrows():
            record = json.loads(json.dumps(template).replace('"{image_path}"', json.dumps(row["image_path"]))
                                .replace('"{response}"', json.dumps(row["response"]))
                                .replace('"{prompt}"', json.dumps(row["prompt"]))
                                .replace('"{sidewalk_pos}"', '"left"').replace('"{road_pos}"', '"right"')
                                .replace('"{road_vs_sidewalk}"', '"left_of"'))
            expected.append(json.dumps(record, ensure_ascii=False) + "\n")
        assert path.read_text(encoding="utf-8") == "".join(expected)


# --- data quality: contradictions vs omissions -------------------------------------------


def test_caption_claims_heuristics():
    assert caption_claims("The sidewalk is centered in the view, bordered by a road on the right.") == {
        "sidewalk_pos": "center", "road_pos": "right", "road_vs_sidewalk": None}
    assert caption_claims("The sidewalk is on the left side of the view.")["sidewalk_pos"] == "left"
    assert caption_claims("Bordered by a building on the right and a road on the left.")["road_pos"] == "left"
    assert caption_claims("A road on the left and a road on the right.")["road_pos"] is None  # ambiguous
    assert caption_claims("A bike road on the right.")["road_pos"] is None
    assert caption_claims("The sidewalk ends at a pedestrian crossing.")["road_vs_sidewalk"] == "crossing_front"
    assert caption_claims("A pedestrian crossing is visible 10 meters ahead.")["road_vs_sidewalk"] is None


def test_contradictions_and_omissions_written(tmp_path):
    captions = [
        {"image_path": "t/a.jpg", "target": "The sidewalk is centered in the view.", "split": "train"},
        {"image_path": "t/b.jpg", "target": "Bordered by a road on the left.", "split": "train"},
        {"image_path": "t/c.jpg", "target": "The path is clear.", "split": "val"},
        {"image_path": "t/d.jpg", "target": "A man stands close. The sidewalk is on the right.", "split": "test"},
    ]
    annotations = [annotation("a.jpg", "Right", NP), annotation("b.jpg", "Center", "Right"),
                   annotation("c.jpg", "Center", "Left", m_person="Center"),
                   annotation("d.jpg", "Right", "Left", m_person="Left")]
    cap, ann = write_csvs(tmp_path, captions, annotations)
    report = build_dataset(cap, ann, tmp_path / "out", show_progress=False)
    assert report.contradictions == {"sidewalk_pos": 1, "road_pos": 1, "road_vs_sidewalk": 0}
    assert report.omissions["person"] == 1 and sum(report.omissions.values()) == 1
    table = pd.read_csv(tmp_path / "out/caption_contradictions.csv")
    assert list(table.columns) == ["image_path", "split", "field", "caption_says", "annotation_says", "target"]
    assert table[["image_path", "field", "caption_says", "annotation_says"]].values.tolist() == [
        ["t/a.jpg", "sidewalk_pos", "center", "right"], ["t/b.jpg", "road_pos", "left", "right"]]
    omitted = pd.read_csv(tmp_path / "out/caption_omissions.csv")
    assert omitted[["image_path", "field", "annotation_says"]].values.tolist() == [
        ["t/c.jpg", "nearby:person", "a person close on the center"]]


# --- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize("which,column", [("captions", "split"), ("captions", "target"),
                                          ("annotations", "road_pos"), ("annotations", "m_person_outside")])
def test_missing_required_column_names_file_and_column(scenes, tmp_path, which, column):
    path = scenes[0] if which == "captions" else scenes[1]
    pd.read_csv(path, dtype=str, keep_default_na=False).drop(columns=[column]).to_csv(path, index=False)
    with pytest.raises(DatasetError, match=rf"{path.name}.*\['{column}'\].*Required columns"):
        load_ground_truth(*scenes)


def test_conflicting_duplicates_warned_identical_counted(tmp_path):
    captions = [{"image_path": f"t/{c}.jpg", "target": "x", "split": "train"} for c in "ab"]
    annotations = [annotation("a.jpg", "Left", "Right"), annotation("a.jpg", "Left", "Right"),
                   annotation("b.jpg", "Left", "Right"), annotation("b.jpg", "Right", "Left")]
    cap, ann = write_csvs(tmp_path, captions, annotations)
    report = BuildReport()
    with pytest.warns(UserWarning, match="1 conflicting duplicate"):
        gt = load_ground_truth(cap, ann, report=report)
    assert report.duplicate_annotations["identical"] == 1 and report.duplicate_annotations["conflicting"] == 1
    assert gt["sidewalk_pos"].tolist() == ["left", "left"]  # the first row wins
    assert any("conflicting duplicate" in w for w in report.warnings)


def test_identical_duplicates_do_not_warn(tmp_path):
    cap, ann = write_csvs(tmp_path, [{"image_path": "t/a.jpg", "target": "x", "split": "train"}],
                          [annotation("a.jpg"), annotation("a.jpg")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_ground_truth(cap, ann)


SHIFTED_LINE = ("ne,Center,Right,No,Yes,not present,not present,not present,not present,not present,not present,"
                "not present,not present,not present,not present,not present,not present,not present,not present,"
                "not present,Right,not present,Right,")


def test_shifted_row_reported_by_line_and_not_used(tmp_path):
    cap, ann = write_csvs(tmp_path, [{"image_path": f"t/{c}.jpg", "target": "x", "split": "train"} for c in "abc"],
                          [annotation("a.jpg"), annotation("b.jpg", "Outside", NP), annotation("c.jpg")])
    lines = ann.read_text().splitlines()
    lines.insert(3, SHIFTED_LINE)  # becomes line 4 (header = line 1)
    ann.write_text("\n".join(lines) + "\n")
    report = BuildReport()
    gt = load_ground_truth(cap, ann, report=report)
    assert [(r["line"], r["image"]) for r in report.shifted_rows] == [(4, "ne")]
    assert report.unknown_values["road_pos"]["count"] == 0  # the shifted "No" is not counted as a road value
    assert gt["has_annotation"].all() and len(gt) == 3
    assert "line 4" in report.summary()


def test_malformed_row_reported_with_exact_line_on_slow_path(tmp_path):
    cap, ann = write_csvs(tmp_path, [{"image_path": f"t/{c}.jpg", "target": "x", "split": "train"} for c in "ab"],
                          [annotation("a.jpg"), annotation("b.jpg")])
    lines = ann.read_text().splitlines()
    lines.insert(2, "broken.jpg,done,Left")  # line 3: too few fields
    lines.insert(1, '"multi\nline.jpg",done,Left,Right' + ",not present" * 20)  # a cell spanning lines 2-3
    ann.write_text("\n".join(lines) + "\n")
    lines.append(SHIFTED_LINE)
    ann.write_text("\n".join(lines) + "\n")
    report = BuildReport()
    gt = load_ground_truth(cap, ann, report=report)
    assert [(r["line"], r["image"]) for r in report.malformed_rows] == [(5, "broken.jpg")]
    assert [r["line"] for r in report.shifted_rows] == [7]
    assert gt["has_annotation"].all()
    assert report.n_annotation_rows == 5


def test_malformed_caption_row_is_an_error(scenes):
    with open(scenes[0], "a") as fh:
        fh.write("t/z.jpg,caption, with comma,train\n")
    with pytest.raises(DatasetError, match=r"lines \[10\]"):
        load_ground_truth(*scenes)


def test_unknown_split_is_an_error_with_lines(scenes):
    frame = pd.read_csv(scenes[0], dtype=str, keep_default_na=False)
    frame.loc[[1, 4], "split"] = ["training", "dev"]
    frame.to_csv(scenes[0], index=False)
    with pytest.raises(DatasetError, match=r"2 rows have a split.*line 3: 'training', line 6: 'dev'"):
        load_ground_truth(*scenes)


def test_require_all_splits(tmp_path):
    cap, ann = write_csvs(tmp_path, [{"image_path": "t/a.jpg", "target": "x", "split": "train"}], [annotation("a.jpg")])
    with pytest.raises(DatasetError, match=r"\['val', 'test'\]"):
        build_dataset(cap, ann, tmp_path / "out", require_all_splits=True, show_progress=False)
    report = build_dataset(cap, ann, tmp_path / "out", show_progress=False)
    assert report.sft_counts == {"train": 1, "val": 0, "test": 0}
    assert (tmp_path / "out/bvpi_sft_test.jsonl").read_text() == ""
    assert any("no rows for split" in w for w in report.warnings)


@pytest.fixture
def image_root(scenes, tmp_path) -> Path:
    root = tmp_path / "images"
    for path in pd.read_csv(scenes[0])["image_path"]:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), "gray").save(root / path)
    return root


def test_images_all_present(scenes, tmp_path, image_root):
    report, out = build(scenes, tmp_path, image_root=image_root)
    assert sum(report.sft_counts.values()) == 8 and not report.missing_images


def test_missing_image_fails_or_is_left_out_with_flag(scenes, tmp_path, image_root):
    (image_root / "training/images/b.jpg").unlink()
    (image_root / "testing/images/g.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match=r"1 images missing and 1 unreadable.*--allow_missing_images"):
        build(scenes, tmp_path, image_root=image_root)
    report, out = build(scenes, tmp_path, image_root=image_root, allow_missing_images=True)
    assert report.missing_images == ["training/images/b.jpg"]
    assert report.unreadable_images == ["testing/images/g.jpg"]
    assert report.rows_excluded_for_images == 2
    assert report.sft_counts == {"train": 3, "val": 2, "test": 1}
    assert "training/images/b.jpg" not in (out / "bvpi_sft_train.jsonl").read_text()
    merged = pd.read_csv(out / "merged_captions_with_positions.csv")
    assert len(merged) == 8 and merged["image_ok"].sum() == 6  # rows stay in the merged CSV


def test_image_path_escaping_root_is_refused(scenes, tmp_path, image_root):
    frame = pd.read_csv(scenes[0], dtype=str, keep_default_na=False)
    frame.loc[0, "image_path"] = "../../etc/passwd.jpg"
    frame.to_csv(scenes[0], index=False)
    with pytest.raises(DatasetError, match="escape the image root"):
        build(scenes, tmp_path, image_root=image_root, allow_missing_images=True)


def test_cli_success_and_error(scenes, tmp_path, capsys):
    out = tmp_path / "cli_out"
    code = cli.main(["build-dataset", "--captions_csv", str(scenes[0]), "--annotations_csv", str(scenes[1]),
                     "--out_dir", str(out), "--prompt", "Say it.", "--quiet"])
    assert code == 0
    assert "SFT rows: train=4, val=2, test=2" in capsys.readouterr().out
    assert read_jsonl(out / "bvpi_sft_val.jsonl")[0]["prompt"] == "Say it."
    code = cli.main(["build-dataset", "--captions_csv", str(scenes[0]), "--annotations_csv", str(scenes[1]),
                     "--out_dir", str(out), "--require_all_splits", "--image_root", str(tmp_path / "nope"), "--quiet"])
    assert code == 2
    assert "error:" in capsys.readouterr().err
