"""Copy-paste augmentation (Ghiasi et al., CVPR 2021) on the synthetic scenes, for the tiny twin's demo.

A close object is cut out of one training scene along its label mask (``bvip synth`` saves one per
scene) and pasted into another. Two stages use it:

* vision pre-training (:mod:`bvip_helpers.demo.pretrain`) pastes into every random view, so the tower
  sees each bicycle in front of many backgrounds (:func:`paste_bank`, :func:`paste_object`);
* SFT (:func:`copy_paste_train_file`): each training scene gets pasted copies, written as images with
  a priority caption whose ``Nearby:`` and ``Far:`` lines are rebuilt from what the new label mask
  shows. The language model then reads rare close classes from many more scenes: close bicycles are
  in 5 % of the training scenes, and the SFT records alone show each one only a few times.

Only scenes whose caption agrees with their label mask are augmented (an annotated item that the
mask does not show, a row with a schema quirk): the others stay as they are, counted in the report.
Real SENSATION images have no label masks, so this is for the synthetic scenes only.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

from bvip_helpers import schema
from bvip_helpers.demo.synth import ITEM_MASK_BASE, SCENES_FILE, read_scenes, scene_picture_and_mask
from bvip_helpers.io import atomic_dir, file_sha1, read_jsonl, resolve, safe_image_path, write_json, write_jsonl

#: Folder under the image root that holds the pasted SFT images.
IMAGE_FOLDER = "copy_paste"
#: The augmented training records, beside ``bvpi_chat_train.jsonl``; its report and cache stamp.
TRAIN_FILE = "bvpi_chat_train_copy_paste.jsonl"
REPORT_FILE = "copy_paste_report.json"
#: Bump when the records written change for the same inputs, so cached files are rebuilt.
VERSION = 1
_POSITIONS = ("Left", "Center", "Right")


def paste_bank(scenes: list[dict[str, Any]]) -> dict[str, list[tuple[int, int]]]:
    """What copy-paste may take: every close item of the scenes as ``(scene index, item index)``, grouped
    by kind, so a paste picks the kind first (each kind equally often) and rare classes are pasted as
    often as common ones. Close scenery (grass, plants, trees) is in it too: its patches stay "other",
    which teaches the tower that not every blob in front of the camera is an object."""
    bank: dict[str, list[tuple[int, int]]] = {}
    for s, scene in enumerate(scenes):
        for i, item in enumerate(scene["items"]):
            if item["near"]:
                bank.setdefault(item["kind"], []).append((s, i))
    return bank


def pick_paste_source(bank: dict[str, list[tuple[int, int]]], rng: random.Random) -> tuple[str, int, int]:
    """``(kind, scene index, item index)`` to paste: a kind of the :func:`paste_bank` first, uniformly, then one
    of its items, so rare classes are pasted as often as common ones."""
    kind = rng.choice(sorted(bank))
    scene_index, item_index = rng.choice(bank[kind])
    return kind, scene_index, item_index


def paste_object(image: Any, mask: Any, items: list[dict[str, Any]], source_image: Any, source_mask: Any,
                 source_item: dict[str, Any], source_index: int,
                 rng: random.Random) -> tuple[Any, Any, list[dict[str, Any]]]:
    """Copy-paste: ``source_item`` (item ``source_index`` of a source scene), cut along its label mask, pasted
    onto a scene.

    The object keeps its height in the picture (so its perspective size stays plausible for a close object),
    moves to a random horizontal place and is mirrored half the time. It covers what was there; the mask
    gets the next item value and ``items`` one more entry (its ``position`` is the third of the picture that
    holds its middle column), so patch labels and close classes see it, and an item it hides completely
    drops out of them as it should. Returns the new image, mask and items; the inputs are left unchanged.
    A source of another size, or a mask with no item value left, returns the scene as it was.
    """
    import numpy as np
    from PIL import Image

    pixels, mask, source_pixels = np.asarray(image), np.asarray(mask), np.asarray(source_image)
    value = ITEM_MASK_BASE + len(items)
    cut = np.asarray(source_mask) == ITEM_MASK_BASE + source_index
    if source_pixels.shape != pixels.shape or value > 255 or not cut.any():
        return image, mask, items
    rows, cols = np.flatnonzero(cut.any(1)), np.flatnonzero(cut.any(0))
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    cut, patch = cut[top:bottom, left:right], source_pixels[top:bottom, left:right]
    if rng.random() < 0.5:
        cut, patch = cut[:, ::-1], patch[:, ::-1]
    width = right - left
    x = rng.randrange(0, pixels.shape[1] - width + 1)
    pixels, mask = pixels.copy(), mask.copy()
    pixels[top:bottom, x:x + width][cut] = patch[cut]
    mask[top:bottom, x:x + width][cut] = value
    third = min(2, int((x + width / 2) * 3 // pixels.shape[1]))
    return Image.fromarray(pixels), mask, [*items, {"kind": source_item["kind"], "near": True,
                                                    "position": _POSITIONS[third]}]


def visible_labels(items: list[dict[str, Any]], mask: Any) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """``(near, far)``: object name -> positions of the schema's object classes that the label mask shows
    (at least one pixel), in the order the priority caption lists positions."""
    import numpy as np

    shown = set(np.unique(np.asarray(mask)).tolist())
    names = {o.name for o in schema.OBJECT_CLASSES}
    near: dict[str, list[str]] = {}
    far: dict[str, list[str]] = {}
    for i, item in enumerate(items):
        if item["kind"] in names and ITEM_MASK_BASE + i in shown:
            (near if item["near"] else far).setdefault(item["kind"], []).append(item["position"].lower())
    for section in (near, far):
        for positions in section.values():
            positions.sort(key=schema.OBJECT_POSITIONS.index)
    return near, far


def caption_with_objects(response: str, record: dict[str, Any], near: dict[str, list[str]],
                         far: dict[str, list[str]]) -> str:
    """``response`` with its ``Nearby:`` and ``Far:`` lines written anew for ``near`` and ``far``; the
    mandatory fields come from the record's labels and ``Context:`` stays as it was."""
    context = response.split("\nContext: ", 1)[1] if "\nContext: " in response else ""
    labels = schema.SceneLabels(sidewalk_pos=record["sidewalk_pos"], road_pos=record["road_pos"], near=near, far=far)
    return schema.compose_caption(labels, context)


