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

Runs under ``accelerate launch`` (configs in ``bvip_helpers/configs/``)::

    accelerate launch --config_file bvip_helpers/configs/accelerate_ddp.yaml -m bvip_helpers sft \\
        --model qwen2-vl-2b --data_dir data/bvpi_out --image_root data/synthetic
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from bvip_helpers import families
from bvip_helpers.io import ANNOTATIONS_FILE, CAPTIONS_FILE, read_jsonl, resolve, resolve_cli_path, write_json
from bvip_helpers.registry import TWIN_META_FILE, get_spec

METHODS = ("lora", "qlora", "full")


def _arg(default: Any, help: str, *, path: bool = False) -> Any:
    """A dataclass field with the ``bvip sft`` flag's help text (``path``: a command-line path, read from the cwd)."""
    return field(default=default, metadata={"help": help, "path": path})


@dataclass
class SFTParams:
    """Everything one SFT run needs; the ``bvip sft`` flags mirror these names, with these help texts."""

    model: str = _arg("qwen2-vl-2b", "registry name (`bvip models`), hub id or local checkpoint folder")
    data_dir: str = _arg("data/bvpi_out", "holds bvpi_chat_{train,val}.jsonl (or bvpi_sft_*) from `bvip build-dataset`",
                         path=True)
    image_root: str = _arg("data/synthetic", "folder the records' image paths are relative to", path=True)
    output_dir: str = _arg("", "where the adapter, checkpoints and reports go (default: runs/<model>/sft)", path=True)
    method: str = _arg("lora", "lora | qlora (4-bit base, CUDA only) | full")
    lora_r: int = _arg(16, "LoRA rank: the capacity of the update")
    lora_alpha: int = _arg(32, "LoRA scaling: the update is multiplied by lora_alpha / lora_r")
    lora_dropout: float = _arg(0.0, "dropout on the LoRA input")
    lora_target_modules: str = _arg("", "comma list or PEFT regex of the modules that get adapters "
                                        "(default: the registry's, the language model's linear layers)")
    lora_modules_to_save: str = _arg("", "comma list of modules trained in full beside the adapters, e.g. lm_head")
    train_vision: bool = _arg(False, "full fine-tuning only: train the vision tower and projector too")
    epochs: float = _arg(1.0, "passes over the training records (max_steps > 0 overrides it)")
    max_steps: int = _arg(-1, "optimizer steps; > 0 overrides epochs")
    lr: float = _arg(2e-4, "peak learning rate (LoRA on a 1-3B model: ~2e-4; full fine-tuning: ~1e-5)")
    lr_scheduler: str = _arg("linear", "transformers scheduler name: linear, cosine, constant, ...")
    warmup: float = _arg(0.0, "warmup steps (>= 1) or a fraction of all steps (< 1)")
    weight_decay: float = _arg(0.0, "AdamW weight decay")
    optim: str = _arg("adamw_torch_fused", "transformers optimizer name; paged_adamw_8bit suits QLoRA on a GPU")
    batch_size: int = _arg(4, "records per device and step")
    grad_accum: int = _arg(1, "gradient accumulation: effective batch = batch_size x grad_accum x devices")
    max_length: int = _arg(1024, "longest sample in tokens; a longer one is refused, never truncated")
    seed: int = _arg(0, "seed of the adapters' initialisation and the data order")
    save_steps: int = _arg(0, "a checkpoint every N steps (0: only the final model)")
    save_total_limit: int = _arg(2, "checkpoints kept; older ones are deleted")
    logging_steps: int = _arg(5, "log the loss every N steps")
    resume: str = _arg("", '"" (fresh), "auto" (latest checkpoint in output_dir) or a checkpoint folder')
    train_file: str = _arg("", "training records (default: data_dir/bvpi_chat_train.jsonl)", path=True)
    val_file: str = _arg("", "validation records (default: data_dir/bvpi_chat_val.jsonl)", path=True)
    eval: bool = _arg(True, "caption and score the val split at the end (eval_val.json)")
    eval_limit: int = _arg(0, "val records captioned at the end (0: all)")
    eval_batch_size: int = _arg(16, "images per generation batch")
    max_new_tokens: int = _arg(128, "longest generated caption, in tokens")
    captions_csv: str = _arg("", "ground truth for the val score (default: image_root/complete_captions_sensation.csv)",
                             path=True)
    annotations_csv: str = _arg("", "default: image_root/annotations_with_obj_pos.csv", path=True)
    merge: bool = _arg(True, "merge LoRA into the base, save merged/ and check that it writes the adapter's captions")
    merge_check_samples: int = _arg(4, "val images the merge check captions")
    gradient_checkpointing: bool = _arg(False, "recompute activations in the backward pass: less memory, about a third slower")
    num_workers: int = _arg(0, "dataloader worker processes")
    example_cache_gb: float = _arg(2.0, "processed training examples kept in memory (see FamilyCollator); 0: none")
    trainer: str = _arg("", "force trl_sft or collator_trainer (default: the registry's choice for the family)")
    fused_lm_head: str = _arg("auto", "TRL's chunked LM-head loss: auto (on with CUDA) | on | off")

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
    return "\n".join(lines)


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
    for name, param in model.named_parameters():
        if any(p in name for p in prefixes or ()):
            param.requires_grad_(False)
            frozen += 1
    return frozen


