"""Supervised fine-tuning of any registry model: LoRA (default), QLoRA or full, one interface.

:func:`train_sft` picks the trainer the model family needs:

* decoder-only families (Qwen2/2.5-VL, SmolVLM, DeepSeek-VL, InternVL, Janus, LLaVA-OneVision)
  train with TRL's ``SFTTrainer``: with its fused LM-head loss on CUDA, with the model's own
  cross-entropy elsewhere (``fused_lm_head``, see :func:`_sft_trainer`);
* BLIP, BLIP-2, Florence-2 and PaliGemma train with a plain ``transformers.Trainer``. TRL's fused
  LM-head loss assumes a decoder-only model (BLIP, BLIP-2, Florence-2 fail), and its collator
  sends all-zero ``token_type_ids`` to PaliGemma, which makes the whole sequence a bidirectional
  prefix and leaks the labels.

Both get the same batches from :func:`bvip_helpers.families.collate_train` (loss on the
assistant response only), the same LoRA setup and the same outputs in ``output_dir``:
the adapter (or full model) plus processor and chat template, ``checkpoint-N/`` folders
(processor beside each), ``loss_curve.png``, ``merged/`` (LoRA merged into the base and
checked against the adapter), ``preds_val.jsonl`` and ``eval_val.json``.

An ``output_dir`` that already holds a run is refused (its ``merged/`` and ``eval_val.json`` would
stay beside a new adapter and describe another model) unless ``resume`` continues it, from the latest
*complete* checkpoint (one cut short by a kill is skipped, with a note), or ``overwrite`` deletes
that run's files (:data:`RUN_OUTPUTS`, nothing else) and trains again.

Device, dtype and batch follow :mod:`bvip_helpers.devices`: ``--device auto`` trains on CUDA when
present, ``--dtype auto`` is bf16 from compute capability 8.0 and fp16 below (a T4), and
``--recipe auto|16gb|24gb|80gb`` applies the registry's batch, accumulation, dtype, 4-bit and
gradient-checkpointing settings for that GPU (:func:`effective_params`); flags you set win.

Runs under ``accelerate launch`` (configs in ``bvip_helpers/configs/``)::

    accelerate launch --config_file bvip_helpers/configs/accelerate_ddp.yaml -m bvip_helpers sft \\
        --model qwen2-vl-2b --data_dir data/bvpi_out --image_root data/synthetic --recipe auto
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
import zipfile
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from bvip_helpers import devices, families
from bvip_helpers.io import (
    ANNOTATIONS_FILE,
    CAPTIONS_FILE,
    check_image_root,
    read_jsonl,
    remove_tree,
    resolve,
    write_json,
)
from bvip_helpers.params import add_flags, from_flags, param, parse_bool  # noqa: F401 - parse_bool: sft.parse_bool
from bvip_helpers.registry import TWIN_META_FILE, get_spec, recipe_for

METHODS = ("lora", "qlora", "full")


@dataclass
class SFTParams:
    """Everything one SFT run needs; the ``bvip sft`` flags mirror these names, with these help texts."""

    model: str = param("qwen2-vl-2b", "registry name (`bvip models`), hub id or local checkpoint folder")
    data_dir: str = param("data/bvpi_out", "holds bvpi_chat_{train,val}.jsonl (or bvpi_sft_*) from `bvip build-dataset`",
                         path=True)
    image_root: str = param("data/synthetic", "folder the records' image paths are relative to", path=True)
    output_dir: str = param("", "where the adapter, checkpoints and reports go (default: runs/<model>/sft)", path=True)
    method: str = param("lora", "lora | qlora (4-bit base, CUDA only) | full")
    lora_r: int = param(16, "LoRA rank: the capacity of the update")
    lora_alpha: int = param(32, "LoRA scaling: the update is multiplied by lora_alpha / lora_r")
    lora_dropout: float = param(0.0, "dropout on the LoRA input")
    lora_target_modules: str = param("", "comma list or PEFT regex of the modules that get adapters "
                                        "(default: the registry's, the language model's linear layers)")
    lora_modules_to_save: str = param("", "comma list of modules trained in full beside the adapters, e.g. lm_head")
    train_vision: bool = param(False, "full fine-tuning only: train the vision tower and projector too")
    epochs: float = param(1.0, "passes over the training records (max_steps > 0 overrides it)")
    max_steps: int = param(-1, "optimizer steps (>= 1), overriding epochs; -1: train for epochs")
    lr: float = param(2e-4, "peak learning rate (LoRA on a 1-3B model: ~2e-4; full fine-tuning: ~1e-5)")
    lr_scheduler: str = param("linear", "transformers scheduler name: linear, cosine, constant, ...")
    warmup: float = param(0.0, "warmup steps (>= 1) or a fraction of all steps (< 1)")
    weight_decay: float = param(0.0, "AdamW weight decay")
    optim: str = param("adamw_torch_fused", "transformers optimizer name; paged_adamw_8bit suits QLoRA on a GPU")
    batch_size: int = param(4, "records per device and step")
    grad_accum: int = param(1, "gradient accumulation: effective batch = batch_size x grad_accum x devices")
    max_length: int = param(1024, "longest sample in tokens; a longer one is refused, never truncated")
    seed: int = param(0, "seed of the adapters' initialisation and the data order")
    save_steps: int = param(0, "a checkpoint every N steps (0: only the final model)")
    save_total_limit: int = param(2, "checkpoints kept; older ones are deleted")
    logging_steps: int = param(5, "log the loss every N steps")
    resume: str = param("", '"" (fresh: output_dir must not hold an earlier run), "auto" (the latest complete '
                           'checkpoint in output_dir; one cut short by a kill is skipped, with a note) or a checkpoint '
                           'folder. The earlier end results (merged/, eval_val.json, preds_*.jsonl) are deleted: the '
                           'resumed run writes them again')
    overwrite: bool = param(False, "train again into an output_dir that holds an earlier run: that run's adapter, "
                                  "checkpoints, merged/, eval and preds files are deleted first (other files are kept)")
    train_file: str = param("", "training records (default: data_dir/bvpi_chat_train.jsonl)", path=True)
    val_file: str = param("", "validation records (default: data_dir/bvpi_chat_val.jsonl)", path=True)
    eval: bool = param(True, "caption and score the val split at the end (eval_val.json)")
    eval_limit: int = param(0, "val records captioned at the end (0: all)")
    eval_batch_size: int = param(16, "images per generation batch")
    max_new_tokens: int = param(128, "longest generated caption, in tokens")
    captions_csv: str = param("", "ground truth for the val score (default: image_root/complete_captions_sensation.csv)",
                             path=True)
    annotations_csv: str = param("", "default: image_root/annotations_with_obj_pos.csv", path=True)
    merge: bool = param(True, "merge LoRA into the base, save merged/ and check that it writes the adapter's captions")
    merge_check_samples: int = param(4, "val images the merge check captions")
    gradient_checkpointing: bool = param(False, "recompute activations in the backward pass: less memory, about a third slower")
    num_workers: int = param(0, "dataloader worker processes")
    example_cache_gb: float = param(2.0, "processed training examples kept in memory (see FamilyCollator); 0: none")
    trainer: str = param("", "force trl_sft or collator_trainer (default: the registry's choice for the family)")
    fused_lm_head: str = param("auto", "TRL's chunked LM-head loss: auto (on with CUDA) | on | off")
    device: str = param("auto", "auto (CUDA, else MPS, else CPU) | cuda | mps | cpu")
    dtype: str = param("auto", "auto (bf16 on compute capability 8.0 or more, fp16 on older GPUs such as the T4, "
                              "fp32 on CPU and MPS) | bf16 | fp16 | fp32")
    recipe: str = param("", "'' (none) | auto (from the GPU's memory) | 16gb | 24gb | 80gb: the registry's batch_size, "
                           "grad_accum, dtype, 4-bit base (method qlora) and gradient_checkpointing for that GPU; "
                           "every flag you set yourself wins over the recipe")
    explicit: tuple[str, ...] = field(default=(), metadata={
        "cli": False, "help": "settings the user set, which a recipe never overrides (the CLI fills it; "
                              "empty: every setting that differs from its default)"})

    @property
    def model_slug(self) -> str:
        return Path(str(self.model).rstrip("/")).name.replace("/", "_")

    def resolved_output_dir(self) -> Path:
        return resolve(self.output_dir or f"runs/{self.model_slug}/sft")


@dataclass
class SFTResult:
    """What a run produced; ``eval`` is the evaluator's report on the val split (or ``None``)."""

    output_dir: str
    method: str
    trainer: str
    global_step: int
    train_seconds: float
    samples_per_second: float
    losses: list[tuple[int, float]] = field(default_factory=list)
    token_budget: dict[str, Any] = field(default_factory=dict)
    trainable_parameters: int = 0
    merged_dir: str | None = None
    merge_check: dict[str, Any] | None = None
    eval: dict[str, Any] | None = None
    loss_curve: str | None = None
    processes: int = 1  # training processes (accelerate launch / torchrun)
    distributed: str = "NO"  # accelerate's distributed type: NO, MULTI_CPU, MULTI_GPU, FSDP, DEEPSPEED


