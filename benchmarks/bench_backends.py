"""Captions per second of the zero-shot backends: ``transformers`` (batch 1, 16) against ``openai`` through
``transformers serve`` on loopback (concurrency 1, 4), and whether their greedy captions are the same.

    python benchmarks/bench_backends.py [--max_new_tokens 96] [--repeats 3] [--threads 1]

The committed tiny base (``models/tiny-qwen2-vl-base``) captions the committed sample's test images with the
BVIP prompt, greedily, under the same ``max_new_tokens``. The local backend runs in this process; the served
one sends requests to ``transformers serve`` (:class:`bvip_helpers.backends.LocalServer`: a free 127.0.0.1
port, the model pinned by its path, offline), started once and stopped by its PID. Both get ``--threads``
torch threads. Each setting is timed ``--repeats`` times into a fresh output file (nothing resumed) and the
fastest counts (the machine is shared: contention only adds time). Writes ``runs/benchmarks/backends.json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max_new_tokens", type=int, default=96, help="about a priority caption's length")
    parser.add_argument("--batch_sizes", default="1,16", help="transformers backend")
    parser.add_argument("--concurrency", default="1,4", help="openai backend: requests in flight")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting; the fastest counts")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, here and in the server")
    parser.add_argument("--splits", default="testing", help="the sample's image folders (all: training,validation,testing)")
    parser.add_argument("--out", default="runs/benchmarks/backends.json")
    args = parser.parse_args(argv)

    import torch

    from bvip_helpers import schema
    from bvip_helpers.backends import LocalServer, OpenAIBackend, TransformersBackend
    from bvip_helpers.io import read_jsonl, resolve, write_json
    from bvip_helpers.predict import load, predict
    from bvip_helpers.registry import TINY_BASE_DIR

    torch.set_num_threads(args.threads)
    root = resolve("data/sample")
    records = [{"image": f"{split}/images/{p.name}", "prompt": schema.DEFAULT_PROMPT}
               for split in args.splits.split(",") for p in sorted((root / split / "images").glob("*.jpg"))]

    def timed(backend, batch_size: int, tmp: Path, tag: str) -> tuple[dict, dict[str, str]]:
        best, texts = None, {}
        for repeat in range(args.repeats):
            out = tmp / f"{tag}_{repeat}.jsonl"
            start = time.perf_counter()
            stats = predict(backend, records, root, out, batch_size=batch_size, max_new_tokens=args.max_new_tokens,
                            progress=False)
            seconds = time.perf_counter() - start
            if stats.failed or stats.generated != len(records):
                raise RuntimeError(f"{tag}: {stats.summary()}")
            if best is None or seconds < best["seconds"]:
                best = {"images": stats.generated, "seconds": round(seconds, 3),
                        "captions_per_second": round(stats.generated / seconds, 2)}
            texts = {line["image"]: line["text"] for line in read_jsonl(out)}
        return best, texts

    rows: list[dict] = []
    outputs: dict[int, dict[str, str]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_backends_") as tmp:
        tmp = Path(tmp)
        local = TransformersBackend(load(TINY_BASE_DIR))
        predict(local, records[:2], root, tmp / "warmup.jsonl", max_new_tokens=args.max_new_tokens, progress=False)
        for batch_size in (int(b) for b in args.batch_sizes.split(",")):
            row, outputs[len(rows)] = timed(local, batch_size, tmp, f"local_b{batch_size}")
            rows.append({"backend": "transformers", "setting": f"batch {batch_size}", **row})
        local.close()
        with LocalServer(TINY_BASE_DIR, threads=args.threads) as server:
            warm = OpenAIBackend(server.model, base_url=server.base_url, concurrency=1)
            predict(warm, records[:2], root, tmp / "warmup_served.jsonl", max_new_tokens=args.max_new_tokens,
                    progress=False)
            for concurrency in (int(c) for c in args.concurrency.split(",")):
                backend = OpenAIBackend(server.model, base_url=server.base_url, concurrency=concurrency)
                row, outputs[len(rows)] = timed(backend, 1, tmp, f"served_c{concurrency}")
                rows.append({"backend": "openai (transformers serve)", "setting": f"concurrency {concurrency}", **row})
    reference = outputs[0]  # the first setting: transformers at the first batch size (1)
    for index, row in enumerate(rows):
        row["vs_first"] = round(row["captions_per_second"] / rows[0]["captions_per_second"], 2)
        row["same_text_as_first"] = sum(outputs[index][k] == reference[k] for k in reference)
    result = {"benchmark": "backends", "model": TINY_BASE_DIR, "images": len(records), "images_from": f"data/sample {args.splits}",
              "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "torch_threads": args.threads,
              "device": "cpu", "python": platform.python_version(), "torch": torch.__version__, "rows": rows,
              "identical_texts": all(row["same_text_as_first"] == len(reference) for row in rows)}
    print(f"{'backend':<28} {'setting':<14} {'seconds':>8} {'capt/s':>7} {'vs first':>8} {'same text':>9}")
    for r in rows:
        print(f"{r['backend']:<28} {r['setting']:<14} {r['seconds']:>8.2f} {r['captions_per_second']:>7.2f} "
              f"{r['vs_first']:>8.2f} {r['same_text_as_first']:>5}/{len(reference)}")
    print(f"identical greedy captions across backends: {result['identical_texts']}")
    print(f"wrote {write_json(resolve(args.out), result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
