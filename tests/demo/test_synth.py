"""The synthetic street-scene generator: schema, determinism, label frequencies, pixels vs labels, CLI."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bvip_helpers.cli import main
from bvip_helpers.demo import copy_paste, synth
from bvip_helpers.schema import OBJECT_CLASSES

REAL_HEADER = (
    "image,status,sidewalk_pos,road_pos,Object_present,Object_present_outside,m_bicycle,m_car,m_person,"
    "m_traffic_sign,traffic_light,m_obstacle,m_grass,m_plants,m_trees,m_bicycle_outside,m_car_outside,"
    "m_person_outside,m_traffic_sign_outside,traffic_light_outside,m_obstacle_outside,m_grass_outside,"
    "m_plants_outside,m_trees_outside"
).split(",")
OBJECT_COLUMNS = [*synth.NEAR_COLUMNS, *synth.FAR_COLUMNS]


def _rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


@pytest.fixture(scope="module")
def dataset200(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return synth.generate_dataset(tmp_path_factory.mktemp("synth200"), n=200, seed=0, show_progress=False)


def test_headers_are_exactly_the_real_ones(dataset200):
    assert synth.ANNOTATION_COLUMNS == REAL_HEADER
    assert _rows(dataset200["annotations_csv"])[0] == REAL_HEADER
    assert _rows(dataset200["captions_csv"])[0] == ["image_path", "target", "split"]


def test_rows_are_well_formed_and_consistent(dataset200):
    rows = _rows(dataset200["annotations_csv"])[1:]
    assert all(len(r) == 24 for r in rows), "no shifted or malformed rows in the default output"
    assert {r[1] for r in rows} == {"done"}
    assert {r[2] for r in rows} <= {"Left", "Center", "Right", "Outside"}
    assert {r[3] for r in rows} <= {"Left", "Right", "Front", "Not present"}
    for r in rows:
        cells = dict(zip(REAL_HEADER, r, strict=True))
        if cells["Object_present"] == "N":  # the injected empty-cells quirk
            continue
        near = any(cells[c] != "not present" for c in synth.NEAR_COLUMNS)
        far = any(cells[c] != "not present" for c in synth.FAR_COLUMNS)
        assert cells["Object_present"] == ("Yes" if near else "No")
        assert cells["Object_present_outside"] == ("Yes" if far else "No")
        for c in OBJECT_COLUMNS:
            assert cells[c] == "not present" or set(cells[c].split("-")) <= {"Left", "Center", "Right"}


def test_images_exist_for_every_caption(dataset200):
    rows = _rows(dataset200["captions_csv"])[1:]
    assert len(rows) == 200
    for image_path, target, split in rows[:: 20]:
        with Image.open(dataset200["image_root"] / image_path) as img:
            assert img.format == "JPEG" and img.size == (256, 192)
        assert target.strip()
        assert image_path.startswith(synth.SPLIT_DIRS[split] + "/images/")


def test_quirks_are_injected_once_and_can_be_turned_off(dataset200, tmp_path):
    rows = _rows(dataset200["annotations_csv"])[1:]
    assert len(rows) == 201
    counts = Counter(tuple(r) for r in rows)
    assert sum(1 for c in counts.values() if c == 2) == 1 and max(counts.values()) == 2
    empty = [r for r in rows if r[4] == "N"]
    assert len(empty) == 1 and set(empty[0][5:]) == {""}
    clean = synth.generate_dataset(tmp_path, n=10, seed=0, show_progress=False, quirks=False)
    clean_rows = _rows(clean["annotations_csv"])[1:]
    assert len(clean_rows) == 10 and len(set(map(tuple, clean_rows))) == 10
    assert all(r[4] in ("Yes", "No") for r in clean_rows)


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = synth.generate_dataset(tmp_path / "a", n=8, seed=3, show_progress=False)
    b = synth.generate_dataset(tmp_path / "b", n=8, seed=3, show_progress=False)
    c = synth.generate_dataset(tmp_path / "c", n=8, seed=4, show_progress=False)
    for key in ("captions_csv", "annotations_csv", "scenes_jsonl"):
        assert a[key].read_bytes() == b[key].read_bytes()
    assert a["annotations_csv"].read_bytes() != c["annotations_csv"].read_bytes()
    images = sorted(p.relative_to(a["image_root"]) for p in a["image_root"].rglob("*.jpg"))
    assert len(images) == 8
    for rel in images:
        assert (a["image_root"] / rel).read_bytes() == (b["image_root"] / rel).read_bytes()


def test_drawing_processes_change_no_byte(tmp_path):
    serial = synth.generate_dataset(tmp_path / "serial", n=130, seed=5, show_progress=False, workers=1)
    pooled = synth.generate_dataset(tmp_path / "pooled", n=130, seed=5, show_progress=False, workers=2)
    files = sorted(p.relative_to(serial["image_root"]) for p in serial["image_root"].rglob("*") if p.is_file())
    assert len(files) == 2 * 130 + 3  # images, masks, two CSVs and the scenes file
    assert files == sorted(p.relative_to(pooled["image_root"]) for p in pooled["image_root"].rglob("*") if p.is_file())
    for rel in files:
        assert (serial["image_root"] / rel).read_bytes() == (pooled["image_root"] / rel).read_bytes(), rel


def test_all_six_classes_appear(dataset200):
    rows = [dict(zip(REAL_HEADER, r, strict=True)) for r in _rows(dataset200["annotations_csv"])[1:]]
    for obj in OBJECT_CLASSES:
        present = [r for r in rows if r[obj.near_column] not in ("not present", "")
                   or r[obj.far_column] not in ("not present", "")]
        assert present, f"{obj.name} never appears in 200 scenes"
    assert any("-" in r[c] for r in rows for c in OBJECT_COLUMNS), "no multi-object cell"


def test_split_proportions(dataset200):
    splits = Counter(r[2] for r in _rows(dataset200["captions_csv"])[1:])
    assert splits == {"train": 159, "val": 20, "test": 21}
    big = Counter(synth.assign_splits(3231, seed=0))
    assert abs(big["train"] - 2581) <= 3 and abs(big["val"] - 317) <= 3 and abs(big["test"] - 333) <= 3
    small = Counter(synth.assign_splits(60, seed=0))
    assert small["val"] >= 8 and small["test"] >= 8


def test_sampled_label_frequencies_match_the_real_ones():
    rng = np.random.default_rng(123)
    draws = [synth.sample_labels(rng) for _ in range(4000)]
    expected = synth.real_marginals()
    for field, index in (("sidewalk_pos", 0), ("road_pos", 1)):
        counts = Counter(d[index] for d in draws)
        for value, p in expected[field].items():
            assert abs(counts[value] / len(draws) - p) < 0.025, (field, value)
    for column in OBJECT_COLUMNS:
        present = sum(d[2][column] != "not present" for d in draws) / len(draws)
        assert abs(present - expected[column]["present"]) < 0.025, column


def test_written_frequencies_close_to_constants(dataset200):
    table = synth.compare_label_frequencies(dataset200["annotations_csv"], show=False)
    assert list(table.columns) == ["column", "value", "synth", "real", "diff"]
    main_rows = table[table["column"].isin(["sidewalk_pos", "road_pos"])]
    assert len(main_rows) == 8
    assert main_rows["diff"].abs().max() < 0.08
    assert table[table["value"] == "present"]["diff"].abs().max() < 0.08


@pytest.mark.reference
def test_frequencies_close_to_the_real_csv(dataset200, reference_csvs):
    _, real_annotations = reference_csvs
    assert _rows(real_annotations)[0] == REAL_HEADER
    table = synth.compare_label_frequencies(dataset200["annotations_csv"], real_annotations, show=False)
    for column in ("sidewalk_pos", "road_pos"):
        rows = table[(table["column"] == column) & (table["real"] > 0.01)]
        assert rows["diff"].abs().max() < 0.08, rows
    presence = table[table["value"] == "present"]
    assert presence["diff"].abs().max() < 0.08, presence


def _third(x: float, width: int) -> str:
    return synth.POSITIONS[min(int(x // (width / 3)), 2)]


def test_pixels_agree_with_labels():
    """Read every label back from the drawn label mask: sidewalk/road placement, object thirds, depth."""
    W, H = 256, 192
    seen = Counter()
    for index in range(60):
        scene, image, mask = synth.make_scene(index, seed=7, with_mask=True)
        assert image.size == (W, H) and mask.shape == (H, W)
        sidewalk = np.argwhere(mask[H // 2:] == synth.MASK_SIDEWALK)
        if scene.sidewalk_pos == "Outside":
            assert (mask[int(0.6 * H):] == synth.MASK_SIDEWALK).mean() < 0.005
            sidewalk_x = W / 2
        else:
            sidewalk_x = sidewalk[:, 1].mean()
            assert _third(sidewalk_x, W) == scene.sidewalk_pos, (index, sidewalk_x)
        road = mask == synth.MASK_ROAD
        ground = mask[int(scene.horizon) + 2:]
        full_rows = ((ground == synth.MASK_ROAD) | (ground >= synth.ITEM_MASK_BASE)).mean(axis=1) > 0.97
        if scene.road_pos == "Not present":
            assert not road.any()
        elif scene.road_pos == "Front":
            assert full_rows.sum() >= 5, index  # a band across the whole width
        else:
            assert not full_rows.any()
            road_x = np.argwhere(road)[:, 1].mean()
            assert (road_x < sidewalk_x) == (scene.road_pos == "Left"), (index, road_x, sidewalk_x)
        for item in scene.items:
            pixels = np.argwhere(mask == item.mask_id)
            assert len(pixels), f"scene {index}: {item.kind} fully hidden"
            k = synth.POSITIONS.index(item.position)
            assert k * W / 3 - 1 <= pixels[:, 1].min() and pixels[:, 1].max() <= (k + 1) * W / 3 + 1, (index, item)
            depth = (item.y_base - scene.horizon) / (H - scene.horizon)
            assert depth >= 0.5 if item.near else depth <= 0.22
            seen[item.kind] += 1
        # the image agrees with the mask: sidewalk and road are drawn in clearly different colours
        if scene.sidewalk_pos != "Outside" and road.any():
            pixels = np.asarray(image, dtype=float)
            sidewalk_color = pixels[mask == synth.MASK_SIDEWALK].mean(axis=0)
            road_color = pixels[road].mean(axis=0)
            assert np.abs(sidewalk_color - road_color).sum() > 40, index
    assert len(seen) >= 6


def test_captions_style_and_flaws(dataset200):
    scenes = [json.loads(line) for line in dataset200["scenes_jsonl"].read_text().splitlines()]
    captions = {r[0]: r[1] for r in _rows(dataset200["captions_csv"])[1:]}
    words = {"Left": "left side of the view", "Right": "right side of the view", "Center": "center"}
    contradictions = omitted = with_near = 0
    for scene in scenes:
        text = captions[scene["image_path"]]
        flaws = scene["caption_flaws"]
        contradictions += "contradiction" in flaws
        if any(item["near"] for item in scene["items"]):
            with_near += 1
            omitted += "omitted_near" in flaws
        if scene["sidewalk_pos"] != "Outside" and "contradiction" not in flaws:
            assert words[scene["sidewalk_pos"]] in text, text
        if "contradiction" in flaws:
            assert words[flaws["contradiction"]["said"]] in text
        assert text.endswith(".")
    assert 1 <= contradictions <= 15
    assert 0.15 <= omitted / with_near <= 0.45
    vocabulary = {w.strip(".,;").lower() for text in captions.values() for w in text.split()}
    assert len(vocabulary) < 200, "keep the vocabulary small for the tiny tokenizer"


def test_cli_writes_dataset_and_compares(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["synth", "--out_dir", str(out), "--n", "5", "--seed", "1", "--image_size", "128x96",
                 "--no_quirks", "--quiet"]) == 0
    rows = _rows(out / synth.ANNOTATIONS_FILE)
    assert len(rows) == 6
    first = _rows(out / synth.CAPTIONS_FILE)[1][0]
    with Image.open(out / first) as img:
        assert img.size == (128, 96)
    assert main(["synth", "--out_dir", str(out), "--n", "5", "--quiet", "--compare_to",
                 str(out / synth.ANNOTATIONS_FILE)]) == 0
    assert "sidewalk_pos" in capsys.readouterr().out
    assert main(["synth", "--out_dir", str(out), "--n", "2", "--quiet", "--compare_to", str(tmp_path / "nope.csv")]) == 2
    with pytest.raises(SystemExit):
        main(["synth", "--out_dir", str(out), "--image_size", "big"])


def test_committed_sample(sample_dir):
    captions = sample_dir / synth.CAPTIONS_FILE
    if not captions.is_file():
        pytest.skip("data/sample not generated yet")
    rows = _rows(captions)[1:]
    splits = Counter(r[2] for r in rows)
    assert splits["val"] >= 8 and splits["test"] >= 8 and splits["train"] >= 40
    assert _rows(sample_dir / synth.ANNOTATIONS_FILE)[0] == REAL_HEADER
    committed = [p for p in sample_dir.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in committed) < 1.5e6
    assert not (sample_dir / copy_paste.IMAGE_FOLDER).exists(), "nothing writes pasted images into data/sample"
    for image_path, _, _ in rows:
        assert (sample_dir / image_path).is_file()


def test_label_masks_are_written_beside_the_images(tmp_path):
    synth.generate_dataset(tmp_path / "with", n=6, seed=3, show_progress=False)
    records = [json.loads(line) for line in (tmp_path / "with" / synth.SCENES_FILE).read_text().splitlines()]
    for record in records:
        index = int(record["image"].removesuffix(".jpg"))
        _, _, expected = synth.make_scene(index, 3, split=record["split"], with_mask=True)
        with Image.open(tmp_path / "with" / record["mask_path"]) as mask:
            assert np.array_equal(np.asarray(mask), expected)  # PNG: lossless, values intact
    synth.generate_dataset(tmp_path / "without", n=6, seed=3, show_progress=False, masks=False)
    assert '"mask_path": null' in (tmp_path / "without" / synth.SCENES_FILE).read_text()
    assert not list((tmp_path / "without").rglob("*.png"))