# --- Data -------------------------------------------------------------------


def _split_file(params: SFTParams, split: str) -> Path:
    override = params.train_file if split == "train" else params.val_file
    if override:
        return resolve(override)
    data_dir = resolve(params.data_dir)
    for name in (f"bvpi_chat_{split}.jsonl", f"bvpi_sft_{split}.jsonl"):
        if (data_dir / name).is_file():
            return data_dir / name
    raise FileNotFoundError(
        f"{data_dir}: no bvpi_chat_{split}.jsonl or bvpi_sft_{split}.jsonl; build it with "
        f"`bvip build-dataset --out_dir {params.data_dir}` or pass --{split}_file")


def load_split(params: SFTParams, split: str) -> list[dict[str, Any]]:
    """Records of one split as flat dicts: image, prompt, response (+ the field columns)."""
    path = _split_file(params, split)
    records = []
    for record in read_jsonl(path):
        flat = {"image": families.record_image_path(record), "prompt": families.record_prompt(record),
                "response": families.record_response(record)}
        flat.update({k: record[k] for k in ("sidewalk_pos", "road_pos", "road_vs_sidewalk") if k in record})
        records.append(flat)
    if not records:
        raise ValueError(f"{path}: no records")
    return records


class FamilyCollator:
    """Picklable collator: records -> the batch :func:`families.collate_train` would build.

    Every epoch revisits the same examples, and for a small model decoding the JPEG and running the
    processor is a large share of the step time. So each example is processed once and kept
    (:func:`families.encode_example`), up to ``cache_bytes`` of image tensors; batches are then only
    padded together. Families without a cached path (encoder-decoder) and examples past the budget
    go through :func:`families.collate_train` every time.
    """

    def __init__(self, processor: Any, spec: Any, image_root: str | os.PathLike[str], max_length: int | None,
                 cache_bytes: int = 2 * 1024**3):
        self.processor, self.spec, self.image_root, self.max_length = processor, spec, str(image_root), max_length
        self.cache_bytes, self._cached_bytes, self._encoded = cache_bytes, 0, {}

    def _encode(self, record: dict[str, Any]) -> Any:
        key = (families.record_image_path(record), families.record_prompt(record), families.record_response(record))
        encoded = self._encoded.get(key)
        if encoded is None and self._cached_bytes < self.cache_bytes:
            image = families.load_record_image(self.image_root, record)
            encoded = families.encode_example(self.processor, self.spec, image, key[1], key[2])
            if encoded is not None:
                self._encoded[key] = encoded
                self._cached_bytes += encoded.nbytes
        return encoded

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        encoded = [self._encode(ex) for ex in examples]
        if all(e is not None for e in encoded):
            return families.collate_encoded(self.processor, self.spec, encoded, self.max_length)
        return families.collate_train(self.processor, self.spec, examples, self.image_root, self.max_length)


# --- Pre-flight --------------------------------------------------------------


class TokenBudgetError(ValueError):
    """``max_length`` would cut image tokens or the response."""


