"""The CPU demo's settings, in one place: the data it draws, how its base model was made, and the
parameters ``make demo`` hands the notebooks (whose own defaults suit a real 1-3B checkpoint).

Every value was chosen on the val split of the synthetic scenes; ``docs/demo.md`` keeps the measured
history behind each choice. ``bvip demo params <notebook>`` prints a notebook's parameters as YAML
for ``papermill -f``, which is how ``scripts/demo.sh`` passes them.
"""

from __future__ import annotations

from typing import Any

from bvip_helpers.registry import MODELS, TINY_BASE

#: Synthetic scenes ``make demo`` draws into ``data/synthetic`` (80 % train), and the seed of everything.
SCENES = 4000
SEED = 0
IMAGE_ROOT = "data/synthetic"
DATA_DIR = "data/bvpi_out"

#: How ``bvip demo base`` turns the random ``tiny-qwen2-vl`` twin into the committed base model
#: (:func:`bvip_helpers.demo.pretrain.build_demo_base`). ``image_size`` is the longest image side in
#: pixels (168 x 140: 30 image tokens); ``threads`` is the torch thread count, since another count sums
#: in another order and trains a slightly different tower.
BASE = {"family": "qwen2-vl", "image_size": 168, "vision_steps": 2000, "vision_lr": 2e-3, "caption_steps": 1500,
        "caption_lr": 1e-3, "batch_size": 16, "copy_paste_rate": 1.0, "column_weight": 1.0, "threads": 2}

#: Pasted copies of each training scene that join the demo's SFT records (:mod:`bvip_helpers.demo.copy_paste`).
SFT_COPY_PASTE = 1

#: LoRA on the twin's language model and on the merger that hands it the image tokens: the merger was trained
#: to feed a patch classifier, not a language model.
TWIN_LORA_TARGETS = (r".*(language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
                     r"|visual\.merger\.mlp\.(0|2))")


#: Notebook 04's DPO settings for the twin, chosen on val in one session of tuning (docs/demo.md, "DPO on the
#: twin"): invented hazards are a quarter of the controlled pairs (more of them cost close objects, fewer cost
#: precision), the SFT term beside the DPO loss (MPO-style) keeps the chosen captions likely, and lr 2e-5 keeps
#: the mandatory fields where SFT left them.
DPO = {"pair_sources": "controlled,ranked",
       "error_types": "hazard_invented:3,close_object_dropped:2,object_side_flipped:2,moved_to_far:1,"
                      "sidewalk_flipped:1,road_flipped:1,relation_wrong:1,field_omitted:1",
       "ranked_images": 400, "ranked_n": 4, "beta": 0.1, "loss_type": "sigmoid,sft", "loss_weights": "1,1",
       "lr": 2e-5, "max_steps": 150, "batch_size": 8, "grad_accum": 1}


def base_dir() -> str:
    """Where the committed base lives (the registry's ``tiny-qwen2-vl-base`` entry)."""
    return MODELS[TINY_BASE].hub_id


def copy_paste_train_file() -> str:
    from bvip_helpers.demo.copy_paste import TRAIN_FILE

    return f"{DATA_DIR}/{TRAIN_FILE}"


def notebook_params(notebook: str) -> dict[str, Any]:
    """The papermill parameters ``make demo`` gives ``notebook`` (``00_zero_shot``, ``03_sft``, ``04_dpo``,
    ``05_eval``, ``06_error_gallery``; others get none).

    SFT: lr 4e-3 and rank 64 where a real checkpoint wants about 2e-4 and 16. A random-init twin has learned
    far less than a real model, so it must move further in 1,000 steps; the output layer (``lm_head``) is
    trained in full beside LoRA because caption pre-training never taught its rows for the words only the
    BVIP format uses (``Nearby``, ``nothing``, ``RoadVsSidewalk``). Evaluation: the base and its adapter,
    400 training images captioned again (under- or overfitting?). Error gallery: the zero-shot, SFT and DPO test
    predictions of notebook 05. Zero-shot (run after notebook 05, so its rows join the SFT and DPO ones): the base
    asked with each prompt preset, and a chain of the base refining its own description, on the whole test split.
    Training and evaluation run on the CPU wherever they run (``device="cpu"``; the notebooks' ``auto`` would pick
    CUDA or MPS), so the demo's numbers are the same on every machine.
    """
    key = notebook.removesuffix(".ipynb")
    if key == "00_zero_shot":  # after 05: the base with each prompt, and a chain of the base refining itself
        base = {"backend": "transformers", "model": TINY_BASE}
        return {"BACKENDS": [base], "PROMPTS": ["plain", "bvip"], "CHAIN": [dict(base), dict(base)]}
    if key == "03_sft":
        return {"model": TINY_BASE, "lr": 4e-3, "lora_r": 64, "lora_alpha": 64, "max_steps": 1000,
                "batch_size": 16, "grad_accum": 1, "save_steps": 250, "lora_targets": TWIN_LORA_TARGETS,
                "lora_modules_to_save": "lm_head", "train_file": copy_paste_train_file(), "example_cache_gb": 4.0,
                "cpu_threads": BASE["threads"], "device": "cpu"}
    if key == "04_dpo":
        return {"model": TINY_BASE, "sft_adapter": f"runs/{TINY_BASE}/sft", **DPO, "cpu_threads": BASE["threads"],
                "device": "cpu"}
    if key == "05_eval":
        return {"MODELS": [TINY_BASE], "ADAPTERS": [f"runs/{TINY_BASE}/sft", f"runs/{TINY_BASE}/dpo"],
                "FIT_SAMPLE": 400, "device": "cpu"}
    if key == "06_error_gallery":  # the predictions notebook 05 just wrote
        return {"PREDICTION_FILES": {"zero-shot": f"runs/{TINY_BASE}/zero_shot/preds_test.jsonl",
                                     "SFT": f"runs/{TINY_BASE}/sft/eval/preds_test.jsonl",
                                     "DPO": f"runs/{TINY_BASE}/dpo/eval/preds_test.jsonl"}}
    return {}