def prepare_model(params: SFTParams, spec: Any) -> tuple[Any, Any]:
    """Load the base model and processor and make the right parameters trainable."""
    import torch

    from bvip_helpers.registry import load_model_and_processor

    if params.method not in METHODS:
        raise ValueError(f"method {params.method!r}: choose one of {', '.join(METHODS)}")
    if params.method == "qlora" and not torch.cuda.is_available():
        raise RuntimeError("QLoRA loads the base model in 4 bit with bitsandbytes, which needs a CUDA GPU. "
                           "On CPU use --method lora (same adapter, full-precision base).")
    model, processor = load_model_and_processor(spec, load_in_4bit=params.method == "qlora")
    if params.method == "full":
        model.requires_grad_(True)
        if not params.train_vision:
            _freeze(model, getattr(spec, "frozen_modules", ()))
        return model, processor
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if params.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=params.gradient_checkpointing)
    config = LoraConfig(r=params.lora_r, lora_alpha=params.lora_alpha, lora_dropout=params.lora_dropout,
                        target_modules=_target_modules(params, spec), bias="none",
                        modules_to_save=_module_names(params.lora_modules_to_save) or None)
    model = get_peft_model(model, config)  # freezes every base weight, vision tower and projector included
    return model, processor


# --- Training ---------------------------------------------------------------


def _trainer_kind(params: SFTParams, spec: Any) -> str:
    kind = params.trainer or getattr(spec, "trainer", "") or "trl_sft"
    if kind == "zero-shot":
        raise ValueError(f"{spec.name} is zero-shot only, not fine-tuned here: {spec.notes}")
    if kind not in {"trl_sft", "collator_trainer"}:
        raise ValueError(f"trainer {kind!r}: choose trl_sft or collator_trainer")
    return kind


def _training_args(params: SFTParams, output_dir: Path, kind: str) -> Any:
    import torch

    common: dict[str, Any] = dict(
        output_dir=str(output_dir), per_device_train_batch_size=params.batch_size,
        gradient_accumulation_steps=params.grad_accum, learning_rate=params.lr, num_train_epochs=params.epochs,
        max_steps=params.max_steps, lr_scheduler_type=params.lr_scheduler, warmup_steps=params.warmup,
        weight_decay=params.weight_decay, optim=params.optim, seed=params.seed, data_seed=params.seed,
        logging_steps=params.logging_steps, logging_first_step=True, report_to="none",
        save_strategy="steps" if params.save_steps > 0 else "no",
        save_steps=params.save_steps if params.save_steps > 0 else 500, save_total_limit=params.save_total_limit,
        remove_unused_columns=False, dataloader_num_workers=params.num_workers,
        gradient_checkpointing=params.gradient_checkpointing, use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(), disable_tqdm=False,
    )
    if kind == "trl_sft":
        from trl import SFTConfig

        # Our collator builds the batches, so TRL must neither tokenize nor truncate the dataset.
        return SFTConfig(**common, max_length=None, dataset_kwargs={"skip_prepare_dataset": True})
    from transformers import TrainingArguments

    return TrainingArguments(**common)


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
    return torch.cuda.is_available() if choice == "auto" else choice == "on"


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


def _resume_checkpoint(params: SFTParams) -> str | bool | None:
    if not params.resume:
        return None
    if params.resume == "auto":
        from transformers.trainer_utils import get_last_checkpoint

        output_dir = params.resolved_output_dir()
        last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
        if last is None:
            print(f"sft: no checkpoint in {output_dir} to resume from; starting fresh")
        return last
    path = resolve(params.resume)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume {params.resume}: no such checkpoint folder")
    return str(path)