def token_budget(processor: Any, spec: Any, records: list[dict[str, Any]], image_root: str | os.PathLike[str],
                 max_length: int | None, limit: int = 64) -> dict[str, Any]:
    """Token counts per sample (image, prompt, response, total) on up to ``limit`` records.

    The longest responses are always included, so the maximum is a real maximum of the
    responses. Raises :class:`TokenBudgetError` when a sample does not fit ``max_length``.
    """
    chosen = sorted(records, key=lambda r: len(r["response"]), reverse=True)[: max(1, limit // 2)]
    chosen += records[: limit - len(chosen)]
    counts = [families.sample_token_counts(processor, spec, families.load_record_image(image_root, r),
                                           r["prompt"], r["response"]) for r in chosen]
    budget: dict[str, Any] = {"samples_checked": len(counts), "max_length": max_length}
    for key in ("image_tokens", "prompt_tokens", "response_tokens", "total_tokens"):
        values = [c[key] for c in counts]
        budget[key] = {"min": min(values), "median": statistics.median(values), "max": max(values)}
    if max_length and budget["total_tokens"]["max"] > max_length:
        worst = max(counts, key=lambda c: c["total_tokens"])
        raise TokenBudgetError(
            f"max_length={max_length} is too small: the longest sample needs {worst['total_tokens']} tokens "
            f"({worst['image_tokens']} image, {worst['prompt_tokens']} prompt incl. image, "
            f"{worst['response_tokens']} response + end token). Truncating would cut the image tokens or the "
            f"response; use --max_length {worst['total_tokens'] + 16} or more.")
    return budget


def format_budget(budget: dict[str, Any]) -> str:
    lines = [f"token budget per sample ({budget['samples_checked']} checked, max_length={budget['max_length']}):"]
    for key in ("image_tokens", "prompt_tokens", "response_tokens", "total_tokens"):
        b = budget[key]
        lines.append(f"  {key:16s} min {b['min']:5}  median {b['median']:7.1f}  max {b['max']:5}")
    if budget.get("step_memory"):
        lines.append(format_step_memory(budget["step_memory"]))
    return "\n".join(lines)


#: bytes per trainable parameter beside its weight: an fp32 gradient and AdamW's two fp32 moments.
OPTIMIZER_BYTES = {"adamw": 4 + 8, "8bit": 4 + 2}
#: activation bytes per token, per layer and per hidden unit of one transformer layer's forward in 16 bit
#: (Korthikanti et al. 2022, "Reducing Activation Recomputation", with fused attention: no seq^2 term).
LAYER_ACTIVATION_BYTES = 34
#: the CUDA context and the allocator's reserve, roughly.
CUDA_OVERHEAD_GIB = 0.8


def estimate_step_memory(model: Any, params: SFTParams, budget: dict[str, Any],
                         fused_lm_head: bool = False) -> dict[str, Any]:
    """The expected peak memory of one training step, in GiB: an **estimate**, not a measurement.

    ``weights + trainable state + activations + logits (+ CUDA overhead on a GPU)``, where

    * weights: the bytes of the loaded parameters as they are (4-bit layers count their packed bytes);
    * trainable state: trainable parameters x 12 bytes (fp32 gradient + AdamW's two fp32 moments;
      6 bytes with an 8-bit optimizer);
    * activations: tokens per micro-batch (``batch_size`` x the budget's longest sample) x hidden size
      x bytes per activation x (``2 x layers + 34`` with gradient checkpointing: every layer's input is
      kept and one layer is recomputed at a time; ``34 x layers`` without);
    * logits: tokens x vocabulary x 10 bytes (16-bit logits, their fp32 copy for the loss and its
      gradient); 0 with TRL's fused LM head (``fused_lm_head``), which never materialises them.

    The vision tower is frozen, so its activations are freed after the forward and not counted.
    """
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "d_model", 0) or 0)
    layers = int(getattr(config, "num_hidden_layers", 0) or getattr(config, "decoder_layers", 0) or 0)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    device = devices.resolve_device(params.device)
    act_bytes = 4 if devices.resolve_dtype(params.dtype, device) == "fp32" else 2
    tokens = params.batch_size * int(budget["total_tokens"]["max"])
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    state = trainable * OPTIMIZER_BYTES["8bit" if "8bit" in params.optim else "adamw"]
    per_token = (2 * layers + LAYER_ACTIVATION_BYTES) if params.gradient_checkpointing else LAYER_ACTIVATION_BYTES * layers
    activations = tokens * hidden * per_token * act_bytes // 2
    logits = 0 if fused_lm_head else tokens * vocab * 10
    gib = 1024**3
    parts = {"weights_gib": weights / gib, "trainable_state_gib": state / gib, "activations_gib": activations / gib,
             "logits_gib": logits / gib, "overhead_gib": CUDA_OVERHEAD_GIB if device == "cuda" else 0.0}
    return {"label": "estimate", "device": device, "tokens_per_micro_batch": tokens, "fused_lm_head": fused_lm_head,
            "gradient_checkpointing": params.gradient_checkpointing, **{k: round(v, 3) for k, v in parts.items()},
            "total_gib": round(sum(parts.values()), 3)}


def format_step_memory(memory: dict[str, Any]) -> str:
    checkpointing = "with" if memory["gradient_checkpointing"] else "without"
    return (f"expected memory per step (an estimate, not measured; {memory['device']}): {memory['total_gib']:.2f} GiB = "
            f"weights {memory['weights_gib']:.2f} + optimizer state {memory['trainable_state_gib']:.2f} "
            f"+ activations {memory['activations_gib']:.2f} ({memory['tokens_per_micro_batch']} tokens, "
            f"{checkpointing} gradient checkpointing) + logits "
            + ("(fused LM head: not materialised)" if memory.get("fused_lm_head") else f"{memory['logits_gib']:.2f}")
            + (f" + CUDA overhead {memory['overhead_gib']:.1f}" if memory["overhead_gib"] else ""))


def _given(params: SFTParams) -> set[str]:
    """The settings the user chose: the CLI's record, else every field that differs from its default."""
    if params.explicit:
        return set(params.explicit)
    return {f.name for f in fields(SFTParams) if f.metadata.get("cli", True) and getattr(params, f.name) != f.default}


