"""Turn a random tiny twin into a *base model*, the stand-in for a downloaded checkpoint (CPU demo).

A real Qwen2-VL-2B arrives with a vision encoder that has seen billions of images and a language
model that already writes captions. A tiny twin arrives with random weights. Two cached stages
give it both abilities before SFT, on the **train split only** of the synthetic scenes:

1. :func:`pretrain_twin_vision`: the vision tower learns to *see*. Every image patch is labelled
   with what was drawn there (sidewalk, road, an object class close or far, or other; ``bvip synth``
   saves a label mask per scene) and the tower plus a throw-away linear head learn those labels,
   like a vision encoder pre-trained on segmentation data; a second throw-away head learns from the
   mean image token which object classes are close, and a third which third of the picture (left,
   center, right) each token lies in, so that the tokens say *where* an object is. Scenes with rare
   close classes (cars, bicycles) are shown more often (:func:`repeat_factors`), every view gets a close item of another scene pasted
   in (copy-paste augmentation, :mod:`bvip_helpers.demo.copy_paste`), and a check on the val scenes
   (:func:`vision_check`, saved in ``vision_pretrain.json``) says how many close objects the tower
   finds before any captioning is trained. Without this stage the twin learns where
   the sidewalk and road are (large regions) but hardly ever the close objects: through the
   captioning loss alone, a few thousand images are far too few for a random ViT to find a cone.
2. :func:`pretrain_twin_base`: the language model learns to *caption*, the vision tower frozen: a
   generic prompt answered with the original caption (``target``). Like a real base model it then
   writes plain captions and misses the BVIP mandatory fields zero-shot, which SFT then teaches.

:func:`build_demo_base` runs the twin build and both stages; each stage is skipped when its
output folder was made with the same settings.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

from bvip_helpers.demo import twins
from bvip_helpers.demo.copy_paste import paste_bank, paste_object, pick_paste_source
from bvip_helpers.demo.synth import SCENES_FILE, load_mask, read_scenes, scene_picture_and_mask
from bvip_helpers.io import (
    CAPTIONS_FILE,
    atomic_dir,
    file_sha1,
    load_image,
    resolve,
    safe_image_path,
    write_json,
    write_jsonl,
)
from bvip_helpers.registry import TWIN_META_FILE, get_spec, load_model_and_processor
from bvip_helpers.schema import OBJECT_CLASSES, PLAIN_PROMPT

SETTINGS_FILE = "pretrain_settings.json"
#: What a generic captioner is asked during pre-training; the BVIP instruction is new to it at SFT time.
GENERIC_CAPTION_PROMPT = PLAIN_PROMPT
#: What the vision tower learns to tell apart in every patch: the surfaces, then each object class close and far.
PATCH_CLASSES = ("other", "sidewalk", "road", *(f"{o.name} close" for o in OBJECT_CLASSES),
                 *(f"{o.name} far" for o in OBJECT_CLASSES))
VISION_FAMILIES = ("qwen2-vl", "qwen2.5-vl")
#: Object patches weigh this much more than surface and "other" patches in the patch loss: a close cone
#: covers a few patches of the 120 (168 x 140 pixels), and without the weight the tower spends itself on the
#: large surfaces.
OBJECT_PATCH_WEIGHT = 3.0
#: An object labels a patch once it covers this fraction of it (see :func:`patch_labels`).
MIN_OBJECT_COVER = 0.1
#: Weight of the image-level loss: which object classes are close, read from the MEAN of the image
#: tokens. An LM attending evenly to the image tokens gets that mean, so this is the view SFT relies on.
PRESENCE_WEIGHT = 1.0
#: Weight of the column loss: which third of the picture (left, center, right) each image token lies in.
#: The tower's attention only knows relative positions, so without it the tokens hardly say where they are
#: (a probe read the third of 0.50-0.58 of them) and the twin named the side of a close object by chance.
COLUMN_WEIGHT = 1.0
#: Repeat-factor sampling (LVIS): a scene whose rarest close class is in fewer than this fraction of
#: the training scenes is shown more often (see :func:`repeat_factors`). Close cars and bicycles are
#: in 3 and 5 % of the scenes, as in the real data, and the tower would otherwise hardly learn them.
REPEAT_THRESHOLD = 0.15
#: Vision pre-training crops at least this much of each side (see :func:`augment_view`).
CROP_SCALE = 0.8
#: Copy-paste augmentation (Ghiasi et al., CVPR 2021): the chance that a vision pre-training view gets one more
#: close item, cut along its label mask out of another training scene (:mod:`bvip_helpers.demo.copy_paste`). Every
#: view gets one: the tower then sees each bicycle, car and bollard in front of many backgrounds, not only its own.
#: Pasting into half of the views did less on val; pasting only the classes rarer than :data:`REPEAT_THRESHOLD`
#: tied on val, with a tower that a probe read less well (README, "What the CPU demo shows").
COPY_PASTE_RATE = 1.0


# --- Cache stamps --------------------------------------------------------------


def _twin_fingerprint(model_dir: Path) -> str | None:
    meta = model_dir / TWIN_META_FILE
    return json.loads(meta.read_text()).get("fingerprint") if meta.is_file() else None


def _cached(out_dir: Path, settings: dict[str, Any], force: bool) -> bool:
    stamp = out_dir / SETTINGS_FILE
    return (not force and stamp.is_file() and json.loads(stamp.read_text()) == settings
            and (out_dir / "model.safetensors").is_file())


# --- Stage 1: the vision tower ------------------------------------------------


def patch_labels(mask: Any, items: list[dict[str, Any]], grid_h: int, grid_w: int) -> list[int]:
    """One label per image patch (index into :data:`PATCH_CLASSES`), in Qwen2-VL's patch order.

    ``mask`` is the scene's label mask (``bvip synth`` values: 1 sidewalk, 2 road, 16 + i for
    ``items[i]``). A patch is labelled with the object class covering the most of it, if that is at
    least :data:`MIN_OBJECT_COVER` of the patch, close classes before far ones; otherwise with the
    surface (other, sidewalk, road) covering the most. Sampling only the patch centre would label a
    third of the close obstacles and the open frames of bicycles nowhere. Qwen2-VL's processor orders
    the patches by 2x2 merge window (window row, window column, row in window, column in window), so
    the labels follow that order.
    """
    import numpy as np

    from bvip_helpers.demo.synth import ITEM_MASK_BASE, MASK_ROAD, MASK_SIDEWALK

    mask = np.asarray(mask).astype(np.int64)
    height, width = mask.shape
    kinds = {o.name: i for i, o in enumerate(OBJECT_CLASSES)}
    class_of_value = np.zeros(max(256, int(mask.max()) + 1), np.int64)  # grass, plants and trees stay "other"
    class_of_value[[MASK_SIDEWALK, MASK_ROAD]] = [1, 2]
    for i, item in enumerate(items):
        if item["kind"] in kinds and ITEM_MASK_BASE + i < len(class_of_value):
            class_of_value[ITEM_MASK_BASE + i] = 3 + kinds[item["kind"]] + (0 if item["near"] else len(OBJECT_CLASSES))
    patch_of_pixel = ((np.arange(height) * grid_h // height)[:, None] * grid_w
                      + (np.arange(width) * grid_w // width)[None, :])
    n_classes = len(PATCH_CLASSES)
    cover = np.bincount((patch_of_pixel * n_classes + class_of_value[mask]).ravel(),
                        minlength=grid_h * grid_w * n_classes).reshape(grid_h * grid_w, n_classes)
    cover = cover / cover.sum(1, keepdims=True)
    n_objects = len(OBJECT_CLASSES)
    close, far = cover[:, 3:3 + n_objects], cover[:, 3 + n_objects:]
    labels = np.where(close.max(1) >= MIN_OBJECT_COVER, 3 + close.argmax(1),
                      np.where(far.max(1) >= MIN_OBJECT_COVER, 3 + n_objects + far.argmax(1), cover[:, :3].argmax(1)))
    return labels.reshape(grid_h // 2, 2, grid_w // 2, 2).transpose(0, 2, 1, 3).reshape(-1).tolist()


def close_classes(items: list[dict[str, Any]], mask: Any = None) -> list[float]:
    """Multi-hot over :data:`OBJECT_CLASSES`: which classes have a close item in the scene.

    With ``mask`` (a label mask, maybe cropped), only items with at least one pixel in it count.
    """
    import numpy as np

    from bvip_helpers.demo.synth import ITEM_MASK_BASE

    visible = set(np.flatnonzero(np.bincount(np.asarray(mask).ravel(), minlength=256))) if mask is not None else None
    close = {item["kind"] for i, item in enumerate(items)
             if item["near"] and (visible is None or ITEM_MASK_BASE + i in visible)}
    return [float(o.name in close) for o in OBJECT_CLASSES]


def augment_view(image: Any, mask: Any, rng: random.Random, crop_scale: float = CROP_SCALE) -> tuple[Any, Any]:
    """A random view of a scene for vision pre-training: a crop of ``crop_scale`` to 1 of each side
    (aspect kept) resized back to full size, mirrored half the time; the label mask follows exactly."""
    import numpy as np
    from PIL import Image, ImageOps

    width, height = image.size
    scale = rng.uniform(crop_scale, 1.0)
    left, top = rng.uniform(0, width * (1 - scale)), rng.uniform(0, height * (1 - scale))
    box = (left, top, left + width * scale, top + height * scale)
    image = image.resize((width, height), Image.BILINEAR, box=box)
    mask = Image.fromarray(np.asarray(mask)).resize((width, height), Image.NEAREST, box=box)
    if rng.random() < 0.5:
        image, mask = ImageOps.mirror(image), ImageOps.mirror(mask)
    return image, np.asarray(mask)


def repeat_factors(scenes: list[dict[str, Any]], threshold: float = REPEAT_THRESHOLD) -> list[float]:
    """How often each scene is shown per epoch: LVIS repeat-factor sampling over the close classes.

    A class in a fraction ``f`` of the scenes gets ``max(1, sqrt(threshold / f))``; a scene gets the
    largest factor among its close classes (1 with none).
    """
    presence = [close_classes(scene["items"]) for scene in scenes]
    frequency = [sum(column) / len(scenes) for column in zip(*presence, strict=True)]
    factor = [max(1.0, math.sqrt(threshold / f)) if f else 1.0 for f in frequency]
    return [max([1.0, *(factor[c] for c, present in enumerate(row) if present)]) for row in presence]


def token_thirds(grid_thw: Any) -> Any:
    """For one image's merged tokens (Qwen2-VL order: rows of 2x2 merge windows), the third of the picture
    each lies in: 0 left, 1 center, 2 right, by its window column."""
    import torch

    frames, rows, columns = (int(v) for v in grid_thw)
    window_columns = columns // 2
    column = torch.arange(frames * (rows // 2) * window_columns) % window_columns
    return column * 3 // window_columns


def epoch_order(factors: list[float], rng: random.Random) -> list[int]:
    """One shuffled epoch: scene ``i`` appears ``factors[i]`` times, rounded up or down at random."""
    order = [i for i, r in enumerate(factors) for _ in range(int(r) + (rng.random() < r - int(r)))]
    rng.shuffle(order)
    return order


def merged_image_tokens(vision: Any, processor: Any, pictures: list[Any]) -> tuple[Any, Any]:
    """The vision tower's merged image tokens for ``pictures`` (the language model's view of them), and
    the processor's inputs (``image_grid_thw`` gives each image's patch grid)."""
    inputs = processor.image_processor(images=pictures, return_tensors="pt")
    tokens = vision(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    return getattr(tokens, "pooler_output", tokens), inputs


def vision_check(vision: Any, head: Any, processor: Any, image_root: Path, scenes: list[dict[str, Any]],
                 batch_size: int = 32, column_head: Any = None) -> dict[str, Any]:
    """What the vision stage learned, on held-out scenes: patch accuracy, per close class the recall and
    precision of "some patch is labelled with it", and (with ``column_head``) how many tokens know their
    third of the picture: a gauge of what the language model can read from the image tokens later,
    before any captioning is trained."""
    import torch

    n_objects = len(OBJECT_CLASSES)
    correct = object_correct = object_total = total = column_correct = column_total = 0
    hits = torch.zeros(3, n_objects)  # true positives, ground-truth positives, predicted positives
    with torch.no_grad():
        for i in range(0, len(scenes), batch_size):
            batch = scenes[i:i + batch_size]
            pictures = [load_image(safe_image_path(image_root, scene["image_path"])) for scene in batch]
            tokens, inputs = merged_image_tokens(vision, processor, pictures)
            predicted = head(tokens).view(-1, len(PATCH_CLASSES)).argmax(-1)
            per_image = [int(t * h * w) for t, h, w in inputs["image_grid_thw"]]
            if column_head is not None:
                thirds = torch.cat([token_thirds(grid) for grid in inputs["image_grid_thw"]])
                column_correct += int((column_head(tokens).argmax(-1) == thirds).sum())
                column_total += len(thirds)
            for scene, grid, guess in zip(batch, inputs["image_grid_thw"], predicted.split(per_image), strict=True):
                truth = torch.tensor(patch_labels(load_mask(image_root, scene), scene["items"], int(grid[1]),
                                                  int(grid[2])))
                correct += int((guess == truth).sum())
                total += len(truth)
                object_correct += int((guess == truth)[truth >= 3].sum())
                object_total += int((truth >= 3).sum())
                seen = torch.tensor([bool((guess == 3 + c).any()) for c in range(n_objects)])
                present = torch.tensor(close_classes(scene["items"])).bool()
                hits += torch.stack([seen & present, present, seen]).float()
    per_class = {o.name: {"recall": round(float(tp / gt), 3) if gt else None,
                          "precision": round(float(tp / said), 3) if said else None}
                 for o, tp, gt, said in zip(OBJECT_CLASSES, *hits, strict=True)}
    tp, gt, said = hits.sum(1).tolist()
    return {"scenes": len(scenes), "patch_accuracy": round(correct / total, 3),
            "object_patch_accuracy": round(object_correct / max(object_total, 1), 3),
            "close_recall": round(tp / gt, 3) if gt else None,
            "close_precision": round(tp / said, 3) if said else None, "per_class": per_class,
            "column_accuracy": round(column_correct / column_total, 3) if column_total else None}


def pretrain_twin_vision(model: str | os.PathLike[str], image_root: str | os.PathLike[str],
                         out_dir: str | os.PathLike[str], *, max_steps: int, lr: float = 1e-3, batch_size: int = 16,
                         seed: int = 0, copy_paste_rate: float = COPY_PASTE_RATE,
                         column_weight: float = COLUMN_WEIGHT, force: bool = False, show_progress: bool = True) -> Path:
    """Train a Qwen2-VL twin's vision tower (and merger) to see; save the model to ``out_dir``.

    Three throw-away heads on the merged image tokens: one labels every patch (object patches weighted
    by :data:`OBJECT_PATCH_WEIGHT`), one tells from the tokens' mean which object classes are close
    (:func:`close_classes`), and one tells each token's third of the picture (:func:`token_thirds`, loss
    weight ``column_weight``). Every step sees new random views of the scenes (:func:`augment_view`), a
    share ``copy_paste_rate`` of them with a close item of another scene pasted in
    (:func:`~bvip_helpers.demo.copy_paste.paste_object`), so 2,000 steps over 3,196 scenes do not simply memorise them.
    Returns ``out_dir``; a rerun with the same settings and twin returns the cached folder at once.
    """
    import torch

    model_dir, image_root, out_dir = resolve(model), resolve(image_root), resolve(out_dir)
    spec = get_spec(str(model_dir))
    if spec.family not in VISION_FAMILIES:
        raise ValueError(f"vision pre-training knows the patch layout of {', '.join(VISION_FAMILIES)} twins, "
                         f"not {spec.family!r}; skip it (max_steps=0) for other families")
    scenes_file = image_root / SCENES_FILE
    settings = {"stage": "vision", "model": str(model_dir), "twin": _twin_fingerprint(model_dir),
                "scenes": str(scenes_file), "scenes_sha1": file_sha1(scenes_file), "patch_classes": list(PATCH_CLASSES),
                "object_patch_weight": OBJECT_PATCH_WEIGHT, "min_object_cover": MIN_OBJECT_COVER,
                "presence_weight": PRESENCE_WEIGHT, "column_weight": column_weight, "crop_scale": CROP_SCALE,
                "repeat_threshold": REPEAT_THRESHOLD, "copy_paste_rate": copy_paste_rate, "max_steps": max_steps, "lr": lr, "batch_size": batch_size, "seed": seed}
    if _cached(out_dir, settings, force):
        print(f"vision pretrain: cached in {out_dir}")
        return out_dir
    scenes = read_scenes(image_root, "train")
    factors = repeat_factors(scenes)
    bank = paste_bank(scenes)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    net, processor = load_model_and_processor(spec)
    vision = net.model.visual
    hidden = net.config.text_config.hidden_size
    head = torch.nn.Linear(hidden, 4 * len(PATCH_CLASSES))  # 4 patches per token
    presence_head = torch.nn.Linear(hidden, len(OBJECT_CLASSES))
    column_head = torch.nn.Linear(hidden, 3)
    class_weights = torch.tensor([1.0, 1.0, 1.0] + [OBJECT_PATCH_WEIGHT] * (len(PATCH_CLASSES) - 3))
    params = [*vision.parameters(), *head.parameters(), *presence_head.parameters(), *column_head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr)
    warmup = max(1, max_steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, max_steps) / max_steps)))
    loaded: dict[str, tuple[Any, Any]] = {}  # image path -> (image, label mask), read once
    order: list[int] = []
    losses = []
    vision.train()
    start = time.perf_counter()
    steps = range(max_steps)
    if show_progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="vision pretrain", mininterval=5)
    for step in steps:
        if len(order) < batch_size:
            order += epoch_order(factors, rng)
        batch, order = [scenes[i] for i in order[:batch_size]], order[batch_size:]
        pictures, masks, batch_items = [], [], []
        for scene in batch:
            image, mask = scene_picture_and_mask(loaded, image_root, scene)
            items = scene["items"]
            # at rate 0 no random number is drawn: the views, and the tower, are those without copy-paste
            if copy_paste_rate and bank and rng.random() < copy_paste_rate:
                _, source_scene, source_index = pick_paste_source(bank, rng)
                source = scenes[source_scene]
                image, mask, items = paste_object(image, mask, items, *scene_picture_and_mask(loaded, image_root, source),
                                                  source["items"][source_index], source_index, rng)
            image, mask = augment_view(image, mask, rng)
            pictures.append(image)
            masks.append(mask)
            batch_items.append(items)
        tokens, inputs = merged_image_tokens(vision, processor, pictures)
        labels = torch.tensor([label for items, grid, mask in zip(batch_items, inputs["image_grid_thw"], masks,
                                                                  strict=True)
                               for label in patch_labels(mask, items, int(grid[1]), int(grid[2]))])
        loss = torch.nn.functional.cross_entropy(head(tokens).view(-1, len(PATCH_CLASSES)), labels,
                                                 weight=class_weights)
        per_image = tokens.split([int(t * h * w) // 4 for t, h, w in inputs["image_grid_thw"]])
        pooled = torch.stack([image_tokens.mean(0) for image_tokens in per_image])
        present = torch.tensor([close_classes(items, mask) for items, mask in zip(batch_items, masks, strict=True)])
        loss = loss + PRESENCE_WEIGHT * torch.nn.functional.binary_cross_entropy_with_logits(
            presence_head(pooled), present)
        if column_weight:
            columns = torch.cat([token_thirds(grid) for grid in inputs["image_grid_thw"]])
            loss = loss + column_weight * torch.nn.functional.cross_entropy(column_head(tokens), columns)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if show_progress and step % 50 == 0:
            steps.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    seconds = time.perf_counter() - start
    net.eval()
    held_out = read_scenes(image_root, "val", allow_empty=True)
    check = (vision_check(vision, head, processor, image_root, held_out,
                          column_head=column_head if column_weight else None) if held_out else None)
    _save_model(net, processor, model_dir, out_dir)
    tail = losses[-max(1, max_steps // 10):]
    write_json(out_dir / "vision_pretrain.json", {"seconds": round(seconds, 1), "scenes": len(scenes),
                                                  "shown_per_epoch": round(sum(factors)),
                                                  "final_loss": sum(tail) / len(tail), "patch_classes": PATCH_CLASSES,
                                                  "val": check})
    if check:
        print(f"vision check on {check['scenes']} val scenes: patch accuracy {check['patch_accuracy']}, close "
              f"objects seen by some patch: recall {check['close_recall']}, precision {check['close_precision']}")
    write_json(out_dir / SETTINGS_FILE, settings)
    print(f"vision pretrain: {max_steps} steps on {len(scenes)} scenes in {seconds:.0f}s, "
          f"final loss {sum(tail) / len(tail):.3f} -> {out_dir}")
    return out_dir


def _save_model(net: Any, processor: Any, source_dir: Path, out_dir: Path) -> None:
    """Save model, processor and the twin's meta file; atomically, so a crash never leaves half a model."""
    with atomic_dir(out_dir) as staging:
        net.save_pretrained(staging, safe_serialization=True)
        processor.save_pretrained(staging)
        if (source_dir / TWIN_META_FILE).is_file():
            shutil.copyfile(source_dir / TWIN_META_FILE, staging / TWIN_META_FILE)


