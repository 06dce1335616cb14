"""Time ``bvip synth``: n scenes (default 1000) in one process and in one per core, written to a scratch folder.

    python benchmarks/bench_synth.py [--n 1000] [--seed 0]

Prints a small table and writes ``runs/benchmarks/synth.json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from bvip_helpers.demo.synth import generate_dataset, make_scene
from bvip_helpers.io import resolve, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    make_scene(0, args.seed)  # warm-up: imports and first-call caches
    runs = {}
    for label, workers in (("one_process", 1), ("one_per_core", 0)):
        scratch = Path(tempfile.mkdtemp(prefix="bench_synth_"))
        try:
            start = time.perf_counter()
            paths = generate_dataset(scratch, n=args.n, seed=args.seed, show_progress=False, workers=workers)
            runs[label] = time.perf_counter() - start
            size = sum(p.stat().st_size for p in scratch.rglob("*") if p.is_file())
            annotation_rows = sum(1 for _ in open(paths["annotations_csv"], encoding="utf-8")) - 1
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    # drawing alone (no JPEG, no disk): where the time goes
    t0 = time.perf_counter()
    for index in range(100):
        make_scene(index, args.seed)
    draw_ms = (time.perf_counter() - t0) * 10

    result = {
        "n": args.n, "seed": args.seed, "wall_s_one_process": round(runs["one_process"], 2),
        "wall_s_one_per_core": round(runs["one_per_core"], 2),
        "speedup": round(runs["one_process"] / runs["one_per_core"], 2),
        "ms_per_scene": round(1000 * runs["one_process"] / args.n, 2), "draw_only_ms_per_scene": round(draw_ms, 2),
        "output_mb": round(size / 1e6, 2), "annotation_rows": annotation_rows,
        "python": platform.python_version(), "cpu_count": os.cpu_count(),
    }
    print(f"{'metric':<24}{'value':>12}")
    for key, value in result.items():
        print(f"{key:<24}{value!s:>12}")
    target = resolve("runs/benchmarks/synth.json")
    write_json(target, result)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