def effective_params(params: SFTParams, spec: Any) -> SFTParams:
    """``params`` with ``--recipe`` applied: batch, accumulation, dtype, 4-bit and gradient checkpointing of
    the registry's recipe for this GPU, except the settings the user chose (which win).

    ``recipe="auto"`` reads the GPU's memory (:func:`bvip_helpers.devices.recipe_for_memory`) and is
    resolved to its name; without CUDA it applies nothing. A recipe's 4-bit base turns ``lora`` into
    ``qlora``; a recipe's bf16 on a GPU below compute capability 8.0 becomes the policy's fp16.
    """
    name, recipe = recipe_for(spec, params.recipe)
    if recipe is None:
        return replace(params, recipe="") if params.recipe.lower() in ("auto", "none") else params
    given = _given(params)
    updates: dict[str, Any] = {"recipe": name}
    if "batch_size" not in given:
        updates["batch_size"] = recipe.per_device_batch_size
    if "grad_accum" not in given:
        updates["grad_accum"] = recipe.grad_accum
    if "gradient_checkpointing" not in given:
        updates["gradient_checkpointing"] = recipe.gradient_checkpointing
    if "method" not in given and params.method == "lora" and recipe.load_in_4bit:
        updates["method"] = "qlora"
    if "dtype" not in given:
        try:
            updates["dtype"] = devices.resolve_dtype(recipe.dtype, params.device)
        except devices.DevicePolicyError:
            updates["dtype"] = "auto"  # e.g. a bf16 recipe on a 24 GB card below compute capability 8.0
    return replace(params, **updates)


def describe_recipe(params: SFTParams) -> str:
    """One line saying what a recipe set (``params`` from :func:`effective_params`)."""
    accum = f"{params.batch_size} x {params.grad_accum}"
    checkpointing = "on" if params.gradient_checkpointing else "off"
    return (f"sft: recipe {params.recipe}: batch {accum} per device, {params.method}, dtype {params.dtype}, "
            f"gradient checkpointing {checkpointing} (flags you set win)")


# --- Model ------------------------------------------------------------------


def _module_names(text: str) -> list[str]:
    """Module names from a comma list (``--lora_target_modules``, ``--lora_modules_to_save``)."""
    return [name.strip() for name in text.split(",") if name.strip()]


def _target_modules(params: SFTParams, spec: Any) -> Any:
    raw = params.lora_target_modules or getattr(spec, "lora_target_modules", None)
    if not raw:
        raise ValueError(f"{params.model}: the registry lists no LoRA target modules; pass --lora_target_modules")
    if isinstance(raw, str) and "," in raw:
        return _module_names(raw)
    return raw if isinstance(raw, str) else list(raw)


def _freeze(model: Any, prefixes: Any) -> int:
    """Freeze parameters whose name contains any of ``prefixes``; returns how many tensors were frozen."""
    frozen = 0
    for name, weight in model.named_parameters():
        if any(p in name for p in prefixes or ()):
            weight.requires_grad_(False)
            frozen += 1
    return frozen


def weights_dtype(params: SFTParams, device: str) -> str:
    """The dtype the base loads in: the compute dtype for LoRA/QLoRA (the frozen base in 16 bit on a GPU),
    fp32 for full fine-tuning (fp32 master weights; the Trainer's autocast computes in 16 bit)."""
    return "fp32" if params.method == "full" else devices.resolve_dtype(params.dtype, device)


def prepare_model(params: SFTParams, spec: Any) -> tuple[Any, Any]:
    """Load the base model and processor and make the right parameters trainable.

    The device and dtype follow :mod:`bvip_helpers.devices`; the weights stay on the CPU for the Trainer
    to place (one copy per rank under ``accelerate launch``), except a 4-bit base, which loads onto this
    process's GPU. The frozen base keeps its 16-bit dtype (vision tower and embeddings included: no fp32
    upcast), while everything trained is fp32.
    """
    from bvip_helpers.registry import load_model_and_processor

    params = effective_params(params, spec)
    if params.method not in METHODS:
        raise ValueError(f"method {params.method!r}: choose one of {', '.join(METHODS)}")
    device = devices.resolve_device(params.device)
    if params.method == "qlora" and device != "cuda":
        raise RuntimeError("QLoRA loads the base model in 4 bit with bitsandbytes, which needs a CUDA GPU. "
                           "On CPU use --method lora (same adapter, full-precision base).")
    model, processor = load_model_and_processor(spec, load_in_4bit=params.method == "qlora", device=device,
                                                dtype=weights_dtype(params, device), place=False)
    if params.method == "full":
        model.requires_grad_(True)
        if not params.train_vision:
            _freeze(model, getattr(spec, "frozen_modules", ()))
        return model, processor
    from peft import LoraConfig, get_peft_model

    if params.method == "qlora":
        model = _prepare_4bit_base(model, params.gradient_checkpointing)
    config = LoraConfig(r=params.lora_r, lora_alpha=params.lora_alpha, lora_dropout=params.lora_dropout,
                        target_modules=_target_modules(params, spec), bias="none",
                        modules_to_save=_module_names(params.lora_modules_to_save) or None)
    model = get_peft_model(model, config)  # freezes every base weight, vision tower and projector included
    _trainable_in_fp32(model)
    return model, processor


def _prepare_4bit_base(model: Any, gradient_checkpointing: bool) -> Any:
    """What QLoRA needs from a 4-bit base, without ``peft.prepare_model_for_kbit_training``'s upcast of every
    16-bit parameter (the frozen vision tower, the embeddings) to fp32, which costs gigabytes on a T4."""
    model.requires_grad_(False)
    if gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    return model


def _trainable_in_fp32(model: Any) -> None:
    """Adapters and ``modules_to_save`` copies train in fp32 over a 16-bit base: fp16 mixed precision
    refuses fp16 gradients, and bf16 weights lose small updates."""
    import torch

    for weight in model.parameters():
        if weight.requires_grad and weight.dtype in (torch.float16, torch.bfloat16):
            weight.data = weight.data.float()


# --- Training ---------------------------------------------------------------


def _trainer_kind(params: SFTParams, spec: Any) -> str:
    kind = params.trainer or getattr(spec, "trainer", "") or "trl_sft"
    if kind == "zero-shot":
        raise ValueError(f"{spec.name} is zero-shot only, not fine-tuned here: {spec.notes}")
    if kind not in {"trl_sft", "collator_trainer"}:
        raise ValueError(f"trainer {kind!r}: choose trl_sft or collator_trainer")
    return kind