def _response(record: dict[str, Any]) -> str:
    return record["messages"][-1]["content"][0]["text"]


def _with_response(record: dict[str, Any], image: str, response: str) -> dict[str, Any]:
    copy = json.loads(json.dumps(record))
    copy["messages"][-1]["content"][0]["text"] = response
    copy["image"], copy["images"] = image, [image]
    return copy


def augment_records(records: list[dict[str, Any]], image_root: str | Path, out_dir: Path, *, copies: int = 1,
                    seed: int = 0, show_progress: bool = True) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``copies`` pasted variants of every training record whose scene can take them -> (new records, counts).

    Each variant gets one close item of another training scene (kind drawn first, so every kind equally
    often) and its caption rebuilt (:func:`caption_with_objects`). Its image is written to ``out_dir``, and
    its record names it ``copy_paste/<scene>_<copy>.jpg``, relative to ``image_root``: the folder
    :func:`copy_paste_train_file` moves ``out_dir`` to. A record is left out, and counted, when it has no scene in
    ``synth_scenes.jsonl``, when the scene has a quirk, or when its caption does not match the objects its
    label mask shows: a caption that is wrong already would stay wrong after a paste.
    """
    from tqdm.auto import tqdm

    image_root = resolve(image_root)
    scenes = read_scenes(image_root, "train")
    by_path = {scene["image_path"]: scene for scene in scenes}
    bank = paste_bank(scenes)
    rng = random.Random(seed)
    loaded: dict[str, tuple[Any, Any]] = {}
    counts = {"records": len(records), "augmented": 0, "written": 0, "no_scene": 0, "quirk": 0,
              "caption_differs_from_mask": 0, "paste_left_scene_unchanged": 0, "pasted_kinds": {}}
    new: list[dict[str, Any]] = []
    for record in tqdm(records, desc="copy-paste", unit="record", disable=not show_progress, mininterval=5):
        scene = by_path.get(record.get("image", ""))
        if scene is None:
            counts["no_scene"] += 1
            continue
        if scene.get("quirk"):
            counts["quirk"] += 1
            continue
        image, mask = scene_picture_and_mask(loaded, image_root, scene)
        response = _response(record)
        if caption_with_objects(response, record, *visible_labels(scene["items"], mask)) != response:
            counts["caption_differs_from_mask"] += 1
            continue
        counts["augmented"] += 1
        for copy in range(copies):
            kind, source_scene, source_index = pick_paste_source(bank, rng)
            source = scenes[source_scene]
            pasted, pasted_mask, items = paste_object(image, mask, scene["items"],
                                                      *scene_picture_and_mask(loaded, image_root, source),
                                                      source["items"][source_index], source_index, rng)
            if len(items) == len(scene["items"]):
                counts["paste_left_scene_unchanged"] += 1
                continue
            name = f"{Path(scene['image_path']).stem}_{copy}.jpg"
            pasted.save(out_dir / name, quality=95)
            new.append(_with_response(record, f"{IMAGE_FOLDER}/{name}",
                                      caption_with_objects(response, record, *visible_labels(items, pasted_mask))))
            counts["pasted_kinds"][kind] = counts["pasted_kinds"].get(kind, 0) + 1
    counts["written"] = len(new)
    return new, counts


def copy_paste_train_file(data_dir: str | Path, image_root: str | Path, *, copies: int = 1, seed: int = 0,
                          force: bool = False, show_progress: bool = True) -> Path:
    """The SFT training file with ``copies`` pasted variants per training scene added (cached).

    Writes the images to ``<image_root>/copy_paste/`` and ``<data_dir>/bvpi_chat_train_copy_paste.jsonl``
    (the original records first, then the pasted ones), with counts and settings in
    ``copy_paste_report.json``. A rerun with the same scenes, records and settings returns the file at once.
    ``copies=0`` returns ``<data_dir>/bvpi_chat_train.jsonl`` itself.
    """
    data_dir, image_root = resolve(data_dir), resolve(image_root)
    train_file = data_dir / "bvpi_chat_train.jsonl"
    if copies <= 0:
        return train_file
    out_file, report_file = data_dir / TRAIN_FILE, data_dir / REPORT_FILE
    settings = {"version": VERSION, "copies": copies, "seed": seed, "image_root": str(image_root),
                "scenes_sha1": file_sha1(image_root / SCENES_FILE), "train_sha1": file_sha1(train_file)}
    if (not force and out_file.is_file() and report_file.is_file() and (image_root / IMAGE_FOLDER).is_dir()
            and json.loads(report_file.read_text()).get("settings") == settings):
        print(f"copy-paste: cached in {out_file}")
        return out_file
    records = read_jsonl(train_file)
    start = time.perf_counter()
    with atomic_dir(image_root / IMAGE_FOLDER) as staging:
        new, counts = augment_records(records, image_root, staging, copies=copies, seed=seed,
                                      show_progress=show_progress)
    for record in new:  # every written path must resolve inside the image root, as training will check
        safe_image_path(image_root, record["image"])
    write_jsonl(out_file, [*records, *new])
    write_json(report_file, {"settings": settings, "counts": counts, "seconds": round(time.perf_counter() - start, 1)})
    print(f"copy-paste: {len(records)} training records + {len(new)} pasted copies -> {out_file} "
          f"(left out: {counts['no_scene']} without a scene, {counts['quirk']} with a quirk, "
          f"{counts['caption_differs_from_mask']} whose caption differs from the mask)")
    return out_file



def plot_pasted_examples(image_root: str | Path, train_file: str | Path, n: int = 3) -> Any:
    """A figure: ``n`` training scenes (top) and their pasted copies (bottom), each with its ``Nearby:`` line."""
    import matplotlib.pyplot as plt

    from bvip_helpers.io import load_image

    image_root = resolve(image_root)
    records = read_jsonl(train_file)
    pasted = [r for r in records if r["image"].startswith(f"{IMAGE_FOLDER}/")]
    originals = {Path(r["image"]).stem: r for r in records if not r["image"].startswith(f"{IMAGE_FOLDER}/")}
    # a pasted image is named <scene stem>_<copy>.jpg
    pairs = [(originals[Path(r["image"]).stem.rsplit("_", 1)[0]], r) for r in pasted[:n]]
    fig, axes = plt.subplots(2, max(1, len(pairs)), figsize=(4.2 * max(1, len(pairs)), 7), squeeze=False)
    for column, pair in enumerate(pairs):
        for row, (record, label) in enumerate(zip(pair, ("training scene", "pasted copy"), strict=True)):
            ax = axes[row][column]
            ax.imshow(load_image(safe_image_path(image_root, record["image"])))
            ax.set_axis_off()
            nearby = next(line for line in _response(record).splitlines() if line.startswith("Nearby:"))
            ax.set_title(f"{label}\n{nearby}", fontsize=7, loc="left", wrap=True)
    fig.tight_layout()
    return fig
