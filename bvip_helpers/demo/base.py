"""The CPU demo's base model, ``models/tiny-qwen2-vl-base``: made once and committed, like a downloaded checkpoint.

A learner with a GPU starts SFT from a published checkpoint; the CPU demo starts from this one. It is
the random ``tiny-qwen2-vl`` twin after two pre-training stages on the synthetic training scenes
(:mod:`bvip_helpers.demo.pretrain`): a vision tower that can see the objects, then a language model
that writes the *original* captions. Like a real base model it captions, but never in the BVIP format.

``bvip demo base`` (``make demo-base``) makes it again: it draws the scenes and builds the dataset if
they are missing (:func:`ensure_demo_data`), runs both stages under ``runs/demo-base/`` (cached, so a
rerun with the same settings is quick), and copies the model files plus ``base_record.json`` (the
settings, the commit, the data hashes and the vision check) into ``models/tiny-qwen2-vl-base``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from bvip_helpers.demo import settings
from bvip_helpers.io import ANNOTATIONS_FILE, CAPTIONS_FILE, atomic_dir, file_sha1, repo_root, resolve, write_json

RECORD_FILE = "base_record.json"
#: What a checkpoint needs to load and generate: weights, configs, tokenizer, processor, chat template.
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "processor_config.json", "chat_template.jinja", "twin_meta.json")


def ensure_demo_data(n: int = settings.SCENES, seed: int = settings.SEED) -> tuple[Path, Path]:
    """``data/synthetic`` (``n`` scenes with label masks) and ``data/bvpi_out``, (re)built when missing or stale."""
    from bvip_helpers.demo.synth import SCENES_FILE

    image_root, data_dir = resolve(settings.IMAGE_ROOT), resolve(settings.DATA_DIR)
    captions, scenes = image_root / CAPTIONS_FILE, image_root / SCENES_FILE
    stale = (not captions.is_file() or sum(1 for _ in captions.open(encoding="utf-8")) - 1 != n
             or not scenes.is_file() or '"mask_path": "' not in scenes.read_text(encoding="utf-8"))
    if stale:
        from bvip_helpers.demo.synth import generate_dataset

        generate_dataset(image_root, n=n, seed=seed, show_progress=False)
    if stale or not (data_dir / "bvpi_chat_train.jsonl").is_file():
        from bvip_helpers.dataset import build_dataset

        build_dataset(image_root / CAPTIONS_FILE, image_root / ANNOTATIONS_FILE, data_dir,
                      image_root=image_root, show_progress=False)
    return image_root, data_dir


def _commit() -> str:
    """The commit the code ran from, with ``-dirty`` when tracked files had uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_root(), capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo_root(),
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + ("-dirty" if dirty else "")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def publish_base(built: Path, out_dir: str | Path, record: dict[str, Any]) -> Path:
    """Copy the checkpoint files of ``built`` into ``out_dir`` (atomically), with ``record`` as ``base_record.json``."""
    missing = [name for name in MODEL_FILES if not (built / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{built}: not a complete base model, missing {', '.join(missing)}")
    out_dir = resolve(out_dir)
    with atomic_dir(out_dir) as staging:
        for name in MODEL_FILES:
            shutil.copyfile(built / name, staging / name)
        record = {**record, "sha256": {name: sha256(staging / name) for name in MODEL_FILES}}
        write_json(staging / RECORD_FILE, record)
    for path in [out_dir, *out_dir.iterdir()]:  # staging folders are private (0700); a checkpoint is not
        path.chmod(0o755 if path.is_dir() else 0o644)
    return out_dir


def build_base(out_dir: str | Path | None = None, work_dir: str | Path = "runs/demo-base") -> Path:
    """Make the demo's base model with :data:`settings.BASE` and publish it to ``out_dir`` (default: the registry's)."""
    import torch

    from bvip_helpers.demo.pretrain import build_demo_base
    from bvip_helpers.demo.synth import SCENES_FILE

    base = settings.BASE
    torch.set_num_threads(base["threads"])
    image_root, data_dir = ensure_demo_data()
    start = time.perf_counter()
    twin = f"tiny-{base['family']}"
    built = build_demo_base(twin, data_dir, image_root, resolve(work_dir), vision_steps=base["vision_steps"],
                            caption_steps=base["caption_steps"], lr=base["caption_lr"], vision_lr=base["vision_lr"],
                            batch_size=base["batch_size"], seed=settings.SEED, image_size=base["image_size"],
                            copy_paste_rate=base["copy_paste_rate"], column_weight=base["column_weight"])
    vision_report = resolve(work_dir) / f"{twin}-vision" / "vision_pretrain.json"
    record = {
        "made_by": "bvip demo base (bvip_helpers/demo/base.py)", "commit": _commit(),
        "made_on": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "seconds": round(time.perf_counter() - start),
        "settings": {**base, "scenes": settings.SCENES, "seed": settings.SEED},
        "data_sha1": {"captions_csv": file_sha1(image_root / CAPTIONS_FILE),
                      "scenes_jsonl": file_sha1(image_root / SCENES_FILE),
                      "train_jsonl": file_sha1(data_dir / "bvpi_chat_train.jsonl")},
        "vision_check_val": (json.loads(vision_report.read_text(encoding="utf-8")).get("val")
                             if vision_report.is_file() else None),
    }
    return publish_base(built, out_dir or settings.base_dir(), record)