def _training_args(params: SFTParams, output_dir: Path, kind: str) -> Any:
    """The Trainer's arguments; the device and the mixed precision come from :mod:`bvip_helpers.devices`
    (bf16 autocast from compute capability 8.0, fp16 with loss scaling below, none on the CPU)."""
    device = devices.resolve_device(params.device)
    precision = devices.mixed_precision_flags(devices.resolve_dtype(params.dtype, device), device)
    common: dict[str, Any] = dict(
        output_dir=str(output_dir), per_device_train_batch_size=params.batch_size,
        gradient_accumulation_steps=params.grad_accum, learning_rate=params.lr, num_train_epochs=params.epochs,
        max_steps=params.max_steps, lr_scheduler_type=params.lr_scheduler, warmup_steps=params.warmup,
        weight_decay=params.weight_decay, optim=params.optim, seed=params.seed, data_seed=params.seed,
        logging_steps=params.logging_steps, logging_first_step=True, report_to="none",
        save_strategy="steps" if params.save_steps > 0 else "no",
        save_steps=params.save_steps if params.save_steps > 0 else 500, save_total_limit=params.save_total_limit,
        remove_unused_columns=False, dataloader_num_workers=params.num_workers,
        use_cpu=device == "cpu", **precision, disable_tqdm=False, **_checkpointing_args(params.gradient_checkpointing),
    )
    if kind == "trl_sft":
        from trl import SFTConfig

        # Our collator builds the batches, so TRL must neither tokenize nor truncate the dataset.
        return SFTConfig(**common, max_length=None, dataset_kwargs={"skip_prepare_dataset": True})
    from transformers import TrainingArguments

    return TrainingArguments(**common)


def _checkpointing_args(enabled: bool) -> dict[str, Any]:
    """Gradient (activation) checkpointing, non-reentrant: it needs no input that requires grad and works with
    frozen embeddings. transformers 5 renamed the arguments to ``activation_checkpointing*``."""
    from transformers import TrainingArguments

    name = ("activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
            else "gradient_checkpointing")
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False} if enabled else None}


class _ProcessorBesideCheckpoints:
    """Save the processor (tokenizer, image processor, chat template) into every checkpoint."""

    def __new__(cls, processor: Any) -> Any:
        from transformers import TrainerCallback

        class Callback(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                if state.is_world_process_zero:
                    checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                    if checkpoint.is_dir():
                        processor.save_pretrained(checkpoint)
                return control

        return Callback()


def use_fused_lm_head(params: SFTParams) -> bool:
    """Whether the TRL path keeps TRL's fused LM-head loss (``params.fused_lm_head``; auto: only with CUDA)."""
    import torch

    choice = params.fused_lm_head.lower()
    if choice not in {"auto", "on", "off"}:
        raise ValueError(f"fused_lm_head {params.fused_lm_head!r}: choose auto, on or off")
    if choice == "auto":
        return torch.cuda.is_available() and devices.resolve_device(params.device) == "cuda"
    return choice == "on"


def _sft_trainer(params: SFTParams) -> type:
    """TRL's ``SFTTrainer``, or a subclass whose loss is the model's own cross-entropy.

    TRL computes the loss with a fused LM head: it projects the hidden states through the LM head in
    tiles, with its own autograd function, so a 150k-token vocabulary never materialises full logits
    on the GPU. Without Triton (CPU) it scores every position, prompt and image tokens included, and on
    a tiny twin (730 tokens) it made the forward and backward 14 to 34 % slower than the model's own
    cross-entropy on the same batches (``benchmarks/bench_sft.py`` reports both). The subclass keeps
    TRL's logged token accuracy and entropy, computed from the logits without gradient.
    """
    from trl import SFTTrainer

    if use_fused_lm_head(params):
        return SFTTrainer

    class PlainLossSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            import torch
            from transformers import Trainer

            mode = "train" if self.model.training else "eval"
            loss, outputs = Trainer.compute_loss(self, model, {**inputs, "use_cache": False}, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
            with torch.no_grad():
                labels = inputs["labels"][:, 1:]
                mask = labels != -100
                logits = outputs.logits[:, :-1][mask].float()
                log_probs = logits.log_softmax(-1)
                entropy = -(log_probs.exp() * log_probs).sum(-1).sum()
                correct = (logits.argmax(-1) == labels[mask]).sum()
            gather = self.accelerator.gather_for_metrics
            valid = gather(mask.sum()).sum()
            if valid > 0:
                self._metrics[mode]["entropy"].append((gather(entropy).sum() / valid).item())
                self._metrics[mode]["mean_token_accuracy"].append((gather(correct).sum() / valid).item())
            if mode == "train":
                self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item()
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            return (loss, outputs) if return_outputs else loss

    return PlainLossSFTTrainer


def build_trainer(params: SFTParams, spec: Any, model: Any, processor: Any, train_records: list[dict[str, Any]],
                  callbacks: list[Any] | None = None) -> Any:
    from datasets import Dataset

    kind = _trainer_kind(params, spec)
    output_dir = params.resolved_output_dir()
    params = effective_params(params, spec)
    args = _training_args(params, output_dir, kind)
    collator = FamilyCollator(processor, spec, resolve(params.image_root), params.max_length,
                              cache_bytes=int(params.example_cache_gb * 1024**3))
    dataset = Dataset.from_list(train_records)
    callbacks = [_ProcessorBesideCheckpoints(processor), *(callbacks or [])]
    if kind == "trl_sft":
        return _sft_trainer(params)(model=model, args=args, data_collator=collator, train_dataset=dataset,
                                    processing_class=processor, callbacks=callbacks)
    from transformers import Trainer

    return Trainer(model=model, args=args, data_collator=collator, train_dataset=dataset,
                   processing_class=processor, callbacks=callbacks)


#: What an SFT run writes into its output_dir; ``overwrite`` deletes exactly these, nothing else.
RUN_OUTPUTS = (
    "adapter_model.safetensors", "adapter_config.json", "model.safetensors", "model-*-of-*.safetensors",
    "model.safetensors.index.json", "config.json", "generation_config.json", "training_args.bin", "README.md",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json", "processor_config.json",
    "preprocessor_config.json", "video_preprocessor_config.json", "twin_meta.json", "sft_params.json",
    "sft_result.json", "eval_val.json", "preds_*.jsonl", "preds_*.jsonl.previous", "loss_curve.png", "merged",
    "eval", "constrained", "checkpoint-*",
)
#: Results computed from the final model (notebook 05's eval/ and constrained/ included): a resumed run
#: writes them again, and until then an earlier run's copies would describe another model.
DERIVED_OUTPUTS = ("merged", "eval_val.json", "preds_*.jsonl", "preds_*.jsonl.previous", "sft_result.json",
                   "loss_curve.png", "eval", "constrained")
#: Files that make a folder hold an earlier run.
_RUN_MARKERS = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json", "sft_result.json",
                "merged", "checkpoint-*")


def _present(folder: Path, patterns: tuple[str, ...]) -> list[Path]:
    return sorted({path for pattern in patterns for path in folder.glob(pattern)}) if folder.is_dir() else []


def _is_main_process() -> bool:
    """Rank 0 under ``accelerate launch`` (or a plain run): the process that deletes and reports."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def _remove(paths: list[Path], why: str) -> None:
    if paths and _is_main_process():
        for path in paths:
            try:
                remove_tree(path)
            except FileNotFoundError:  # another process of a multi-process launch was first
                pass
        print(f"sft: {why}: deleted " + ", ".join(p.name for p in paths[:8]) + (" ..." if len(paths) > 8 else ""),
              file=sys.stderr)


def check_params(params: SFTParams) -> None:
    """Settings that would train nothing, or contradict each other, as a ``ValueError`` naming the flag."""
    if params.max_steps == 0 or params.max_steps < -1:
        raise ValueError(f"--max_steps {params.max_steps}: train at least 1 step, or pass -1 to train for --epochs "
                         "(0 steps would save an untrained adapter)")
    if params.max_steps < 0 and params.epochs <= 0:
        raise ValueError(f"--epochs {params.epochs}: train for more than 0 epochs, or set --max_steps")
    if params.resume and params.overwrite:
        raise ValueError("--resume continues the earlier run and --overwrite deletes it: pass only one of them")


def checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot be resumed from (cut short by a kill while saving), or ``None`` when it is complete.

    The Trainer writes ``trainer_state.json`` last, so a valid one means the weights, optimizer and
    scheduler before it were written whole; their sizes are checked too, without loading them.
    """
    try:
        json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))["global_step"]
    except FileNotFoundError:
        return "it has no trainer_state.json (the run was stopped while saving it)"
    except (ValueError, KeyError, TypeError):
        return "its trainer_state.json is cut short or not valid JSON"
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        return "it holds no weights (*.safetensors)"
    for path in weights:
        if not _safetensors_complete(path):
            return f"{path.name} is cut short"
    for path in (*folder.glob("*.pt"), *folder.glob("*.pth")):
        if not zipfile.is_zipfile(path):  # torch.save writes a zip archive, whose directory comes last
            return f"{path.name} is cut short"
    return None


