"""Copy-paste augmentation: pasting one object, and the pasted SFT records with their rebuilt captions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bvip_helpers import dataset, schema
from bvip_helpers.demo import copy_paste, pretrain, synth
from bvip_helpers.io import read_jsonl, repo_root

SAMPLE = repo_root() / "data" / "sample"


def test_paste_bank_groups_every_close_item_by_kind():
    person, car, far_bicycle, grass = ({"kind": "person", "near": True}, {"kind": "car", "near": True},
                                       {"kind": "bicycle", "near": False}, {"kind": "grass", "near": True})
    scenes = [{"items": [person]}] * 3 + [{"items": [far_bicycle, car, person, grass]}] + [{"items": [far_bicycle]}]
    # far items are never pasted: pasted at a close item's height they would be the wrong size
    assert copy_paste.paste_bank(scenes) == {"person": [(0, 0), (1, 0), (2, 0), (3, 2)], "car": [(3, 1)],
                                                "grass": [(3, 3)]}


def test_pasted_object_keeps_its_pixels_height_and_labels():
    import random

    import numpy as np
    from PIL import Image

    base = synth.ITEM_MASK_BASE
    # target: road everywhere, a close person (item 0) in columns 0-9; source: a close bicycle (item 1)
    # drawn as a 6x8 green block at rows 20-25, columns 30-37
    pixels = np.zeros((40, 60, 3), np.uint8)
    mask = np.full((40, 60), synth.MASK_ROAD, np.uint8)
    mask[:, :10] = base
    items = [{"kind": "person", "near": True}]
    source = np.zeros((40, 60, 3), np.uint8)
    source_mask = np.zeros((40, 60), np.uint8)
    source[20:26, 30:38, 1], source_mask[20:26, 30:38] = 200, base + 1
    source_items = [{"kind": "obstacle", "near": False}, {"kind": "bicycle", "near": True}]
    columns = set()
    for seed in range(20):
        image, new_mask, new_items = copy_paste.paste_object(
            Image.fromarray(pixels), mask, items, Image.fromarray(source), source_mask, source_items[1], 1,
            random.Random(seed))
        image = np.asarray(image)
        pasted = new_mask == base + 1
        rows, cols = np.flatnonzero(pasted.any(1)), np.flatnonzero(pasted.any(0))
        third = ("Left", "Center", "Right")[int((cols[0] + 4) * 3 // 60)]  # its middle column's third of 60 px
        assert new_items == [*items, {"kind": "bicycle", "near": True, "position": third}]
        assert rows.tolist() == list(range(20, 26)) and len(cols) == 8 and pasted.sum() == 48  # same height, whole
        assert (image[pasted, 1] == 200).all() and (image[~pasted] == 0).all()
        columns.add(int(cols[0]))
        visible = pretrain.close_classes(new_items, new_mask)
        names = [o.name for o in pretrain.OBJECT_CLASSES]
        assert visible[names.index("bicycle")] == 1.0
        assert visible[names.index("person")] == float(bool((new_mask == base).any()))
    assert len(columns) > 5  # it moves sideways
    assert (mask[:, :10] == base).all() and items == [{"kind": "person", "near": True}]  # inputs untouched


def test_an_item_the_paste_hides_completely_is_no_longer_close():
    import random

    import numpy as np
    from PIL import Image

    base = synth.ITEM_MASK_BASE
    # a close car on rows 21-24, columns 10-19; the pasted obstacle spans rows 20-25 across the whole width
    mask = np.zeros((40, 60), np.uint8)
    mask[21:25, 10:20] = base
    source_mask = np.zeros((40, 60), np.uint8)
    source_mask[20:26, :] = base
    items = [{"kind": "car", "near": True}]
    _, new_mask, new_items = copy_paste.paste_object(Image.new("RGB", (60, 40)), mask, items,
                                                        Image.new("RGB", (60, 40)), source_mask,
                                                        {"kind": "obstacle", "near": True}, 0, random.Random(0))
    names = [o.name for o in pretrain.OBJECT_CLASSES]
    assert pretrain.close_classes(items, mask) == [float(name == "car") for name in names]
    assert pretrain.close_classes(new_items, new_mask) == [float(name == "obstacle") for name in names]


def test_paste_object_leaves_a_scene_of_another_size_as_it_was():
    import random

    import numpy as np
    from PIL import Image

    image, mask = Image.new("RGB", (60, 40)), np.zeros((40, 60), np.uint8)
    source_mask = np.full((20, 30), synth.ITEM_MASK_BASE, np.uint8)
    out = copy_paste.paste_object(image, mask, [], Image.new("RGB", (30, 20)), source_mask,
                                     {"kind": "car", "near": True}, 0, random.Random(0))
    assert out == (image, mask, [])


@pytest.fixture(scope="module")
def sample_copy(tmp_path_factory) -> tuple[Path, Path]:
    """A writable copy of the committed 60-scene sample and its built dataset: (image root, data dir)."""
    root = tmp_path_factory.mktemp("copy_paste")
    image_root, data_dir = root / "sample", root / "bvpi_out"
    shutil.copytree(SAMPLE, image_root)
    dataset.build_dataset(image_root / synth.CAPTIONS_FILE, image_root / synth.ANNOTATIONS_FILE, data_dir,
                          image_root=image_root, show_progress=False)
    return image_root, data_dir


def test_rebuilt_caption_of_an_unpasted_scene_is_the_builders(sample_copy):
    image_root, data_dir = sample_copy
    scenes = {s["image_path"]: s for s in synth.read_scenes(image_root, "train")}
    loaded: dict = {}
    same = 0
    for record in read_jsonl(data_dir / "bvpi_chat_train.jsonl"):
        scene = scenes[record["image"]]
        _, mask = synth.scene_picture_and_mask(loaded, image_root, scene)
        response = record["messages"][-1]["content"][0]["text"]
        rebuilt = copy_paste.caption_with_objects(response, record, *copy_paste.visible_labels(scene["items"], mask))
        same += rebuilt == response
    assert same >= len(scenes) - 2  # a row with a schema quirk may differ; the augmentation leaves it out


def test_pasted_records_name_the_pasted_object_where_it_is(sample_copy):
    import numpy as np

    image_root, data_dir = sample_copy
    train_file = copy_paste.copy_paste_train_file(data_dir, image_root, copies=2, seed=0, show_progress=False)
    records = read_jsonl(train_file)
    originals = read_jsonl(data_dir / "bvpi_chat_train.jsonl")
    report = json.loads((data_dir / copy_paste.REPORT_FILE).read_text())
    counts = report["counts"]
    pasted = records[len(originals):]
    assert records[:len(originals)] == originals
    assert len(pasted) == counts["written"] == 2 * counts["augmented"] - counts["paste_left_scene_unchanged"]
    left_out = counts["no_scene"] + counts["quirk"] + counts["caption_differs_from_mask"]
    assert counts["augmented"] + left_out == len(originals)
    assert counts["augmented"] >= len(originals) - 2
    by_image = {r["image"]: r for r in originals}
    grew = 0
    for record in pasted:
        path = image_root / record["image"]
        assert path.is_file() and record["images"] == [record["image"]]
        assert record["image"].startswith(copy_paste.IMAGE_FOLDER + "/")
        original = next(o for image, o in by_image.items() if Path(image).stem == path.stem.rsplit("_", 1)[0])
        before = schema.parse_caption(original["messages"][-1]["content"][0]["text"])
        after = schema.parse_caption(record["messages"][-1]["content"][0]["text"])
        # the mandatory fields, the prompt and the Context stay; only the object lines change
        assert after.fields == before.fields and record["messages"][0] == original["messages"][0]
        assert (record["messages"][-1]["content"][0]["text"].split("\nContext: ")[-1]
                == original["messages"][-1]["content"][0]["text"].split("\nContext: ")[-1])
        grew += sum(map(len, after.near.values())) > sum(map(len, before.near.values()))
        # the picture is the scene's with one object pasted in: changed, but most of it as it was
        changed = np.abs(rgb(path) - rgb(image_root / original["image"])).max(-1) > 40
        assert 0 < changed.mean() < 0.5
    # most pastes add a named object (grass, plants and trees are pasted too but never named)
    assert grew >= len(pasted) // 2


def rgb(path: Path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), np.int16)


def test_copy_paste_file_is_cached_and_rebuilt_when_settings_change(sample_copy, capsys):
    image_root, data_dir = sample_copy
    first = copy_paste.copy_paste_train_file(data_dir, image_root, copies=1, seed=3, show_progress=False)
    stamp = first.stat().st_mtime_ns
    again = copy_paste.copy_paste_train_file(data_dir, image_root, copies=1, seed=3, show_progress=False)
    assert again == first and first.stat().st_mtime_ns == stamp and "cached" in capsys.readouterr().out
    copy_paste.copy_paste_train_file(data_dir, image_root, copies=1, seed=4, show_progress=False)
    assert first.stat().st_mtime_ns != stamp
    assert copy_paste.copy_paste_train_file(data_dir, image_root, copies=0) == data_dir / "bvpi_chat_train.jsonl"


def test_a_caption_that_disagrees_with_its_mask_is_left_out(sample_copy, tmp_path):
    image_root, data_dir = sample_copy
    records = read_jsonl(data_dir / "bvpi_chat_train.jsonl")[:3]
    broken = json.loads(json.dumps(records[0]))
    text = broken["messages"][-1]["content"][0]["text"]
    lines = text.split("\n")
    lines[1] = "Nearby: a car close on the left; a traffic light close on the right."  # not what the mask shows
    broken["messages"][-1]["content"][0]["text"] = "\n".join(lines)
    unknown = {**records[1], "image": "training/images/not_a_scene.jpg"}
    new, counts = copy_paste.augment_records([broken, unknown, records[2]], image_root, tmp_path, copies=1,
                                             show_progress=False)
    assert counts["caption_differs_from_mask"] == 1 and counts["no_scene"] == 1
    assert counts["augmented"] + counts["quirk"] == 1
    assert all(Path(r["image"]).stem.rsplit("_", 1)[0] == Path(records[2]["image"]).stem for r in new)
