"""The tiny twin's base-model stages: patch labels, vision pre-training, caching, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bvip_helpers.demo import pretrain, synth
from bvip_helpers.io import repo_root

SAMPLE = repo_root() / "data" / "sample"
PERSON = pretrain.PATCH_CLASSES.index("person close")
CAR_FAR = pretrain.PATCH_CLASSES.index("car far")


def test_patch_labels_follow_qwen_merge_window_order():
    import numpy as np

    # 4x4 patches over a 40x40 mask: a close person covering only the top-right patch (centre 35, 5).
    mask = np.zeros((40, 40), np.uint8)
    mask[0:10, 30:40] = synth.ITEM_MASK_BASE
    labels = pretrain.patch_labels(mask, [{"kind": "person", "near": True}], 4, 4)
    # merge windows in row-major order, 4 patches each: window (0, 1) is the second, its patch (0, 1) is index 1.
    expected = [0] * 16
    expected[4 + 1] = PERSON
    assert labels == expected


def test_patch_labels_surfaces_objects_scenery_and_mirroring():
    import numpy as np

    items = [{"kind": "car", "near": False}, {"kind": "grass", "near": True}]
    mask = np.array([[synth.ITEM_MASK_BASE, synth.ITEM_MASK_BASE + 1],
                     [synth.MASK_SIDEWALK, synth.MASK_ROAD]], np.uint8).repeat(10, 0).repeat(10, 1)
    sidewalk, road = pretrain.PATCH_CLASSES.index("sidewalk"), pretrain.PATCH_CLASSES.index("road")
    assert pretrain.patch_labels(mask, items, 2, 2) == [CAR_FAR, 0, sidewalk, road]  # grass is "other"


def test_patch_labels_name_objects_that_miss_the_patch_centre():
    import numpy as np

    # 2x2 patches of 20x20 px. Top-left: the open frame of a close bicycle (a 2-px ring, 28% of the
    # patch, centre empty). Top-right: a far car on 5% only stays surface. Bottom-left: a close person
    # on 15% beats a far car on 40%. Bottom-right: mostly road with a sidewalk edge.
    items = [{"kind": "bicycle", "near": True}, {"kind": "car", "near": False}, {"kind": "person", "near": True}]
    mask = np.zeros((40, 40), np.uint8)
    mask[2:18, 2:18] = synth.ITEM_MASK_BASE
    mask[4:16, 4:16] = 0
    mask[0:4, 20:25] = synth.ITEM_MASK_BASE + 1
    mask[20:28, 0:20] = synth.ITEM_MASK_BASE + 1
    mask[28:40, 0:5] = synth.ITEM_MASK_BASE + 2
    mask[20:40, 20:40] = synth.MASK_ROAD
    mask[20:40, 20:24] = synth.MASK_SIDEWALK
    bicycle = pretrain.PATCH_CLASSES.index("bicycle close")
    road = pretrain.PATCH_CLASSES.index("road")
    assert pretrain.patch_labels(mask, items, 2, 2) == [bicycle, 0, PERSON, road]


def test_augmented_views_keep_image_and_mask_aligned():
    import random

    import numpy as np
    from PIL import Image

    # left half red / sidewalk, right half blue / road; every view must keep colour and label together
    pixels = np.zeros((60, 80, 3), np.uint8)
    pixels[:, :40, 0], pixels[:, 40:, 2] = 255, 255
    mask = np.full((60, 80), synth.MASK_ROAD, np.uint8)
    mask[:, :40] = synth.MASK_SIDEWALK
    rng = random.Random(0)
    flips = set()
    for _ in range(20):
        view, view_mask = pretrain.augment_view(Image.fromarray(pixels), mask, rng)
        view = np.asarray(view)
        assert view.shape == pixels.shape and view_mask.shape == mask.shape
        red = view[..., 0] > 127
        assert (red == (view_mask == synth.MASK_SIDEWALK)).mean() > 0.97  # only the seam may blur
        flips.add(bool(view_mask[0, 0] == synth.MASK_ROAD))
    assert flips == {True, False}  # mirrored about half the time


def test_close_classes_skips_items_cropped_out_of_the_view():
    import numpy as np

    items = [{"kind": "person", "near": True}, {"kind": "car", "near": True}]
    mask = np.zeros((10, 10), np.uint8)
    mask[0, 0] = synth.ITEM_MASK_BASE  # only the person is left in the view
    names = [o.name for o in pretrain.OBJECT_CLASSES]
    assert pretrain.close_classes(items, mask) == [float(name == "person") for name in names]


def test_token_thirds_follow_the_merge_window_columns():
    # 168 x 140 pixels: 12 x 10 patches, so 5 rows of 6 merge windows; two window columns per third
    thirds = pretrain.token_thirds([1, 10, 12])
    assert thirds.tolist() == [0, 0, 1, 1, 2, 2] * 5
    assert pretrain.token_thirds([1, 4, 6]).tolist() == [0, 1, 2] * 2


def test_close_classes_marks_close_object_classes_only():
    items = [{"kind": "car", "near": False}, {"kind": "person", "near": True}, {"kind": "person", "near": True},
             {"kind": "grass", "near": True}]
    names = [o.name for o in pretrain.OBJECT_CLASSES]
    assert pretrain.close_classes(items) == [float(name == "person") for name in names]
    assert pretrain.close_classes([]) == [0.0] * len(names)


def test_repeat_factors_show_scenes_with_rare_close_classes_more_often():
    import random

    person = {"kind": "person", "near": True}
    car = {"kind": "car", "near": True}
    far_car = {"kind": "car", "near": False}
    scenes = [{"items": [person]}] * 60 + [{"items": [person, car]}] * 4 + [{"items": [far_car]}] * 36
    factors = pretrain.repeat_factors(scenes, threshold=0.16)
    # person in 64 % of the scenes: factor 1; close car in 4 %: sqrt(0.16 / 0.04) = 2; far cars do not count
    assert factors[0] == 1.0 and factors[60] == pytest.approx(2.0) and factors[-1] == 1.0
    order = pretrain.epoch_order([1.0, 2.0, 1.5], random.Random(0))
    assert order.count(0) == 1 and order.count(1) == 2 and order.count(2) in (1, 2)
    counts = [pretrain.epoch_order([1.5], random.Random(seed)).count(0) for seed in range(200)]
    assert 1.35 < sum(counts) / len(counts) < 1.65  # rounded up half the time: 1.5 on average


def test_vision_pretraining_changes_only_the_vision_tower_and_is_cached(tiny_twin, tmp_path):
    import torch
    from safetensors.torch import load_file

    twin = tiny_twin("qwen2-vl")
    out = pretrain.pretrain_twin_vision(twin, SAMPLE, tmp_path / "vision", max_steps=6, batch_size=4,
                                             show_progress=False)
    before, after = load_file(twin / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("visual.") for k in changed)
    assert any(k.startswith("visual.merger.") for k in changed)
    report = json.loads((out / "vision_pretrain.json").read_text())
    assert report["scenes"] == sum(1 for line in (SAMPLE / "synth_scenes.jsonl").open() if '"split": "train"' in line)
    check = report["val"]  # the held-out check: counts over the sample's val scenes, ratios in [0, 1]
    assert check["scenes"] == sum(1 for line in (SAMPLE / "synth_scenes.jsonl").open() if '"split": "val"' in line)
    assert 0 <= check["patch_accuracy"] <= 1 and set(check["per_class"]) == {o.name for o in pretrain.OBJECT_CLASSES}
    assert 0 <= check["column_accuracy"] <= 1
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    pretrain.pretrain_twin_vision(twin, SAMPLE, out, max_steps=6, batch_size=4, show_progress=False)
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp  # cache hit: not retrained
    # the column loss is part of the settings: another weight trains another tower
    no_column = pretrain.pretrain_twin_vision(twin, SAMPLE, tmp_path / "no_column", max_steps=6, batch_size=4,
                                                   column_weight=0.0, show_progress=False)
    assert json.loads((no_column / "vision_pretrain.json").read_text())["val"]["column_accuracy"] is None
    assert not all(torch.equal(after[k], v) for k, v in load_file(no_column / "model.safetensors").items())
    again = pretrain.pretrain_twin_vision(twin, SAMPLE, tmp_path / "again", max_steps=6, batch_size=4,
                                               show_progress=False)
    rerun = load_file(again / "model.safetensors")  # same seed, same tower
    assert all(torch.equal(after[k], rerun[k]) for k in after)


def test_vision_pretraining_refuses_other_families_and_real_captions(tiny_twin, tmp_path: Path):
    with pytest.raises(ValueError, match="patch layout"):
        pretrain.pretrain_twin_vision(tiny_twin("smolvlm"), SAMPLE, tmp_path / "v", max_steps=1)
    real_like = tmp_path / "real"
    real_like.mkdir()
    with pytest.raises(FileNotFoundError, match="bvip synth"):
        pretrain.pretrain_twin_vision(tiny_twin("qwen2-vl"), real_like, tmp_path / "v", max_steps=1)
    unmasked = tmp_path / "unmasked"
    synth.generate_dataset(unmasked, n=12, show_progress=False, masks=False)
    with pytest.raises(FileNotFoundError, match="no label mask"):
        pretrain.pretrain_twin_vision(tiny_twin("qwen2-vl"), unmasked, tmp_path / "v", max_steps=1)


def test_build_demo_base_refuses_a_real_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="not a tiny twin"):
        pretrain.build_demo_base("qwen2-vl-2b", tmp_path, tmp_path, tmp_path, vision_steps=1, caption_steps=1)