def _safetensors_complete(path: Path) -> bool:
    """The file is as long as its header says (a safetensors file starts with its header's length and JSON)."""
    try:
        with open(path, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False
    return path.stat().st_size >= 8 + header_len + end


def _resume_checkpoint(params: SFTParams) -> str | None:
    """The checkpoint ``params.resume`` names: for ``auto`` the latest complete one (with a note about any skipped)."""
    if not params.resume:
        return None
    if params.resume != "auto":
        path = resolve(params.resume)
        if not path.is_dir():
            raise FileNotFoundError(f"--resume {params.resume}: no such checkpoint folder")
        problem = checkpoint_problem(path)
        if problem:
            raise ValueError(f"--resume {path}: this checkpoint cannot be resumed from: {problem}. Pass an earlier "
                             "checkpoint, or --resume auto to take the latest complete one")
        return str(path)
    output_dir = params.resolved_output_dir()
    checkpoints = [p for p in _present(output_dir, ("checkpoint-*",)) if p.is_dir() and p.name[11:].isdigit()]
    skipped = []
    for checkpoint in sorted(checkpoints, key=lambda p: int(p.name[11:]), reverse=True):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            if skipped and _is_main_process():
                print(f"sft: {'; '.join(skipped)}; falling back to {checkpoint.name}, the latest complete checkpoint",
                      file=sys.stderr)
            return str(checkpoint)
        skipped.append(f"{checkpoint.name} is incomplete ({problem})")
    if _is_main_process():
        print(f"sft: no complete checkpoint in {output_dir} to resume from"
              + (f" ({'; '.join(skipped)})" if skipped else "") + "; starting fresh", file=sys.stderr)
    return None


def prepare_output_dir(params: Any, *, outputs: tuple[str, ...] = RUN_OUTPUTS,
                       derived: tuple[str, ...] = DERIVED_OUTPUTS, markers: tuple[str, ...] = _RUN_MARKERS,
                       kind: str = "SFT") -> str | None:
    """Refuse to train over an earlier run unless asked; returns the checkpoint to resume from, if any.

    ``overwrite`` deletes the earlier run's ``outputs`` (:data:`RUN_OUTPUTS`); ``resume`` deletes only its
    ``derived`` ones (:data:`DERIVED_OUTPUTS`; the resumed run writes them again). See the module docstring.
    ``params`` needs ``overwrite``, ``resume`` and ``resolved_output_dir()`` (SFT and DPO parameters have them).
    """
    output_dir = params.resolved_output_dir()
    earlier = _present(output_dir, markers)
    if params.overwrite:
        _remove(_present(output_dir, outputs), f"--overwrite: the earlier run in {output_dir}")
        return None
    if params.resume:
        checkpoint = _resume_checkpoint(params)
        if checkpoint is None and earlier:
            raise ValueError(f"--resume {params.resume}: {output_dir} holds an earlier run "
                             f"({', '.join(p.name for p in earlier[:5])}) but no complete checkpoint to resume from; "
                             "pass --overwrite true to train it again, or another --output_dir")
        if checkpoint is not None:
            _remove(_present(output_dir, derived), f"--resume: the results of the earlier end of {output_dir}")
            if _is_main_process():
                print(f"{kind.lower()}: resuming from {checkpoint}", file=sys.stderr)
        return checkpoint
    if earlier:
        raise ValueError(f"{output_dir} already holds an earlier {kind} run ({', '.join(p.name for p in earlier[:5])}); "
                         "a new one would replace its adapter while its results (merged/, eval_val.json, preds_*.jsonl) "
                         "describe the old model. Pass --resume auto to continue it, --overwrite true to delete it and "
                         "train again, or another --output_dir")
    return None


def train_sft(params: SFTParams, callbacks: list[Any] | None = None) -> SFTResult:
    """Run one SFT job end to end (see the module docstring for what lands in ``output_dir``)."""
    from bvip_helpers.nb import seed_everything

    check_params(params)
    check_image_root(resolve(params.image_root))
    resume_from = prepare_output_dir(params)  # before any loading: a refusal costs nothing
    seed_everything(params.seed)
    spec = get_spec(params.model)
    params = effective_params(params, spec)  # --recipe: batch, accumulation, dtype, 4-bit, checkpointing
    kind = _trainer_kind(params, spec)
    train_records = load_split(params, "train")
    val_records = load_split(params, "val") if params.eval else []
    model, processor = prepare_model(params, spec)

    image_root = resolve(params.image_root)
    budget = token_budget(processor, spec, train_records + val_records, image_root, params.max_length)
    budget["step_memory"] = estimate_step_memory(model, params, budget,
                                                 fused_lm_head=kind == "trl_sft" and use_fused_lm_head(params))
    trainer = build_trainer(params, spec, model, processor, train_records, callbacks)
    main = trainer.is_world_process_zero()
    if main:
        if params.recipe:
            print(describe_recipe(params))
        print(format_budget(budget))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if main:
        total = sum(p.numel() for p in model.parameters())
        accelerator = trainer.accelerator
        print(f"sft: {params.method} via {kind}, {trainable:,} of {total:,} parameters trainable "
              f"({100 * trainable / max(total, 1):.2f}%), {accelerator.num_processes} process(es), "
              f"{accelerator.distributed_type.value}")

    start = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=resume_from)
    train_seconds = time.perf_counter() - start
    output_dir = params.resolved_output_dir()
    result = SFTResult(
        output_dir=str(output_dir), method=params.method, trainer=kind, global_step=trainer.state.global_step,
        train_seconds=train_seconds, samples_per_second=float(output.metrics.get("train_samples_per_second", 0.0)),
        losses=[(int(e["step"]), float(e["loss"])) for e in trainer.state.log_history if "loss" in e],
        token_budget=budget, trainable_parameters=trainable, processes=trainer.accelerator.num_processes,
        distributed=trainer.accelerator.distributed_type.value,
    )
    trainer.save_model(str(output_dir))  # adapter only for LoRA, the full model otherwise
    if not main:
        return result
    processor.save_pretrained(output_dir)
    _copy_twin_meta(spec, output_dir)
    write_json(output_dir / "sft_params.json", {**asdict(params), "family": getattr(spec, "family", None)})
    result.loss_curve = str(save_loss_curve(result.losses, output_dir / "loss_curve.png"))
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    unwrapped.eval()
    predictions: list[dict[str, Any]] = []
    if params.eval:
        predictions, result.eval = evaluate_val(params, spec, unwrapped, processor, val_records, output_dir)
    if params.merge and params.method in {"lora", "qlora"}:
        result.merged_dir, result.merge_check = merge_and_check(params, spec, unwrapped, processor, val_records,
                                                                output_dir)
    write_json(output_dir / "sft_result.json", asdict(result))
    return result


