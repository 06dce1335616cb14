"""``bvip demo``: the CPU demo's own steps, which a learner with real data and a real model never needs.

::

    bvip demo base                      # remake models/tiny-qwen2-vl-base (make demo-base, ~10 minutes)
    bvip demo copy-paste                # add a pasted copy of each training scene to the SFT records
    bvip demo params 03_sft             # the papermill parameters make demo gives a notebook, as YAML
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bvip_helpers.demo import settings


def configure_cli(parser: argparse.ArgumentParser) -> None:
    steps = parser.add_subparsers(dest="demo_step", required=True, metavar="STEP")
    base = steps.add_parser("base", help="remake the demo's base model from the synthetic scenes (~10 min)")
    base.add_argument("--out", type=Path, default=None,
                      help=f"where the checkpoint goes (default: {settings.base_dir()} in the repository)")
    base.add_argument("--work_dir", type=Path, default=Path("runs/demo-base"),
                      help="the pre-training stages' cached folders (default: runs/demo-base)")
    paste = steps.add_parser("copy-paste", help="SFT records plus a pasted copy of each training scene")
    paste.add_argument("--data_dir", type=Path, default=Path(settings.DATA_DIR),
                       help=f"holds bvpi_chat_train.jsonl (default: {settings.DATA_DIR})")
    paste.add_argument("--image_root", type=Path, default=Path(settings.IMAGE_ROOT),
                       help=f"the synthetic scenes, with synth_scenes.jsonl and the label masks "
                       f"(default: {settings.IMAGE_ROOT}); the pasted images go to its copy_paste/ folder")
    paste.add_argument("--copies", type=int, default=settings.SFT_COPY_PASTE,
                       help=f"pasted copies per training scene (default: {settings.SFT_COPY_PASTE})")
    paste.add_argument("--seed", type=int, default=settings.SEED, help=f"(default: {settings.SEED})")
    params = steps.add_parser("params", help="print the papermill parameters make demo gives a notebook (YAML)")
    params.add_argument("notebook", help="a notebook's name without .ipynb, e.g. 03_sft")
    params.add_argument("--out", type=Path, default=None, help="write the YAML here instead of printing it")


def run_cli(args: argparse.Namespace) -> int:
    from bvip_helpers.io import resolve_cli_path

    if args.demo_step == "base":
        from bvip_helpers.demo.base import build_base

        out = build_base(resolve_cli_path(args.out) if args.out else None, work_dir=resolve_cli_path(args.work_dir))
        print(f"demo base -> {out}")
        return 0
    if args.demo_step == "copy-paste":
        from bvip_helpers.demo.copy_paste import copy_paste_train_file, plot_pasted_examples
        from bvip_helpers.io import save_fig

        data_dir, image_root = resolve_cli_path(args.data_dir), resolve_cli_path(args.image_root)
        for folder, flag in ((data_dir, "--data_dir"), (image_root, "--image_root")):
            if not folder.is_dir():
                print(f"bvip demo copy-paste: {flag} {folder} is not a folder", file=sys.stderr)
                return 2
        train_file = copy_paste_train_file(data_dir, image_root, copies=args.copies, seed=args.seed,
                                           show_progress=False)
        if args.copies > 0:
            print("figure:", save_fig("demo_sft_copy_paste_examples", plot_pasted_examples(image_root, train_file)))
        print(train_file)
        return 0
    import yaml

    text = yaml.safe_dump(settings.notebook_params(args.notebook), sort_keys=False)
    if args.out:
        from bvip_helpers.io import write_text_atomic

        write_text_atomic(resolve_cli_path(args.out), text)
    else:
        print(text, end="")
    return 0