# --- Stage 2: a generic captioner ----------------------------------------------


def write_caption_pretrain_files(captions_csv: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                                 prompt: str | None = None) -> dict[str, Path]:
    """``pretrain_{train,val}.jsonl``: a generic prompt answered with the ORIGINAL caption (``target``)."""
    import pandas as pd

    frame = pd.read_csv(captions_csv)
    missing = {"image_path", "target", "split"} - set(frame.columns)
    if missing:
        raise ValueError(f"{captions_csv}: missing column(s) {sorted(missing)}")
    frame = frame[frame["target"].notna() & (frame["target"].astype(str).str.strip() != "")]
    out_dir = Path(out_dir)
    paths = {}
    for split in ("train", "val"):
        rows = frame[frame["split"] == split]
        paths[split] = out_dir / f"pretrain_{split}.jsonl"
        write_jsonl(paths[split], ({"image": r.image_path, "prompt": prompt or GENERIC_CAPTION_PROMPT,
                                    "response": str(r.target).strip()} for r in rows.itertuples()))
    return paths


def pretrain_twin_base(model: str | os.PathLike[str], image_root: str | os.PathLike[str],
                       out_dir: str | os.PathLike[str], *, max_steps: int, lr: float = 1e-3, batch_size: int = 8,
                       seed: int = 0, captions_csv: str | os.PathLike[str] | None = None, max_length: int = 1024,
                       train_vision: bool = True, force: bool = False) -> Path:
    """Full fine-tune a twin on the original captions; cached in ``out_dir``.

    ``train_vision=False`` keeps the vision tower (and its merger) frozen, as LLaVA-style VLM training
    does once the vision encoder is pre-trained: at this learning rate the captioning loss would
    otherwise wear away what stage 1 taught it.
    """
    from bvip_helpers.sft import SFTParams, train_sft

    model_dir, out_dir, image_root = resolve(model), resolve(out_dir), resolve(image_root)
    captions_csv = resolve(captions_csv) if captions_csv else image_root / CAPTIONS_FILE
    settings = {"model": str(model_dir), "captions_csv": str(captions_csv), "captions_sha1": file_sha1(captions_csv),
                "max_steps": max_steps, "lr": lr,
                "batch_size": batch_size, "seed": seed, "train_vision": train_vision,
                # a rebuilt twin (new fingerprint) or a new vision stage invalidates the cache
                "twin": _twin_fingerprint(model_dir), "weights": _weights_stamp(model_dir)}
    if _cached(out_dir, settings, force):
        print(f"pretrain: cached base in {out_dir}")
        return out_dir
    data_dir = out_dir.with_name(out_dir.name + "-data")
    files = write_caption_pretrain_files(captions_csv, data_dir)
    params = SFTParams(model=str(model_dir), data_dir=str(data_dir), image_root=str(image_root),
                       output_dir=str(out_dir), method="full", train_vision=train_vision, max_steps=max_steps,
                       lr=lr, batch_size=batch_size, seed=seed, train_file=str(files["train"]),
                       val_file=str(files["val"]), eval=False, merge=False, max_length=max_length,
                       logging_steps=max(1, max_steps // 20), lr_scheduler="cosine",
                       overwrite=True)  # the cache above is stale: replace the earlier stage's model
    result = train_sft(params)
    write_json(out_dir / SETTINGS_FILE, settings)
    print(f"caption pretrain: {result.global_step} steps in {result.train_seconds:.0f}s -> {out_dir}")
    return out_dir


def _weights_stamp(model_dir: Path) -> Any:
    """What the input weights were made with (a re-run vision stage invalidates the caption stage)."""
    stamp = model_dir / SETTINGS_FILE
    return json.loads(stamp.read_text()) if stamp.is_file() else None


# --- Both stages ----------------------------------------------------------------


def build_demo_base(model: str, data_dir: str | os.PathLike[str], image_root: str | os.PathLike[str],
                    models_dir: str | os.PathLike[str], *, vision_steps: int, caption_steps: int,
                    lr: float = 1e-3, vision_lr: float | None = None, batch_size: int = 16, seed: int = 0,
                    image_size: int = twins.DEFAULT_IMAGE_SIZE, copy_paste_rate: float = COPY_PASTE_RATE,
                    column_weight: float = COLUMN_WEIGHT) -> Path:
    """``tiny-<family>`` -> twin (``image_size`` pixels on its longest image side) -> vision pre-training
    -> caption pre-training; returns the base folder.

    Folders under ``models_dir``: ``<model>`` (the random twin), ``<model>-vision`` and ``<model>-base``.
    ``vision_steps=0`` skips stage 1 (the only choice for families other than Qwen2-VL). ``vision_lr``
    (default ``lr``) is stage 1's learning rate, ``lr`` stage 2's; ``copy_paste_rate`` is stage 1's share of
    views with a pasted item (:data:`COPY_PASTE_RATE`), ``column_weight`` its column loss (:data:`COLUMN_WEIGHT`).
    """
    if not model.startswith("tiny-"):
        raise ValueError(f"{model!r} is not a tiny twin; a real checkpoint is its own base model")
    models_dir = resolve(models_dir)
    twin = twins.build_tiny_model(model.removeprefix("tiny-"), models_dir / model, data_dir=data_dir, seed=seed,
                                  image_size=image_size)
    start = twin
    if vision_steps:
        start = pretrain_twin_vision(twin, image_root, models_dir / f"{model}-vision", max_steps=vision_steps,
                                     lr=vision_lr or lr, batch_size=batch_size, seed=seed,
                                     copy_paste_rate=copy_paste_rate, column_weight=column_weight)
    return pretrain_twin_base(start, image_root, models_dir / f"{model}-base", max_steps=caption_steps, lr=lr,
                              batch_size=batch_size, seed=seed, train_vision=not vision_steps)

