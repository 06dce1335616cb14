"""Benchmark: vectorised ``build_dataset`` against a seed-style row loop, on ~323,000 caption rows.

Data: the SENSATION reference CSVs replicated 100x (each replica's basenames made unique); without
them, ``bvip_helpers.demo.synth.generate_dataset`` if it exists, else generated CSVs. The baseline is the
way the seed's ``create_bvip_dataset.py`` works: ``iterrows`` over captions, a dict lookup of the
annotation, per-row caption building and ``json.dumps`` per record (it uses the schema functions so
its captions are comparable). Both must produce identical SFT responses.

    python benchmarks/bench_build_dataset.py [--replicas 100]

Prints a table and writes ``runs/benchmarks/build_dataset.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import pandas as pd

from bvip_helpers import schema
from bvip_helpers.dataset import OBJECT_COLUMNS, SPLITS, build_dataset, load_ground_truth
from bvip_helpers.io import read_jsonl, repo_root, write_json


def reference_dir() -> Path:
    return Path(os.environ.get("BVIP_REFERENCE_DIR") or repo_root().parent / "shared/reference/sensation")


def replicate(captions_csv: Path, annotations_csv: Path, out: Path, replicas: int) -> tuple[Path, Path]:
    """``replicas`` copies of both CSVs, basenames prefixed ``r<k>_`` so every replica joins to its own rows."""
    captions = pd.read_csv(captions_csv, dtype=str, keep_default_na=False)
    annotations = pd.read_csv(annotations_csv, dtype=str, keep_default_na=False)
    parts = captions["image_path"].str.rpartition("/")
    cap_parts, ann_parts = [], []
    for k in range(replicas):
        cap_parts.append(captions.assign(image_path=parts[0] + parts[1] + f"r{k}_" + parts[2]))
        ann_parts.append(annotations.assign(image=f"r{k}_" + annotations["image"]))
    cap_csv, ann_csv = out / "captions.csv", out / "annotations.csv"
    pd.concat(cap_parts).to_csv(cap_csv, index=False)
    pd.concat(ann_parts).to_csv(ann_csv, index=False)
    return cap_csv, ann_csv


def benchmark_inputs(out: Path, replicas: int) -> tuple[Path, Path, str]:
    """Reference CSVs x replicas; else synthetic scenes (``bvip_helpers.demo.synth``) or generated CSVs, replicated."""
    src = reference_dir()
    if (src / "complete_captions_sensation.csv").is_file():
        cap, ann = src / "complete_captions_sensation.csv", src / "annotations_with_obj_pos.csv"
        return (*replicate(cap, ann, out, replicas), f"SENSATION reference CSVs x{replicas}")
    print(f"reference CSVs not found in {src}")
    try:
        from bvip_helpers.demo.synth import generate_dataset
    except ImportError:
        generate_dataset = None
    if generate_dataset is not None:
        paths = generate_dataset(out / "synth", n=500, seed=0, show_progress=False)
        return (*replicate(paths["captions_csv"], paths["annotations_csv"], out, replicas * 3231 // 500),
                f"synthetic scenes (500) x{replicas * 3231 // 500}")
    cap, ann = generated_csvs(out / "generated", 3231)
    return (*replicate(cap, ann, out, replicas), f"generated CSVs (3231 rows) x{replicas}")


def generated_csvs(out: Path, rows: int) -> tuple[Path, Path]:
    """Random SENSATION-style CSVs, used when neither the reference data nor the synth module exist."""
    rng = random.Random(0)
    cells = ["not present", "Left", "Right", "Center", "Left-Right", "Center-Center", "Right-Right-Left"]
    captions, annotations = [], []
    for i in range(rows):
        split = rng.choices(SPLITS, weights=(8, 1, 1))[0]
        captions.append({"image_path": f"{split}/images/{i:07d}.jpg", "split": split,
                         "target": f"The sidewalk is {rng.choice(['centered', 'on the left'])}. Scene {i}."})
        annotations.append({"image": f"{i:07d}.jpg", "status": "done",
                            "sidewalk_pos": rng.choice(["Left", "Center", "Right", "Outside"]),
                            "road_pos": rng.choice(["Left", "Right", "Front", "Not present"]),
                            **{c: rng.choices(cells, weights=(20, 3, 3, 3, 1, 1, 1))[0] for c in OBJECT_COLUMNS}})
    out.mkdir(parents=True, exist_ok=True)
    cap_csv, ann_csv = out / "captions.csv", out / "annotations.csv"
    pd.DataFrame(captions).to_csv(cap_csv, index=False)
    pd.DataFrame(annotations).to_csv(ann_csv, index=False)
    return cap_csv, ann_csv


def seed_style_build(captions_csv: Path, annotations_csv: Path, out_dir: Path, prompt: str) -> dict[str, int]:
    """The seed's approach: row loop, dict lookup, per-row strings, json.dumps per record."""
    captions = pd.read_csv(captions_csv)
    annotations = pd.read_csv(annotations_csv)
    by_image = {}
    for _, ann in annotations.iterrows():
        by_image.setdefault(os.path.basename(str(ann["image"])), ann)
    out_dir.mkdir(parents=True, exist_ok=True)
    sft = {s: [] for s in SPLITS}
    dpo = {s: [] for s in ("train", "val")}
    merged = []
    for _, row in captions.iterrows():
        ann = by_image.get(os.path.basename(row["image_path"]))
        sidewalk = schema.normalize_position(None if ann is None else ann["sidewalk_pos"], schema.SIDEWALK_VALUES)
        road = schema.normalize_position(None if ann is None else ann["road_pos"], schema.ROAD_VALUES)
        labels = schema.SceneLabels(sidewalk_pos=sidewalk, road_pos=road)
        for obj in schema.OBJECT_CLASSES:
            for column, target in ((obj.near_column, labels.near), (obj.far_column, labels.far)):
                positions = schema.parse_object_cell(None if ann is None else ann[column])[0]
                if positions:
                    target[obj.name] = positions
        context = "" if pd.isna(row["target"]) else str(row["target"]).strip()
        response = schema.compose_caption(labels, context)
        fields = {"sidewalk_pos": sidewalk, "road_pos": road, "road_vs_sidewalk": labels.road_vs_sidewalk}
        sft[row["split"]].append({"image": row["image_path"], "prompt": prompt, "response": response, **fields})
        if row["split"] in dpo and context and context != response:
            dpo[row["split"]].append({"image": row["image_path"], "prompt": prompt, "chosen": response,
                                      "rejected": context, **fields})
        merged.append({"image_path": row["image_path"], "split": row["split"], "target": row["target"],
                       **fields, "response": response})
    for name, groups in (("sft", sft), ("dpo", dpo)):
        for split, records in groups.items():
            with open(out_dir / f"bvpi_{name}_{split}.jsonl", "w", encoding="utf-8") as fh:
                for record in records:
                    fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    pd.DataFrame(merged).to_csv(out_dir / "merged_captions_with_positions.csv", index=False)
    return {s: len(r) for s, r in sft.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_build_") as tmp:
        tmp = Path(tmp)
        cap_csv, ann_csv, data = benchmark_inputs(tmp, args.replicas)
        n_rows = sum(1 for _ in open(cap_csv, encoding="utf-8")) - 1

        started = time.perf_counter()
        load_ground_truth(cap_csv, ann_csv)
        ground_truth_s = time.perf_counter() - started
        started = time.perf_counter()
        report = build_dataset(cap_csv, ann_csv, tmp / "ours", show_progress=False)
        ours_s = time.perf_counter() - started
        started = time.perf_counter()
        seed_style_build(cap_csv, ann_csv, tmp / "baseline", schema.DEFAULT_PROMPT)
        baseline_s = time.perf_counter() - started

        identical = all(
            [r["response"] for r in read_jsonl(tmp / "ours" / f"bvpi_sft_{s}.jsonl")]
            == [r["response"] for r in read_jsonl(tmp / "baseline" / f"bvpi_sft_{s}.jsonl")]
            for s in SPLITS)
    result = {
        "data": data, "caption_rows": n_rows, "sft_rows": report.sft_counts, "dpo_rows": report.dpo_counts,
        "baseline_s": round(baseline_s, 3), "ours_s": round(ours_s, 3),
        "load_ground_truth_s": round(ground_truth_s, 3), "speedup": round(baseline_s / ours_s, 2),
        "identical_sft_responses": identical,
        "note": "ours also writes the chat JSONL, contradiction/omission CSVs and build_report.json",
    }
    print(f"data: {data}, {n_rows} caption rows")
    print(f"{'variant':<32}{'seconds':>10}")
    print(f"{'seed-style row loop':<32}{baseline_s:>10.2f}")
    print(f"{'build_dataset (vectorised)':<32}{ours_s:>10.2f}")
    print(f"{'load_ground_truth only':<32}{ground_truth_s:>10.2f}")
    print(f"speedup: {result['speedup']}x; identical SFT responses: {identical}")
    out = write_json(repo_root() / "runs/benchmarks/build_dataset.json", result)
    print(f"wrote {out}")
    if not identical:
        raise SystemExit("SFT responses differ between the baseline and build_dataset")


if __name__ == "__main__":
    main()
