"""SFT benchmark: the CPU demo end to end on data/synthetic (1000 scenes), against its targets.

    python benchmarks/bench_sft.py            # defaults = the notebook 03 CPU demo settings

1. tiny-qwen2-vl twin -> pre-trained as a generic captioner on the original captions (cached);
2. zero-shot on the test split (plain captions, mandatory fields missing);
3. LoRA SFT on the BVIP priority captions (timed), then the test split again.

Targets (test split): presence 1.000; Sidewalk and Road accuracy >= 0.95 (majority baseline shown);
structured near-object recall and precision >= 0.90; SFT within 10 minutes on 2 CPU cores.
Also: samples/s, peak memory, and the Trainer's step time over a raw forward+backward on the same batch.
Writes runs/benchmarks/sft.json.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

from bvip_helpers import families, registry, sft, twins
from bvip_helpers.io import read_jsonl, resolve, write_json

TARGETS = {"presence": 1.0, "accuracy": 0.95, "near_recall": 0.90, "near_precision": 0.90, "sft_minutes": 10.0}


def ensure_data(n: int, seed: int) -> tuple[Path, Path]:
    """data/synthetic (n scenes) and data/bvpi_out, built when missing."""
    image_root, data_dir = resolve("data/synthetic"), resolve("data/bvpi_out")
    if not (image_root / sft.CAPTIONS_CSV).is_file():
        from bvip_helpers.synth import generate_dataset

        generate_dataset(image_root, n=n, seed=seed, show_progress=False)
    if not (data_dir / "bvpi_chat_train.jsonl").is_file():
        from bvip_helpers.dataset import build_dataset

        build_dataset(image_root / sft.CAPTIONS_CSV, image_root / sft.ANNOTATIONS_CSV, data_dir,
                      image_root=image_root, show_progress=False)
    return image_root, data_dir


def summary(report: dict) -> dict:
    near = report["structured"]["near_objects"]
    return {"presence": report["presence"], "accuracy": report["accuracy"],
            "near_recall": near["recall"], "near_precision": near["precision"],
            "majority_accuracy": report["structured"]["baselines"]["majority"]["accuracy"]}


def step_time_ratio(params: sft.SFTParams, steps: int = 8) -> dict:
    """Trainer seconds per step vs a raw forward+backward on the same batch (same model, same data)."""
    spec = registry.get_spec(params.model)
    model, processor = sft.prepare_model(params, spec)
    records = sft.load_split(params, "train")
    probe = sft.SFTParams(**{**params.__dict__, "output_dir": str(resolve("runs/benchmarks/sft_step_probe")),
                             "max_steps": steps, "save_steps": 0, "logging_steps": steps})
    trainer = sft.build_trainer(probe, spec, model, processor, records)
    trainer.train()
    history = [e for e in trainer.state.log_history if "train_runtime" in e][-1]
    trainer_step = history["train_runtime"] / steps
    batch = families.collate_train(processor, spec, records[: params.batch_size], resolve(params.image_root),
                                   params.max_length)
    model.train()
    raw = []
    for _ in range(steps):
        start = time.perf_counter()
        model(**batch).loss.backward()
        raw.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    raw_step = sorted(raw)[len(raw) // 2]
    return {"trainer_s_per_step": trainer_step, "raw_fwd_bwd_s": raw_step, "ratio": trainer_step / raw_step}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pretrain_steps", type=int, default=sft.DEMO["pretrain_steps"])
    parser.add_argument("--pretrain_lr", type=float, default=sft.DEMO["pretrain_lr"])
    parser.add_argument("--sft_steps", type=int, default=sft.DEMO["sft_steps"])
    parser.add_argument("--lr", type=float, default=sft.DEMO["lr"])
    parser.add_argument("--lora_r", type=int, default=sft.DEMO["lora_r"])
    parser.add_argument("--batch_size", type=int, default=sft.DEMO["batch_size"])
    parser.add_argument("--lora_target_modules", default=sft.DEMO["lora_target_modules"],
                        help="PEFT regex; default: language model + vision tower of the twin")
    parser.add_argument("--num_workers", type=int, default=sft.DEMO["num_workers"],
                        help="dataloader workers: collate the next batch while this one trains")
    parser.add_argument("--test_limit", type=int, default=0, help="0: the whole test split")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    image_root, data_dir = ensure_data(args.n, args.seed)
    twin = twins.build_tiny_model("qwen2-vl", resolve("runs/models/tiny-qwen2-vl"), data_dir=data_dir, seed=args.seed)
    start = time.perf_counter()
    base = sft.pretrain_twin_base(str(twin), image_root, resolve("runs/models/tiny-qwen2-vl-base"),
                                  max_steps=args.pretrain_steps, lr=args.pretrain_lr, batch_size=args.batch_size,
                                  seed=args.seed)
    pretrain_seconds = time.perf_counter() - start
    truth = sft.ground_truth(image_root)
    test = [{"image": r["image"], "prompt": families.record_prompt(r)}
            for r in read_jsonl(data_dir / "bvpi_chat_test.jsonl")]
    test = test[: args.test_limit] if args.test_limit else test
    out = resolve("runs/benchmarks/sft_run")

    model, processor, spec = sft.load_trained(str(base))
    _, zero_shot = sft.predict_and_evaluate(model, processor, spec, test, image_root, "test", truth,
                                            out.parent / "sft_zero_shot_test.jsonl")
    params = sft.SFTParams(model=str(base), data_dir=str(data_dir), image_root=str(image_root), output_dir=str(out),
                           method="lora", lora_r=args.lora_r, lora_alpha=args.lora_r,
                           lora_target_modules=args.lora_target_modules, num_workers=args.num_workers, max_steps=args.sft_steps,
                           lr=args.lr, batch_size=args.batch_size, seed=args.seed, logging_steps=20,
                           lr_scheduler="cosine", warmup=0.05, eval=True, eval_limit=32, figure_name="bench_sft_loss")
    result = sft.train_sft(params)
    model, processor, spec = sft.load_trained(str(base), adapter=out)
    _, tuned = sft.predict_and_evaluate(model, processor, spec, test, image_root, "test", truth,
                                        out / "preds_test.jsonl")
    ratio = step_time_ratio(params)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    after, before = summary(tuned), summary(zero_shot)
    checks = {
        "presence": all(v >= TARGETS["presence"] for v in after["presence"].values()),
        "sidewalk_accuracy": after["accuracy"]["sidewalk_pos"] >= TARGETS["accuracy"],
        "road_accuracy": after["accuracy"]["road_pos"] >= TARGETS["accuracy"],
        "near_recall": (after["near_recall"] or 0) >= TARGETS["near_recall"],
        "near_precision": (after["near_precision"] or 0) >= TARGETS["near_precision"],
        "sft_minutes": result.train_seconds / 60 <= TARGETS["sft_minutes"],
        "step_time_ratio": ratio["ratio"] <= 1.2,
    }
    rows = [("", "zero-shot", "SFT", "majority")]
    for key in ("sidewalk_pos", "road_pos", "road_vs_sidewalk"):
        rows.append((f"presence {key}", f"{before['presence'][key]:.3f}", f"{after['presence'][key]:.3f}", ""))
        rows.append((f"accuracy {key}", f"{before['accuracy'][key]:.3f}", f"{after['accuracy'][key]:.3f}",
                     f"{after['majority_accuracy'][key]:.3f}"))
    for key in ("near_recall", "near_precision"):
        rows.append((key, f"{before[key] or 0:.3f}", f"{after[key] or 0:.3f}", ""))
    print("\n".join(f"{a:28s} {b:>10s} {c:>10s} {d:>10s}" for a, b, c, d in rows))
    print(f"pretrain {pretrain_seconds:.0f}s (cached when ~0) | SFT {result.global_step} steps in "
          f"{result.train_seconds:.0f}s, {result.samples_per_second:.2f} samples/s | peak RSS {peak_mb:.0f} MB | "
          f"trainer/raw step {ratio['ratio']:.2f} ({ratio['trainer_s_per_step']:.3f}s vs {ratio['raw_fwd_bwd_s']:.3f}s)")
    print("targets: " + ", ".join(f"{k} {'OK' if v else 'MISSED'}" for k, v in checks.items()))
    write_json(resolve("runs/benchmarks/sft.json"), {
        "settings": vars(args), "zero_shot_test": before, "sft_test": after, "targets": TARGETS, "checks": checks,
        "pretrain_seconds": pretrain_seconds, "sft_seconds": result.train_seconds, "sft_steps": result.global_step,
        "samples_per_second": result.samples_per_second, "peak_rss_mb": peak_mb, "step_time": ratio,
        "token_budget": result.token_budget, "n_test": len(test),
    })
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
