"""Export the SFT splits for models that train outside Transformers (InternVL, OpenFlamingo, MobileVLM, Moondream).

Input is the ``bvpi_sft_{train,val,test}.jsonl`` written by ``bvip build-dataset`` (records
``{image, prompt, response, ...}`` with ``image`` relative to ``--image_root``). Every image is
checked first: a path escaping the root stops the export (ImagePathError); missing or
unreadable images are listed and stop it too, unless ``skip_missing`` is set, in which case
they are left out and counted in the report. Every file is written atomically.

Each exporter's docstring gives the command to run in the original repository; the same
commands are collected in ``docs/exporters.md``.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from bvip_helpers.io import (
    ImagePathError,
    atomic_path,
    check_image_root,
    image_size,
    numbered_jsonl,
    resolve,
    safe_image_path,
    write_json,
    write_jsonl,
)

SPLITS = ("train", "val", "test")
SFT_PATTERN = "bvpi_sft_{split}.jsonl"


@dataclass
class ExportReport:
    """What an export wrote, what it left out, and what to run next."""

    format: str
    out_dir: Path
    files: list[Path] = field(default_factory=list)
    written: dict[str, int] = field(default_factory=dict)  # split -> samples
    missing: list[str] = field(default_factory=list)  # "file:line image (reason)"
    command: str = ""

    def summary(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in self.written.items())
        lines = [f"{self.format}: wrote {counts} to {self.out_dir}"]
        if self.missing:
            lines.append(f"left out {len(self.missing)} samples with missing/unreadable images, e.g. {self.missing[0]}")
        lines.append(f"next, in the {self.format} repository:\n{self.command}")
        return "\n".join(lines)


@dataclass
class Sample:
    """One SFT record with its image checked and measured."""

    index: int
    image: str  # relative to the image root, as in the JSONL
    path: Path  # resolved, inside the root
    prompt: str
    response: str
    size: tuple[int, int]  # (width, height)


class MissingImagesError(FileNotFoundError):
    """Images referenced by the SFT JSONL that are missing or unreadable."""


def load_split(sft_dir: str | Path, split: str, image_root: str | Path, *,
               skip_missing: bool = False, missing: list[str] | None = None) -> list[Sample]:
    """Read one SFT split and check every image; see the module docstring for the error policy."""
    path = resolve(sft_dir) / SFT_PATTERN.format(split=split)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run `bvip build-dataset` first or pass --splits")
    root = resolve(image_root)
    samples, problems = [], []
    for line, record in numbered_jsonl(path):
        for key in ("image", "prompt", "response"):
            if not isinstance(record.get(key), str) or not record[key]:
                raise ValueError(f"{path}: line {line} has no {key!r} string; rebuild with `bvip build-dataset`")
        try:
            image_path = safe_image_path(root, record["image"])
        except ImagePathError as err:
            raise ImagePathError(f"{path}: line {line}: {err}") from err
        try:
            size = image_size(image_path)  # reads the header only: cheap, and catches non-images and bombs
        except ImagePathError as err:
            problems.append(f"{path.name}:{line} {record['image']} ({err})")
            continue
        samples.append(Sample(len(samples), record["image"], image_path, record["prompt"], record["response"], size))
    if problems and not skip_missing:
        shown = "\n  ".join(problems[:10])
        raise MissingImagesError(f"{len(problems)} images missing or unreadable under {root}:\n  {shown}\n"
                                 "Fix --image_root, or pass --skip_missing to leave them out (they are counted).")
    if missing is not None:
        missing.extend(problems)
    return samples


def _conversations(sample: Sample) -> list[dict[str, str]]:
    return [{"from": "human", "value": f"<image>\n{sample.prompt}"}, {"from": "gpt", "value": sample.response}]


# --- InternVL -----------------------------------------------------------------

INTERNVL_COMMAND = (
    "cd InternVL/internvl_chat\n"
    "# set --meta_path to {meta} (and --model_name_or_path to ./pretrained/InternVL2-1B) in the script, then:\n"
    "GPUS=1 PER_DEVICE_BATCH_SIZE=2 sh shell/internvl2.0/2nd_finetune/"
    "internvl2_1b_qwen2_0_5b_dynamic_res_2nd_finetune_lora.sh"
)


def export_internvl(splits: dict[str, list[Sample]], out_dir: Path, image_root: Path) -> ExportReport:
    """InternVL chat format: one conversation JSONL per split plus a meta JSON naming the train split.

    Lines are ``{"id", "image", "width", "height", "conversations": [{"from": "human", "value":
    "<image>\\n<prompt>"}, {"from": "gpt", "value": <response>}]}``; the meta file is
    ``{"bvip_train": {"root", "annotation", "data_augment": false, "repeat_time": 1, "length"}}``
    (InternVL docs, "Chat Data Format" and "Fine-tune on a Custom Dataset"). Then run, inside the
    InternVL repository, with ``--meta_path`` pointing at ``bvip_meta.json``::

        cd InternVL/internvl_chat
        GPUS=1 PER_DEVICE_BATCH_SIZE=2 sh shell/internvl2.0/2nd_finetune/internvl2_1b_qwen2_0_5b_dynamic_res_2nd_finetune_lora.sh
    """
    report = ExportReport("internvl", out_dir)
    meta: dict[str, Any] = {}
    for split, samples in splits.items():
        annotation = out_dir / f"bvip_{split}.jsonl"
        write_jsonl(annotation, ({"id": s.index, "image": s.image, "width": s.size[0], "height": s.size[1],
                                  "conversations": _conversations(s)} for s in samples))
        report.files.append(annotation)
        report.written[split] = len(samples)
        if split == "train":
            meta[f"bvip_{split}"] = {"root": f"{image_root}/", "annotation": str(annotation.resolve()),
                                     "data_augment": False, "repeat_time": 1, "length": len(samples)}
    meta_path = out_dir / "bvip_meta.json"
    if meta:
        write_json(meta_path, meta)
        report.files.append(meta_path)
    report.command = INTERNVL_COMMAND.format(meta=meta_path.resolve())
    return report


# --- OpenFlamingo -------------------------------------------------------------

OPENFLAMINGO_COMMAND = (
    "cd open_flamingo\n"
    "torchrun --nnodes=1 --nproc_per_node=1 open_flamingo/train/train.py \\\n"
    "  --lm_path anas-awadalla/mpt-1b-redpajama-200b --tokenizer_path anas-awadalla/mpt-1b-redpajama-200b \\\n"
    "  --cross_attn_every_n_layers 1 --dataset_resampled --workers 1 \\\n"
    "  --laion_shards \"{shards}\" --train_num_samples_laion {n} --batch_size_laion 8 \\\n"
    "  --run_name bvip-openflamingo-3b --num_epochs 1\n"
    "# train.py also loads an interleaved (MMC4) loader in some versions: give it shards or remove that loader"
)


def _jpeg_bytes(path: Path) -> bytes:
    """The image as JPEG bytes: JPEG files are copied as they are, anything else is re-encoded."""
    if path.suffix.lower() in (".jpg", ".jpeg"):
        return path.read_bytes()
    buffer = io.BytesIO()
    with Image.open(path) as img:
        img.convert("RGB").save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0  # reproducible shards
    tar.addfile(info, io.BytesIO(payload))


def export_openflamingo(splits: dict[str, list[Sample]], out_dir: Path, image_root: Path, *,
                        samples_per_shard: int = 1000) -> ExportReport:
    """WebDataset tar shards for OpenFlamingo's image-text (LAION) loader.

    Each sample is three tar members sharing one basename: ``<key>.jpg`` (the image), ``<key>.txt``
    (the target caption; OpenFlamingo adds ``<image>`` and ``<|endofchunk|>`` itself) and
    ``<key>.json`` (prompt, image path, fields). The loader reads ``("jpg;png;jpeg", "txt")``.
    Written with :mod:`tarfile`; the ``webdataset`` package is not needed. Then run::

        torchrun --nnodes=1 --nproc_per_node=1 open_flamingo/train/train.py \\
          --lm_path anas-awadalla/mpt-1b-redpajama-200b --tokenizer_path anas-awadalla/mpt-1b-redpajama-200b \\
          --cross_attn_every_n_layers 1 --dataset_resampled --laion_shards "<out>/train/shard-{000000..N}.tar" \\
          --train_num_samples_laion <n> --batch_size_laion 8 --run_name bvip-openflamingo-3b
    """
    if samples_per_shard < 1:
        raise ValueError("samples_per_shard must be >= 1")
    report = ExportReport("openflamingo", out_dir)
    for split, samples in splits.items():
        shard_dir = out_dir / split
        shard_dir.mkdir(parents=True, exist_ok=True)
        shards = [samples[i:i + samples_per_shard] for i in range(0, len(samples), samples_per_shard)]
        for number, chunk in enumerate(shards):
            target = shard_dir / f"shard-{number:06d}.tar"
            with atomic_path(target) as tmp, tarfile.open(tmp, "w") as tar:
                for s in chunk:
                    key = f"{split}_{s.index:07d}"
                    _add_member(tar, f"{key}.jpg", _jpeg_bytes(s.path))
                    _add_member(tar, f"{key}.txt", s.response.encode("utf-8"))
                    _add_member(tar, f"{key}.json", json.dumps(
                        {"image": s.image, "prompt": s.prompt, "caption": s.response}).encode("utf-8"))
            report.files.append(target)
        report.written[split] = len(samples)
    train_shards = sorted((out_dir / "train").glob("shard-*.tar")) if "train" in splits else []
    pattern = (f"{out_dir.resolve()}/train/shard-{{000000..{len(train_shards) - 1:06d}}}.tar"
               if train_shards else "<no train shards>")
    report.command = OPENFLAMINGO_COMMAND.format(shards=pattern, n=report.written.get("train", 0))
    return report


# --- MobileVLM ----------------------------------------------------------------

MOBILEVLM_COMMAND = (
    "cd MobileVLM\n"
    "deepspeed mobilevlm/train/train_mem.py --deepspeed scripts/deepspeed/zero3.json \\\n"
    "  --model_name_or_path mtgv/MobileVLM_V2-1.7B --version v1 \\\n"
    "  --data_path {data} --image_folder {root} \\\n"
    "  --vision_tower openai/clip-vit-large-patch14-336 --vision_tower_type clip --mm_projector_type ldpnetv2 \\\n"
    "  --mm_vision_select_layer -2 --mm_use_im_start_end False --mm_use_im_patch_token False \\\n"
    "  --image_aspect_ratio pad --bf16 True --output_dir outputs/bvip-mobilevlm --num_train_epochs 1 \\\n"
    "  --per_device_train_batch_size 8 --learning_rate 2e-5 --model_max_length 2048 \\\n"
    "  --gradient_checkpointing True --lazy_preprocess True --report_to none"
)


def export_mobilevlm(splits: dict[str, list[Sample]], out_dir: Path, image_root: Path) -> ExportReport:
    """LLaVA-style JSON list, as MobileVLM's ``train_mem.py --data_path`` reads it.

    ``[{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n<prompt>"},
    {"from": "gpt", "value": <response>}]}]`` with ``image`` relative to ``--image_folder``. Then
    run the "finetune" stage of MobileVLM's ``run.sh`` with ``--data_path``/``--image_folder``
    replaced (the exact command is in the report and in ``docs/exporters.md``).
    """
    report = ExportReport("mobilevlm", out_dir)
    for split, samples in splits.items():
        target = out_dir / f"bvip_{split}.json"
        write_json(target, [{"id": f"{split}_{s.index}", "image": s.image, "conversations": _conversations(s)}
                            for s in samples])
        report.files.append(target)
        report.written[split] = len(samples)
    report.command = MOBILEVLM_COMMAND.format(data=(out_dir / "bvip_train.json").resolve(), root=image_root)
    return report


# --- Moondream ----------------------------------------------------------------

MOONDREAM_QUESTION = "\n\nQuestion: {prompt}\n\nAnswer:"
MOONDREAM_COMMAND = (
    "cd moondream\n"
    "# in moondream/finetune/finetune_text.py set MODEL_PATH, the save path, and replace DocciDataset by a\n"
    "# Dataset over {data} (see docs/exporters.md), then:\n"
    "python -m moondream.finetune.finetune_text"
)


def export_moondream(splits: dict[str, list[Sample]], out_dir: Path, image_root: Path) -> ExportReport:
    """JSONL in the sample shape of Moondream's official ``moondream/finetune/finetune_text.py``.

    That script's dataset yields ``{"image": PIL.Image, "qa": {"question": "\\n\\nQuestion: ...\\n\\nAnswer:",
    "answer": "<text><|endoftext|>"}}`` (vikhyat/moondream, ``moondream/finetune/README.md``).
    Each line here is ``{"image": <path relative to the image root>, "qa": {"question", "answer"}}``;
    the replacement dataset opens the image and appends ``<|endoftext|>`` to the answer, as
    the official one does. Then run ``python -m moondream.finetune.finetune_text``.
    """
    report = ExportReport("moondream", out_dir)
    for split, samples in splits.items():
        target = out_dir / f"bvip_{split}.jsonl"
        write_jsonl(target, ({"image": s.image, "qa": {"question": MOONDREAM_QUESTION.format(prompt=s.prompt),
                                                       "answer": s.response}} for s in samples))
        report.files.append(target)
        report.written[split] = len(samples)
    report.command = MOONDREAM_COMMAND.format(data=(out_dir / "bvip_train.jsonl").resolve())
    return report


EXPORTERS: dict[str, Callable[..., ExportReport]] = {
    "internvl": export_internvl,
    "openflamingo": export_openflamingo,
    "mobilevlm": export_mobilevlm,
    "moondream": export_moondream,
}


def export(fmt: str, sft_dir: str | Path, image_root: str | Path, out_dir: str | Path, *,
           splits: tuple[str, ...] | None = None, skip_missing: bool = False, **options: Any) -> ExportReport:
    """Check the images of every split, then write them in ``fmt`` under ``out_dir``.

    ``splits=None`` exports every split whose JSONL exists (train is required).
    """
    if fmt not in EXPORTERS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORTERS)}")
    sft_dir, root, out = resolve(sft_dir), check_image_root(resolve(image_root)).resolve(), resolve(out_dir)
    if splits is None:
        splits = tuple(s for s in SPLITS if (sft_dir / SFT_PATTERN.format(split=s)).is_file())
        if "train" not in splits:
            raise FileNotFoundError(f"{sft_dir / SFT_PATTERN.format(split='train')} not found; "
                                    "run `bvip build-dataset` first")
    missing: list[str] = []
    loaded = {s: load_split(sft_dir, s, root, skip_missing=skip_missing, missing=missing) for s in splits}
    out.mkdir(parents=True, exist_ok=True)
    report = EXPORTERS[fmt](loaded, out, root, **options)
    report.missing = missing
    return report


# --- CLI --------------------------------------------------------------------


def configure_cli(parser: argparse.ArgumentParser) -> None:
    from bvip_helpers.io import resolve_cli_path

    parser.add_argument("--format", required=True, choices=sorted(EXPORTERS))
    parser.add_argument("--sft_dir", type=resolve_cli_path, required=True, help="folder with bvpi_sft_{train,val,test}.jsonl")
    parser.add_argument("--image_root", type=resolve_cli_path, required=True, help="folder the JSONL image paths are relative to")
    parser.add_argument("--out", type=resolve_cli_path, required=True, help="output folder")
    parser.add_argument("--splits", default=None, help="comma list (default: every split present)")
    parser.add_argument("--skip_missing", action="store_true", help="leave out (and count) missing images")
    parser.add_argument("--samples_per_shard", type=int, default=1000, help="openflamingo only")


def run_cli(args: argparse.Namespace) -> int:
    options = {"samples_per_shard": args.samples_per_shard} if args.format == "openflamingo" else {}
    splits = tuple(s.strip() for s in args.splits.split(",") if s.strip()) if args.splits else None
    try:
        report = export(args.format, args.sft_dir, args.image_root, args.out, splits=splits,
                        skip_missing=args.skip_missing, **options)
    except (FileNotFoundError, ImagePathError, ValueError) as err:
        print(f"bvip export: error: {err}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0
