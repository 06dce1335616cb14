"""Benchmark: vectorised evaluator vs the seed's row-by-row loop on the same 100,000 predictions.

    python benchmarks/bench_evaluate.py [--n 100000] [--seed 0]

Ground truth: random SceneLabels composed with ``schema.compose_caption``; predictions: those
responses perturbed (missing, wrong or dropped fields, dropped or invented objects, case
changes, duplicates, images outside the split). The seed-compatible figures (presence,
accuracy, legacy keyword proxy) of both methods must be identical. Writes
``runs/benchmarks/evaluate.json``.
"""

from __future__ import annotations

import argparse
import platform
import random
import time

import pandas as pd

from bvip_helpers import evaluate as ev
from bvip_helpers import schema
from bvip_helpers.io import resolve, write_json

CONTEXTS = ["A sidewalk is shown with a pedestrian ahead.", "Modern design of the square.", "A scar on the wall.",
            "Cones block the path.", "Quiet street.", ""]
EMPTY_MARKERS = ["not present", "Not present", "NONE", "", None]


def random_scene(rng: random.Random) -> tuple[schema.SceneLabels, dict[str, object]]:
    """Random labels and the raw annotation cells they come from."""
    labels = schema.SceneLabels(rng.choice(schema.FIELD_ENUMS["sidewalk_pos"]), rng.choice(schema.FIELD_ENUMS["road_pos"]))
    cells: dict[str, object] = {}
    for obj in schema.OBJECT_CLASSES:
        for distance, column in (("near", obj.near_column), ("far", obj.far_column)):
            if rng.random() < 0.2:
                where = sorted(rng.choices(schema.OBJECT_POSITIONS, k=rng.randint(1, 3)),
                               key=schema.OBJECT_POSITIONS.index)
                getattr(labels, distance)[obj.name] = where
                cells[column] = "-".join(p.capitalize() for p in where)
            else:
                cells[column] = rng.choice(EMPTY_MARKERS)
    return labels, cells


def build_inputs(n: int, seed: int) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    rng = random.Random(seed)
    rows, predictions = [], []
    for i in range(n):
        labels, cells = random_scene(rng)
        response = schema.compose_caption(labels, rng.choice(CONTEXTS))
        rows.append({"image_path": f"testing/images/{i:06d}.jpg", "image": f"{i:06d}.jpg", "split": "test",
                     "target": rng.choice(CONTEXTS), "sidewalk_pos": labels.sidewalk_pos, "road_pos": labels.road_pos,
                     "road_vs_sidewalk": labels.road_vs_sidewalk, "has_annotation": True, **cells,
                     "response": response})
        roll = rng.random()
        if roll < 0.05:
            continue  # missing prediction
        text = response
        if roll < 0.15:
            text = text.replace(f"Sidewalk: {labels.sidewalk_pos}", f"Sidewalk: {rng.choice(['left', 'right', 'front'])}")
        elif roll < 0.20:
            text = text.replace(f"Road: {labels.road_pos}.", "")
        elif roll < 0.30:
            text = text.split("\n", 1)[1] if rng.random() < 0.5 else text.replace("Nearby: ", "Nearby: a bike close on the left; ")
        elif roll < 0.35:
            text = text.lower()
        elif roll < 0.40:
            text = text.upper().replace("NEARBY", "Nearby")
        predictions.append({"image": f"preds/{i:06d}.jpg", "text": text})
        if rng.random() < 0.02:
            predictions.append({"image": f"{i:06d}.jpg", "response": response})  # duplicate, kept (last)
    predictions += [{"image": f"other_{j}.jpg", "text": "Sidewalk: left."} for j in range(n // 100)]
    return pd.DataFrame(rows), predictions


def seed_rowwise(predictions: list[dict[str, str]], ground_truth: pd.DataFrame, split: str = "test") -> dict:
    """The seed's approach: a dict of predictions, then one Python loop over the ground-truth rows."""
    by_image = {}
    for record in predictions:
        by_image[str(record["image"]).replace("\\", "/").split("/")[-1]] = record.get("text") or record.get("response") or ""
    present = dict.fromkeys(ev.FIELDS, 0)
    correct = dict.fromkeys(ev.FIELDS, 0)
    counts = {column: {"gt_present": 0, "tp": 0, "fn": 0, "fp": 0} for column in ev.LEGACY_KEYWORDS}
    n = 0
    for row in ground_truth[ground_truth["split"] == split].to_dict("records"):
        n += 1
        text = by_image.get(row["image"], "")
        for key, pattern in ev.FIELD_PATTERNS.items():
            match = pattern.search(text)
            if match:
                present[key] += 1
                value = match.group(1).lower()
                correct[key] += (("center" if value == "centre" else value) == row[key])
        low = text.lower()
        for column, keywords in ev.LEGACY_KEYWORDS.items():
            cell = row.get(column)
            gt = not (cell is None or (isinstance(cell, float) and cell != cell)
                      or str(cell).strip().lower() in ev.LEGACY_EMPTY_CELLS)
            said = any(k in low for k in keywords)
            c = counts[column]
            c["gt_present"] += gt
            c["tp"] += gt and said
            c["fn"] += gt and not said
            c["fp"] += said and not gt
    for c in counts.values():
        c["recall"] = c["tp"] / (c["tp"] + c["fn"]) if c["tp"] + c["fn"] else None
        c["precision"] = c["tp"] / (c["tp"] + c["fp"]) if c["tp"] + c["fp"] else None
    return {"presence": {k: present[k] / n for k in ev.FIELDS}, "accuracy": {k: correct[k] / n for k in ev.FIELDS},
            "legacy_objects": counts}


def timed(fn, repeat: int = 3):
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    start = time.perf_counter()
    ground_truth, predictions = build_inputs(args.n, args.seed)
    build_s = time.perf_counter() - start
    loop_s, loop = timed(lambda: seed_rowwise(predictions, ground_truth), args.repeat)
    fast_s, fast = timed(lambda: ev.evaluate_predictions(predictions, ground_truth, "test", structured=False),
                         args.repeat)
    full_s, full = timed(lambda: ev.evaluate_predictions(predictions, ground_truth, "test"), 1)

    for group in ("presence", "accuracy", "legacy_objects"):
        assert fast[group] == loop[group], (group, fast[group], loop[group])
        assert full[group] == loop[group], group

    result = {
        "n_ground_truth": len(ground_truth), "n_predictions": len(predictions), "inputs": fast["inputs"],
        "build_inputs_s": round(build_s, 3),
        "seed_rowwise_s": round(loop_s, 4), "vectorised_seed_figures_s": round(fast_s, 4),
        "speedup_seed_figures": round(loop_s / fast_s, 2),
        "full_report_with_structured_s": round(full_s, 4),
        "identical_seed_figures": True, "repeat": args.repeat, "python": platform.python_version(),
        "pandas": pd.__version__, "machine": platform.machine(),
        "sample_figures": {k: v for k, v in ev.flatten_report(fast).items()
                           if k.startswith(("presence", "accuracy"))},
    }
    print(f"{'method':<42}{'seconds':>10}")
    print(f"{'seed row-by-row loop (seed figures)':<42}{loop_s:>10.3f}")
    print(f"{'vectorised evaluate (seed figures)':<42}{fast_s:>10.3f}")
    print(f"{'vectorised evaluate (full report)':<42}{full_s:>10.3f}")
    print(f"speed-up on the seed figures: {loop_s / fast_s:.1f}x  (n={len(ground_truth)}, "
          f"{len(predictions)} prediction records; identical figures)")
    out = write_json(resolve("runs/benchmarks/evaluate.json"), result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
