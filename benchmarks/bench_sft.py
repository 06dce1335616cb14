"""SFT benchmark: the CPU demo's SFT on data/synthetic, from the committed base, against its targets.

    python benchmarks/bench_sft.py            # defaults = the demo's settings (bvip_helpers/demo/settings.py)

1. the committed base model (models/tiny-qwen2-vl-base; `make demo-base` remakes it) zero-shot on the
   test split (plain captions, mandatory fields missing);
2. LoRA SFT on the BVIP priority captions, with a pasted copy of each training scene added
   (bvip_helpers.demo.copy_paste; timed), then the test split again, greedy and with
   schema-constrained decoding (`bvip predict --constrained`).

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

import torch

from bvip_helpers import families, registry, sft
from bvip_helpers.demo import copy_paste, settings
from bvip_helpers.demo.base import ensure_demo_data
from bvip_helpers.io import read_jsonl, resolve, write_json

TARGETS = {"presence": 1.0, "accuracy": 0.95, "near_recall": 0.90, "near_precision": 0.90, "sft_minutes": 10.0}


def summary(report: dict) -> dict:
    near = report["structured"]["near_objects"]
    return {"presence": report["presence"], "accuracy": report["accuracy"],
            "near_recall": near["recall"], "near_precision": near["precision"],
            "majority_accuracy": report["structured"]["baselines"]["majority"]["accuracy"]}


def step_time_ratio(params: sft.SFTParams, steps: int = 40, warmup: int = 8, repeats: int = 3) -> dict:
    """Trainer seconds per step vs a raw forward+backward on the same batch (same model, same data).

    The Trainer's step is the interval between two ``on_step_end`` calls, so it holds everything the
    Trainer does per step: fetching and collating the batch, forward and backward, clipping, the
    optimizer and scheduler, logging. The collator records every batch it hands the Trainer, and the
    raw pass then runs forward and backward on exactly those batches (``repeats`` times each, the
    median kept): batches differ in padded length, so comparing other batches would add their
    difference to the ratio. The Trainer runs on 4 batches' worth of records, so after ``warmup``
    steps the collator's cache is warm, as it is after the first epoch of a real run (the whole-run
    figure, cold first epoch included, is reported beside it). The ratio is the median over steps.
    The same batches also go through TRL's fused LM-head loss, which the Trainer uses on CUDA
    (``sft.use_fused_lm_head``): its forward+backward time is reported beside the raw one.
    """
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    spec = registry.get_spec(params.model)
    model, processor = sft.prepare_model(params, spec)
    records = sft.load_split(params, "train")[: 4 * params.batch_size]
    probe = sft.SFTParams(**{**params.__dict__, "output_dir": str(resolve("runs/benchmarks/sft_step_probe")),
                             "max_steps": steps, "save_steps": 0, "logging_steps": params.logging_steps})
    clock = StepClock()
    trainer = sft.build_trainer(probe, spec, model, processor, records, callbacks=[clock])
    collate, batches = trainer.data_collator, []

    def recording_collator(examples):
        batches.append(collate(examples))
        return batches[-1]

    trainer.data_collator = recording_collator
    trainer.train()
    if len(batches) < steps or len(clock.ends) != steps:
        raise RuntimeError(f"step probe: {len(batches)} batches and {len(clock.ends)} steps, expected {steps}")
    model.train()

    def median(values: list[float]) -> float:  # the upper median: a measured value, never an average of two
        return sorted(values)[len(values) // 2]

    def fwd_bwd_seconds(batch: dict, **loss_kwargs) -> float:
        timings = []
        for _ in range(repeats):
            begin = time.perf_counter()
            model(**batch, **loss_kwargs).loss.backward()
            timings.append(time.perf_counter() - begin)
            model.zero_grad(set_to_none=True)
        return median(timings)

    trainer_steps, raw_steps, fused_steps = [], [], []
    for step in range(warmup + 1, steps):  # the interval ending at step `step` trained on batches[step]
        batch = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in batches[step].items()}
        trainer_steps.append(clock.ends[step] - clock.ends[step - 1])
        raw_steps.append(fwd_bwd_seconds(batch))
        # TRL's fused LM-head loss on the same batch (SFTTrainer patched it in, whichever loss trained)
        fused_steps.append(fwd_bwd_seconds(batch, fused_lm_head=True))
    ratios = sorted(t / r for t, r in zip(trainer_steps, raw_steps, strict=True))
    return {"trainer_s_per_step": median(trainer_steps), "raw_fwd_bwd_s": median(raw_steps),
            "ratio": median(ratios), "steps_compared": len(ratios),
            "ratio_quartiles": [ratios[len(ratios) // 4], ratios[3 * len(ratios) // 4]],
            "fused_lm_head": sft.use_fused_lm_head(params), "trl_fused_fwd_bwd_s": median(fused_steps)}


def main(argv: list[str] | None = None) -> int:
    demo = settings.notebook_params("03_sft")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=settings.base_dir(), help="the base model (default: the committed one)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sft_steps", type=int, default=demo["max_steps"])
    parser.add_argument("--lr", type=float, default=demo["lr"])
    parser.add_argument("--lora_r", type=int, default=demo["lora_r"])
    parser.add_argument("--batch_size", type=int, default=demo["batch_size"])
    parser.add_argument("--lora_target_modules", default=demo["lora_targets"],
                        help="PEFT regex; default: the language model and the merger (the demo's)")
    parser.add_argument("--lora_modules_to_save", default=demo["lora_modules_to_save"],
                        help="modules trained in full beside LoRA; default: the twin's output layer (the demo's)")
    parser.add_argument("--sft_copy_paste", type=int, default=settings.SFT_COPY_PASTE,
                        help="pasted copies of each training scene added to the SFT records (copy_paste; 0: none)")
    parser.add_argument("--num_workers", type=int, default=0,
                        help="dataloader workers: collate the next batch while this one trains")
    parser.add_argument("--test_limit", type=int, default=0, help="0: the whole test split")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    image_root, data_dir = ensure_demo_data()
    base = resolve(args.base)
    truth = sft.ground_truth(image_root)
    test = [{"image": r["image"], "prompt": families.record_prompt(r)}
            for r in read_jsonl(data_dir / "bvpi_chat_test.jsonl")]
    test = test[: args.test_limit] if args.test_limit else test
    out = resolve("runs/benchmarks/sft_run")

    model, processor, spec = sft.load_trained(str(base))
    _, zero_shot = sft.predict_and_evaluate(model, processor, spec, test, image_root, "test", truth,
                                            out.parent / "sft_zero_shot_test.jsonl")
    train_file = copy_paste.copy_paste_train_file(data_dir, image_root, copies=args.sft_copy_paste,
                                                  seed=settings.SEED, show_progress=False)
    params = sft.SFTParams(model=str(base), data_dir=str(data_dir), image_root=str(image_root), output_dir=str(out),
                           train_file=str(train_file), example_cache_gb=demo["example_cache_gb"],
                           method="lora", lora_r=args.lora_r, lora_alpha=demo["lora_alpha"],
                           lora_target_modules=args.lora_target_modules,
                           lora_modules_to_save=args.lora_modules_to_save, num_workers=args.num_workers, max_steps=args.sft_steps,
                           lr=args.lr, batch_size=args.batch_size, seed=settings.SEED, logging_steps=20,
                           lr_scheduler="cosine", warmup=0.05, eval=True, eval_limit=32,
                           overwrite=True)  # each benchmark run trains again
    result = sft.train_sft(params)
    model, processor, spec = sft.load_trained(str(base), adapter=out)
    _, tuned = sft.predict_and_evaluate(model, processor, spec, test, image_root, "test", truth,
                                        out / "preds_test.jsonl")
    _, tuned_constrained = sft.predict_and_evaluate(model, processor, spec, test, image_root, "test", truth,
                                                    out / "preds_test_constrained.jsonl", constrained=True)
    ratio = step_time_ratio(params)
    ratio["whole_run_s_per_step"] = result.train_seconds / max(result.global_step, 1)
    ratio["whole_run_ratio"] = ratio["whole_run_s_per_step"] / ratio["raw_fwd_bwd_s"]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    after, before, constrained = summary(tuned), summary(zero_shot), summary(tuned_constrained)

    def meets(run: dict) -> dict:
        return {
            "presence": all(v >= TARGETS["presence"] for v in run["presence"].values()),
            "sidewalk_accuracy": run["accuracy"]["sidewalk_pos"] >= TARGETS["accuracy"],
            "road_accuracy": run["accuracy"]["road_pos"] >= TARGETS["accuracy"],
            "near_recall": (run["near_recall"] or 0) >= TARGETS["near_recall"],
            "near_precision": (run["near_precision"] or 0) >= TARGETS["near_precision"],
        }

    timing = {"sft_minutes": result.train_seconds / 60 <= TARGETS["sft_minutes"],
              "step_time_ratio": ratio["ratio"] <= 1.2}
    checks = {**meets(after), **timing}
    checks_constrained = {**meets(constrained), **timing}
    rows = [("", "zero-shot", "SFT", "SFT+constr.", "majority")]
    for key in ("sidewalk_pos", "road_pos", "road_vs_sidewalk"):
        rows.append((f"presence {key}", *(f"{r['presence'][key]:.3f}" for r in (before, after, constrained)), ""))
        rows.append((f"accuracy {key}", *(f"{r['accuracy'][key]:.3f}" for r in (before, after, constrained)),
                     f"{after['majority_accuracy'][key]:.3f}"))
    for key in ("near_recall", "near_precision"):
        rows.append((key, *(f"{r[key] or 0:.3f}" for r in (before, after, constrained)), ""))
    print("\n".join(f"{a:28s} {b:>10s} {c:>10s} {d:>11s} {e:>10s}" for a, b, c, d, e in rows))
    print(f"base {base} | SFT {result.global_step} steps in "
          f"{result.train_seconds:.0f}s, {result.samples_per_second:.2f} samples/s | peak RSS {peak_mb:.0f} MB | "
          f"trainer/raw step {ratio['ratio']:.2f} ({ratio['trainer_s_per_step']:.3f}s vs {ratio['raw_fwd_bwd_s']:.3f}s; "
          f"whole run incl. cold first epoch {ratio['whole_run_ratio']:.2f}) | TRL's fused LM-head loss on the same "
          f"batches {ratio['trl_fused_fwd_bwd_s']:.3f}s per forward+backward")
    print("targets, greedy: " + ", ".join(f"{k} {'OK' if v else 'MISSED'}" for k, v in checks.items()))
    print("targets, constrained: " + ", ".join(f"{k} {'OK' if v else 'MISSED'}" for k, v in checks_constrained.items()))
    write_json(resolve("runs/benchmarks/sft.json"), {
        "settings": vars(args), "zero_shot_test": before, "sft_test": after, "sft_constrained_test": constrained,
        "targets": TARGETS, "checks": checks, "checks_constrained": checks_constrained,
        "base": str(base), "sft_seconds": result.train_seconds, "sft_steps": result.global_step,
        "samples_per_second": result.samples_per_second, "peak_rss_mb": peak_mb, "step_time": ratio,
        "token_budget": result.token_budget, "n_test": len(test),
    })
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