# --- After training ---------------------------------------------------------


def _copy_twin_meta(spec: Any, target: Path) -> None:
    """Mark a model trained from a tiny twin as a twin too (so it keeps the twin's image size, see get_spec)."""
    source = resolve(spec.hub_id) / TWIN_META_FILE if spec.is_local else None
    if source is not None and source.is_file() and (target / "config.json").is_file():
        shutil.copyfile(source, target / TWIN_META_FILE)


def loss_figure(losses: list[tuple[int, float]], title: str = "SFT loss") -> Any:
    """The training loss against the optimizer step, as a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    if losses:
        steps, values = zip(*losses, strict=True)
        ax.plot(steps, values, marker="o", markersize=3)
    ax.set(xlabel="optimizer step", ylabel="training loss (response tokens)", title=title)
    fig.tight_layout()
    return fig


def save_loss_curve(losses: list[tuple[int, float]], target: Path) -> Path:
    """``loss_curve.png`` of a run, written inside its own output folder (atomically)."""
    import matplotlib

    if "ipykernel" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bvip_helpers.io import atomic_path

    fig = loss_figure(losses)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return target


def ground_truth(image_root: str | os.PathLike[str], captions_csv: str = "", annotations_csv: str = "") -> Any:
    """The evaluator's ground truth from the two CSVs (default: beside the images, as `bvip synth` writes)."""
    from bvip_helpers.dataset import load_ground_truth

    image_root = resolve(image_root)
    captions = resolve(captions_csv) if captions_csv else image_root / CAPTIONS_FILE
    annotations = resolve(annotations_csv) if annotations_csv else image_root / ANNOTATIONS_FILE
    return load_ground_truth(captions, annotations)


def predict_and_evaluate(model: Any, processor: Any, spec: Any, records: list[dict[str, Any]],
                         image_root: str | os.PathLike[str], split: str, truth: Any, preds_path: Path, *,
                         name: str = "model", batch_size: int = 16, max_new_tokens: int = 128,
                         constrained: bool = False) -> tuple[list, dict]:
    """Greedy batched captions for ``records`` (fresh file) scored on ``split`` -> (predictions, report).

    Only the captioned images are scored, so a subset gives a fair (not a zero-padded) figure.
    ``constrained`` decodes the mandatory fields with the schema constraint (``bvip predict --constrained``).
    """
    from bvip_helpers.evaluate import evaluate_predictions
    from bvip_helpers.predict import LoadedModel, predict
    from bvip_helpers.runs import scored_truth

    preds_path = Path(preds_path)
    preds_path.unlink(missing_ok=True)  # a fresh model: never resume stale captions
    predict(LoadedModel(model, processor, spec, name=name), records, resolve(image_root), preds_path,
            batch_size=batch_size, max_new_tokens=max_new_tokens, constrained=constrained, progress=False)
    predictions = read_jsonl(preds_path)
    return predictions, evaluate_predictions(predictions, scored_truth(truth, split, records), split,
                                             pred_file=str(preds_path))


