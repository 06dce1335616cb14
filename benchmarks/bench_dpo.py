"""DPO benchmark: a DPO step against an SFT step on the same records, and the peak memory of each.

    python benchmarks/bench_dpo.py            # the demo's LoRA settings on the committed base, data/sample

A DPO step runs the policy forward and backward on the chosen *and* the rejected caption of each pair and the
reference forward on both: with the reference about a third of a forward-and-backward, the floor is about
2.7x an SFT step on the chosen captions alone (2x for the two sequences, plus the reference). Both trainers see
the same ``--pairs`` pairs per step; SFT trains on their chosen captions. Each phase runs in its own process, so
its peak RSS is its own. Writes runs/benchmarks/dpo.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from bvip_helpers.io import resolve, write_json

ROOT = resolve("runs/benchmarks/dpo")


class StepClock:
    """A Trainer callback recording the wall time at the end of every step."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Clock(TrainerCallback):
            def __init__(self):
                self.ends: list[float] = []

            def on_step_end(self, args, state, control, **kwargs):
                self.ends.append(time.perf_counter())

        return Clock()


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def prepare(steps: int) -> dict:
    """The sample's records, an SFT adapter with the demo's LoRA layout, and controlled pairs."""
    from bvip_helpers import pairs, sft
    from bvip_helpers.dataset import build_dataset
    from bvip_helpers.demo import settings
    from bvip_helpers.io import read_jsonl

    sample = resolve("data/sample")
    data = ROOT / "data"
    build_dataset(sample / "complete_captions_sensation.csv", sample / "annotations_with_obj_pos.csv", data,
                  image_root=sample, show_progress=False)
    demo = settings.notebook_params("03_sft")
    adapter = ROOT / "sft"
    sft.train_sft(sft.SFTParams(model=demo["model"], data_dir=str(data), image_root=str(sample),
                                output_dir=str(adapter), max_steps=1, batch_size=2, lr=demo["lr"],
                                lora_r=demo["lora_r"], lora_alpha=demo["lora_alpha"],
                                lora_target_modules=demo["lora_targets"],
                                lora_modules_to_save=demo["lora_modules_to_save"], eval=False, merge=False,
                                device="cpu", overwrite=True))
    made, _ = pairs.controlled_pairs(read_jsonl(data / "bvpi_chat_train.jsonl"), seed=0)
    pairs.write_pairs(ROOT / "pairs.jsonl", made)
    return {"data": str(data), "adapter": str(adapter), "pairs": len(made), "model": demo["model"]}


def phase(name: str, setup: dict, batch: int, steps: int, threads: int) -> dict:
    """One trainer for ``steps`` steps of ``batch`` pairs; median step time after two warm-up steps."""
    import torch

    from bvip_helpers import dpo, sft
    from bvip_helpers.demo import settings

    torch.set_num_threads(threads)
    clock = StepClock()
    demo = settings.notebook_params("03_sft")
    if name == "dpo":
        run = dpo.build_dpo_trainer(dpo.DPOParams(
            model=setup["model"], adapter=setup["adapter"], train_pairs=str(ROOT / "pairs.jsonl"),
            image_root=str(resolve("data/sample")), output_dir=str(ROOT / "dpo_run"), max_steps=steps,
            batch_size=batch, lr=1e-5, logging_steps=steps, device="cpu", overwrite=True), callbacks=[clock])
        trainer = run.trainer
    else:  # SFT on the same pairs' chosen captions, the adapter layout of the demo
        from bvip_helpers.io import read_jsonl
        from bvip_helpers.registry import get_spec

        chosen = [{"image": p["image"], "prompt": p["prompt"], "response": p["chosen"]}
                  for p in read_jsonl(ROOT / "pairs.jsonl")]
        params = sft.SFTParams(model=setup["model"], data_dir=setup["data"], image_root=str(resolve("data/sample")),
                               output_dir=str(ROOT / "sft_run"), max_steps=steps, batch_size=batch, lr=1e-5,
                               lora_r=demo["lora_r"], lora_alpha=demo["lora_alpha"],
                               lora_target_modules=demo["lora_targets"],
                               lora_modules_to_save=demo["lora_modules_to_save"], logging_steps=steps,
                               device="cpu", eval=False, merge=False)
        spec = get_spec(setup["model"])
        model, processor = sft.prepare_model(params, spec)
        trainer = sft.build_trainer(params, spec, model, processor, chosen, callbacks=[clock])
    trainer.train()
    intervals = [b - a for a, b in zip(clock.ends, clock.ends[1:], strict=False)][2:]
    return {"phase": name, "steps": steps, "pairs_per_step": batch, "s_per_step": _median(intervals),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8, help="pairs per step (the demo's DPO batch)")
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--phase", choices=("sft", "dpo"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase:  # a child process: one trainer, its own peak memory
        setup = json.loads((ROOT / "setup.json").read_text())
        print(json.dumps(phase(args.phase, setup, args.pairs, args.steps, args.threads)))
        return 0
    write_json(ROOT / "setup.json", prepare(args.steps))
    results = {}
    for name in ("sft", "dpo"):
        out = subprocess.run([sys.executable, __file__, "--phase", name, "--pairs", str(args.pairs), "--steps",
                              str(args.steps), "--threads", str(args.threads)], capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            return 1
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = results["dpo"]["s_per_step"] / results["sft"]["s_per_step"]
    print(f"{args.pairs} pairs per step: SFT {results['sft']['s_per_step']:.3f} s (chosen only), DPO "
          f"{results['dpo']['s_per_step']:.3f} s, ratio {ratio:.2f} (floor about 2.7) | peak RSS SFT "
          f"{results['sft']['peak_rss_mb']:.0f} MB, DPO {results['dpo']['peak_rss_mb']:.0f} MB")
    write_json(resolve("runs/benchmarks/dpo.json"), {**results, "ratio": ratio, "settings": vars(args)})
    return 0


if __name__ == "__main__":
    sys.exit(main())

