"""The builder on the real SENSATION CSVs (skipped when ../shared/reference/sensation is absent)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

from bvip_helpers import schema
from bvip_helpers.dataset import FIELDS, build_dataset, load_ground_truth
from bvip_helpers.io import read_jsonl

pytestmark = pytest.mark.reference

REFERENCE_DIR = Path(os.environ.get("BVIP_REFERENCE_DIR")
                     or Path(__file__).resolve().parents[1].parent / "shared/reference/sensation")
CAPTIONS = REFERENCE_DIR / "complete_captions_sensation.csv"
ANNOTATIONS = REFERENCE_DIR / "annotations_with_obj_pos.csv"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if not (CAPTIONS.is_file() and ANNOTATIONS.is_file()):
        pytest.skip(f"reference CSVs not found in {REFERENCE_DIR}")
    out = tmp_path_factory.mktemp("reference_build")
    return build_dataset(CAPTIONS, ANNOTATIONS, out, show_progress=False), out


def test_row_counts(built):
    report, out = built
    assert report.sft_counts == {"train": 2581, "val": 317, "test": 333}
    assert report.chat_counts == report.sft_counts
    assert report.dpo_counts == {"train": 2581, "val": 317}  # every real caption is non-empty
    for split, n in report.sft_counts.items():
        assert len(read_jsonl(out / f"bvpi_sft_{split}.jsonl")) == n
    for split, n in report.dpo_counts.items():
        assert len(read_jsonl(out / f"bvpi_dpo_{split}.jsonl")) == n


def test_mandatory_fields_equal_annotation_ground_truth(built):
    _, out = built
    annotations = {}  # first row per basename, as read straight from the file
    with open(ANNOTATIONS, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            annotations.setdefault(row["image"], row)
    for split in ("train", "val", "test"):
        for record in read_jsonl(out / f"bvpi_sft_{split}.jsonl"):
            raw = annotations[os.path.basename(record["image"])]
            sidewalk = schema.normalize_position(raw["sidewalk_pos"], schema.SIDEWALK_VALUES)
            road = schema.normalize_position(raw["road_pos"], schema.ROAD_VALUES)
            expected = {"sidewalk_pos": sidewalk, "road_pos": road,
                        "road_vs_sidewalk": schema.derive_relation(sidewalk, road)}
            parsed = schema.parse_caption(record["response"])
            assert {f: record[f] for f in FIELDS} == expected
            assert parsed.fields == expected
            for obj in schema.OBJECT_CLASSES:
                assert parsed.near.get(obj.name, []) == schema.parse_object_cell(raw[obj.near_column])[0]
                assert parsed.far.get(obj.name, []) == schema.parse_object_cell(raw[obj.far_column])[0]


def test_known_quirks_reported(built):
    report, _ = built
    assert [(r["line"], r["image"]) for r in report.shifted_rows] == [(313, "ne")]
    assert report.duplicate_annotations["identical"] == 1 and report.duplicate_annotations["conflicting"] == 0
    assert "QjbcLsBl1wk4WmuPMekTDA.jpg" in report.duplicate_annotations["examples"][0]
    assert report.unknown_values["sidewalk_pos"]["examples"] == {"Outside": 95}
    assert report.captions_without_annotation == 0
    assert "line 313" in report.summary()


def test_empty_object_cells_row(built):
    gt = load_ground_truth(CAPTIONS, ANNOTATIONS)
    row = gt[gt["image"] == "0066.jpg"].iloc[0]
    assert (row["sidewalk_pos"], row["road_pos"]) == ("right", "left")
    assert "\nNearby: nothing close.\n" in row["response"] and "Far:" not in row["response"]