def evaluate_val(params: SFTParams, spec: Any, model: Any, processor: Any, val_records: list[dict[str, Any]],
                 output_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Greedy batched captions for the val split, scored by the evaluator -> ``eval_val.json``."""
    records = val_records[: params.eval_limit] if params.eval_limit else val_records
    truth = ground_truth(params.image_root, params.captions_csv, params.annotations_csv)
    predictions, report = predict_and_evaluate(
        model, processor, spec, records, params.image_root, "val", truth, output_dir / "preds_val.jsonl",
        name=params.model_slug, batch_size=params.eval_batch_size, max_new_tokens=params.max_new_tokens)
    write_json(output_dir / "eval_val.json", report)
    return predictions, report


def load_trained(model: str, adapter: str | os.PathLike[str] | None = None, *, device: str = "auto",
                 dtype: str = "auto") -> tuple[Any, Any, Any]:
    """(model, processor, spec) of a base model plus an optional SFT adapter folder, ready to generate
    on ``device`` in ``dtype`` (the policy of :mod:`bvip_helpers.devices`: a GPU when there is one)."""
    from bvip_helpers.registry import load_model_and_processor

    spec = get_spec(model)
    loaded, processor = load_model_and_processor(spec, adapter=str(resolve(adapter)) if adapter else None,
                                                 device=device, dtype=dtype)
    return loaded.eval(), processor, spec


def _is_4bit(model: Any) -> bool:
    """True for a model (or a PEFT model over one) whose base was loaded in 4 bit."""
    base = getattr(model, "get_base_model", lambda: model)()
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(getattr(base, "hf_quantizer", None), "quantization_config", None))


def _four_bit_compute_dtype(model: Any) -> str:
    """The compute dtype a 4-bit base was loaded with (``bf16`` / ``fp16``), which the 16-bit merge reuses."""
    config = getattr(model.get_base_model().config, "quantization_config", None)
    value = config.get("bnb_4bit_compute_dtype") if isinstance(config, dict) else getattr(
        config, "bnb_4bit_compute_dtype", None)
    return devices.short_dtype(value or model.dtype)


def merge_and_check(params: SFTParams, spec: Any, model: Any, processor: Any, val_records: list[dict[str, Any]],
                    output_dir: Path) -> tuple[str, dict[str, Any]]:
    """Merge LoRA into the base, save ``merged/``, reload it and compare greedy captions with the adapter's.

    Everything runs on the trained model's device, in its dtype. After QLoRA the adapter is never merged
    into the 4-bit weights (that re-quantises them, losing the update's precision, and saves a 4-bit
    ``merged/``): the base is reloaded in 16 bit, the saved adapter loaded on it and merged there, and the
    check compares that 16-bit base + adapter with the reloaded merged model (``qlora_4bit`` keeps the
    captions of the 4-bit model that was trained, for comparison).
    """
    import gc

    import torch
    from peft import PeftModel

    from bvip_helpers.registry import load_model_and_processor

    records = val_records[: params.merge_check_samples] or load_split(params, "train")[: params.merge_check_samples]
    image_root = resolve(params.image_root)
    images = [families.load_record_image(image_root, r) for r in records]
    prompts = [r["prompt"] for r in records]
    device = next(model.parameters()).device
    with torch.no_grad():
        trained_texts = families.generate_captions(model, processor, spec, images, prompts, params.max_new_tokens)
    check: dict[str, Any] = {"samples": len(records), "device": str(device)}
    four_bit = _is_4bit(model)
    if four_bit:
        base, _ = load_model_and_processor(spec, device=device.type, dtype=_four_bit_compute_dtype(model))
        reference = PeftModel.from_pretrained(base, str(output_dir), is_trainable=False).eval()
        with torch.no_grad():
            reference_texts = families.generate_captions(reference, processor, spec, images, prompts,
                                                         params.max_new_tokens)
        check["qlora_4bit"] = trained_texts
        merged = reference.merge_and_unload()
    else:
        reference_texts = trained_texts
        merged = model.merge_and_unload()
    merged_dir = output_dir / "merged"
    merged.save_pretrained(merged_dir, safe_serialization=True)
    processor.save_pretrained(merged_dir)
    _copy_twin_meta(spec, merged_dir)
    merged_cls, merged_dtype = type(merged), merged.dtype
    del merged
    if four_bit:
        del reference, base  # the 16-bit copy: free it before the merged one loads
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    reloaded = merged_cls.from_pretrained(merged_dir, use_safetensors=True, dtype=merged_dtype,
                                          device_map=devices.device_map(device.type) if device.type != "cpu" else None)
    reloaded.eval()
    merged_texts = families.generate_captions(reloaded, processor, spec, images, prompts, params.max_new_tokens)
    check.update({"dtype": devices.short_dtype(merged_dtype), "identical": reference_texts == merged_texts,
                  "adapter": reference_texts, "merged": merged_texts})
    if not check["identical"]:
        print("sft: WARNING merged model and adapter generate different captions; see sft_result.json")
    return str(merged_dir), check


# --- CLI --------------------------------------------------------------------


def configure_cli(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, SFTParams)


def params_from_cli(args: argparse.Namespace) -> SFTParams:
    """``SFTParams`` from parsed flags, with paths read from the current directory (as every Unix tool does)."""
    return from_flags(args, SFTParams)


def run_cli(args: argparse.Namespace) -> int:
    from bvip_helpers.registry import UnknownModelError

    params = params_from_cli(args)
    try:
        result = train_sft(params)
    except (TokenBudgetError, FileNotFoundError, ValueError, RuntimeError, UnknownModelError) as err:
        print(f"bvip sft: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        from bvip_helpers.io import concerns, os_error_line

        if not concerns(err, params.resolved_output_dir()):  # an unreadable input, not the output
            print(f"bvip sft: error: {os_error_line(err)}", file=sys.stderr)
            return 2
        print(f"bvip sft: error: cannot write {os_error_line(err)}; checkpoints already saved are kept (make the "
              "folder writable or free disk space, then rerun with --resume auto)", file=sys.stderr)
        return 2
    if result.eval:
        print(json.dumps({"presence": result.eval["presence"], "accuracy": result.eval["accuracy"]}, indent=2))
    print(f"sft: {result.global_step} steps in {result.train_seconds:.1f}s -> {result.output_dir}")
    return 0