def train_sft(params: SFTParams, callbacks: list[Any] | None = None) -> SFTResult:
    """Run one SFT job end to end (see the module docstring for what lands in ``output_dir``)."""
    from bvip_helpers.nb import seed_everything

    seed_everything(params.seed)
    spec = get_spec(params.model)
    kind = _trainer_kind(params, spec)
    train_records = load_split(params, "train")
    val_records = load_split(params, "val") if params.eval else []
    model, processor = prepare_model(params, spec)

    image_root = resolve(params.image_root)
    budget = token_budget(processor, spec, train_records + val_records, image_root, params.max_length)
    trainer = build_trainer(params, spec, model, processor, train_records, callbacks)
    main = trainer.is_world_process_zero()
    if main:
        print(format_budget(budget))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if main:
        total = sum(p.numel() for p in model.parameters())
        print(f"sft: {params.method} via {kind}, {trainable:,} of {total:,} parameters trainable "
              f"({100 * trainable / max(total, 1):.2f}%)")

    start = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=_resume_checkpoint(params))
    train_seconds = time.perf_counter() - start
    output_dir = params.resolved_output_dir()
    result = SFTResult(
        output_dir=str(output_dir), method=params.method, trainer=kind, global_step=trainer.state.global_step,
        train_seconds=train_seconds, samples_per_second=float(output.metrics.get("train_samples_per_second", 0.0)),
        losses=[(int(e["step"]), float(e["loss"])) for e in trainer.state.log_history if "loss" in e],
        token_budget=budget, trainable_parameters=trainable,
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


def load_trained(model: str, adapter: str | os.PathLike[str] | None = None) -> tuple[Any, Any, Any]:
    """(model, processor, spec) of a base model plus an optional SFT adapter folder, ready to generate."""
    from bvip_helpers.registry import load_model_and_processor

    spec = get_spec(model)
    loaded, processor = load_model_and_processor(spec, adapter=str(resolve(adapter)) if adapter else None)
    return loaded.eval(), processor, spec


def merge_and_check(params: SFTParams, spec: Any, model: Any, processor: Any, val_records: list[dict[str, Any]],
                    output_dir: Path) -> tuple[str, dict[str, Any]]:
    """Merge LoRA into the base, save ``merged/``, reload it and compare greedy captions with the adapter's."""
    import torch

    records = val_records[: params.merge_check_samples] or load_split(params, "train")[: params.merge_check_samples]
    image_root = resolve(params.image_root)
    images = [families.load_record_image(image_root, r) for r in records]
    prompts = [r["prompt"] for r in records]
    with torch.no_grad():
        adapter_texts = families.generate_captions(model, processor, spec, images, prompts, params.max_new_tokens)
    merged = model.merge_and_unload()
    merged_dir = output_dir / "merged"
    merged.save_pretrained(merged_dir, safe_serialization=True)
    processor.save_pretrained(merged_dir)
    _copy_twin_meta(spec, merged_dir)
    reloaded = type(merged).from_pretrained(merged_dir, use_safetensors=True)
    reloaded.eval()
    merged_texts = families.generate_captions(reloaded, processor, spec, images, prompts, params.max_new_tokens)
    check = {"samples": len(records), "identical": adapter_texts == merged_texts,
             "adapter": adapter_texts, "merged": merged_texts}
    if not check["identical"]:
        print("sft: WARNING merged model and adapter generate different captions; see sft_result.json")
    return str(merged_dir), check


# --- CLI --------------------------------------------------------------------


def parse_bool(text: str) -> bool:
    """A boolean flag's value: true/false, 1/0 or yes/no, and nothing else (``Ture`` is an error, not False)."""
    value = str(text).strip().lower()
    if value in {"1", "true", "yes"}:
        return True
    if value in {"0", "false", "no"}:
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean: use true or false (or 1/0, yes/no)")


def configure_cli(parser: argparse.ArgumentParser) -> None:
    defaults = SFTParams()
    for f in fields(SFTParams):
        default, help_text = getattr(defaults, f.name), f.metadata.get("help", "")
        if isinstance(default, bool):
            parser.add_argument(f"--{f.name}", type=parse_bool, default=default, metavar="BOOL",
                                help=f"{help_text} (default {str(default).lower()})")
        else:
            parser.add_argument(f"--{f.name}", type=type(default), default=default,
                                help=f"{help_text} (default {default!r})")


def params_from_cli(args: argparse.Namespace) -> SFTParams:
    """``SFTParams`` from parsed flags, with paths read from the current directory (as every Unix tool does)."""
    values = {f.name: getattr(args, f.name) for f in fields(SFTParams)}
    for f in fields(SFTParams):
        if f.metadata.get("path") and values[f.name]:
            values[f.name] = str(resolve_cli_path(values[f.name]))
    if values["resume"] not in ("", "auto"):
        values["resume"] = str(resolve_cli_path(values["resume"]))
    if Path(values["model"]).expanduser().is_dir():  # a local checkpoint, named from the cwd
        values["model"] = str(resolve_cli_path(values["model"]))
    return SFTParams(**values)


def run_cli(args: argparse.Namespace) -> int:
    params = params_from_cli(args)
    try:
        result = train_sft(params)
    except (TokenBudgetError, FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"bvip sft: {err}", file=sys.stderr)
        return 2
    if result.eval:
        print(json.dumps({"presence": result.eval["presence"], "accuracy": result.eval["accuracy"]}, indent=2))
    print(f"sft: {result.global_step} steps in {result.train_seconds:.1f}s -> {result.output_dir}")
    return 0
