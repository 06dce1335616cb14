"""The ``bvip`` command line: one subcommand per pipeline stage.

Each stage module defines ``configure_cli(parser)`` and ``run_cli(args) -> int``. Modules are
imported only when their subcommand runs, so ``bvip build-dataset`` never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand -> (module in bvip_helpers, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "build-dataset": ("dataset", "build SFT/DPO JSONL and the merged CSV from the two CSVs"),
    "evaluate": ("evaluate", "score a predictions JSONL: mandatory fields, near objects, baselines"),
    "models": ("registry", "print the model registry"),
    "sft": ("sft", "supervised fine-tuning (LoRA, QLoRA or full)"),
    "batch": ("batch", "run notebooks per model with papermill and write a leaderboard"),
    "export": ("exporters", "export the dataset for InternVL, OpenFlamingo, MobileVLM or Moondream"),
    "predict": ("predict", "batched, resumable caption generation"),
    "pairs": ("pairs", "preference pairs for DPO: seed, controlled single-error negatives, model-ranked"),
    "dpo": ("dpo", "preference tuning (DPO, MPO) from the SFT adapter"),
    "report": ("report", "the error gallery: one self-contained HTML report of where each model fails"),
    # the CPU demo's machinery (bvip_helpers.demo)
    "synth": ("demo.synth", "draw synthetic street scenes and write SENSATION-style CSVs"),
    "tiny-model": ("demo.twins", "build a tiny offline twin of a model family"),
    "demo": ("demo.cli", "the CPU demo's own steps: its base model, copy-paste, notebook parameters"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="bvip", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(f"bvip_helpers.{module_name}")
            module.configure_cli(p)
            p.set_defaults(_run=module.run_cli)
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except OSError as err:  # a full disk or an unwritable folder a stage did not foresee: one line, not a traceback
        from bvip_helpers.io import os_error_line

        print(f"bvip {args.command}: error: {os_error_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
