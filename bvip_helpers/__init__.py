"""bvip_helpers: the reusable code behind the bvip-captioning notebooks, one module per stage.

- :mod:`bvip_helpers.schema`          caption fields, objects, compose and parse
- :mod:`bvip_helpers.io`              paths, atomic writes, JSONL with line numbers, safe image loading
- :mod:`bvip_helpers.dataset`         SENSATION CSVs -> SFT/chat/DPO JSONL, merged CSV, quality report
- :mod:`bvip_helpers.evaluate`        seed-compatible and structured metrics, baselines
- :mod:`bvip_helpers.caption_metrics` BLEU, METEOR, ROUGE-L, CIDEr, embedding similarity
- :mod:`bvip_helpers.registry`        the model zoo and the one loader for all of it
- :mod:`bvip_helpers.devices`         the device and dtype policy (CUDA/MPS/CPU, bf16/fp16/fp32), recipes per GPU
- :mod:`bvip_helpers.families`        how each model family wants its prompts, batches and labels (with the
                                      published checkpoints' facts in ``configs/families/<family>.json``)
- :mod:`bvip_helpers.sft`             supervised fine-tuning (LoRA, QLoRA, full)
- :mod:`bvip_helpers.predict`         batched, resumable, optionally constrained generation
- :mod:`bvip_helpers.constrained`     schema-constrained decoding of the mandatory fields
- :mod:`bvip_helpers.backends`        zero-shot backends: transformers, OpenAI-compatible servers, Ollama, CLIP-Interrogator
- :mod:`bvip_helpers.structured`      the caption schema in each server's structured-output dialect, the local check
- :mod:`bvip_helpers.chain`           a chain of experts, each refining the description so far
- :mod:`bvip_helpers.runs`            what each evaluation run captions and where its files go
- :mod:`bvip_helpers.errors`          per-sample error records ranked by danger, spoken order
- :mod:`bvip_helpers.report`          ``bvip report``: the error gallery as one self-contained HTML file
- :mod:`bvip_helpers.plots`           comparison figures; :mod:`bvip_helpers.explore` data figures
- :mod:`bvip_helpers.batch`           papermill runs per model and the leaderboard
- :mod:`bvip_helpers.exporters`       datasets for models that train in their own repositories

:mod:`bvip_helpers.demo` holds the CPU demo's machinery (synthetic scenes, tiny twins, their
pre-training); the pipeline above never imports it.
"""

__version__ = "0.1.0"
