"""Preference tuning from the SFT adapter: ``bvip dpo``, with TRL's ``DPOTrainer``.

SFT teaches the schema; DPO should make the model prefer the *safe* caption over a nearly identical unsafe one
(the right side over the flipped one, the named hazard over the missing one). :func:`train_dpo`:

* starts the policy from the SFT adapter (trainable) on its base model. The reference is the same SFT model with
  no second copy of the weights: handed a ``PeftModel``, TRL copies the adapter into a frozen ``ref`` adapter and
  switches to it for the reference forward passes;
* feeds TRL batches built by the same family code as SFT (:class:`PreferenceCollator`): the prompt with the
  image, then the chosen and the rejected caption, each ending with the family's end token, so DPO scores the
  very tokens SFT trained. TRL's own vision collator renders the turns through the chat template instead;
* sets the training arguments explicitly (TRL's DPO defaults assume a GPU: bf16, gradient checkpointing and
  lr 1e-6) and keeps every pair column aside (``remove_unused_columns=False``), since ``error_type`` and
  ``source`` drive the reports;
* saves the adapter (the ``ref`` copy removed), the processor, ``dpo_params.json``, ``dpo_result.json`` and
  ``loss_curve.png`` in ``output_dir``, checkpoints every ``save_steps``, and resumes from them;
* with ``val_pairs``, scores those held-out pairs with the trained policy and the reference before the
  reference copy goes, into ``preference_report.json`` (:func:`held_out_report`).

Known TRL 1.16 behaviour designed around: ``lm_head`` trains only through ``modules_to_save`` (TRL refuses a LoRA
adapter on it); ``precompute_ref_log_probs`` refuses image data; unused columns would be dropped.

:func:`score_pairs` gives each pair's summed log-probabilities under a model, optionally with the image
replaced (:data:`IMAGE_VARIANTS`: a blank picture or the mirror image): :func:`preference_report` turns them into
preference accuracy and reward margins per source and error type, and the image-reliance check. A preference
that does not drop without the image was learned from the text (mDPO).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bvip_helpers import families
from bvip_helpers.io import resolve, write_json
from bvip_helpers.params import add_flags, from_flags, param

#: What the image-reliance check shows the model instead of the scene (``original`` is the scene itself).
IMAGE_VARIANTS = ("original", "blank", "mirror")
#: What a DPO run writes into its output_dir (``overwrite`` deletes exactly these; ``pairs/`` stays), the results
#: computed from the final adapter, and the files that mark a folder as holding a run.
RUN_OUTPUTS = ("adapter_model.safetensors", "adapter_config.json", "training_args.bin", "README.md", "tokenizer.json",
               "tokenizer_config.json", "chat_template.jinja", "processor_config.json", "preprocessor_config.json",
               "twin_meta.json", "dpo_params.json", "dpo_result.json", "loss_curve.png", "preference_report.json",
               "before_after_test.json", "preds_*.jsonl", "preds_*.jsonl.previous", "eval", "constrained",
               "checkpoint-*")
DERIVED_OUTPUTS = ("dpo_result.json", "loss_curve.png", "preference_report.json", "before_after_test.json",
                   "preds_*.jsonl", "preds_*.jsonl.previous", "eval", "constrained")
RUN_MARKERS = ("adapter_model.safetensors", "dpo_result.json", "checkpoint-*")
#: Error types whose rejected caption is the chosen one with a side swapped: a mirror image should turn them round.
SIDE_ERRORS = ("sidewalk_flipped", "road_flipped", "object_side_flipped")


@dataclass
class DPOParams:
    """Everything one DPO run needs; the ``bvip dpo`` flags mirror these names."""

    model: str = param("qwen2-vl-2b", "the base model the SFT adapter was trained on (registry name, hub id, folder)")
    adapter: str = param("", "the SFT adapter folder: policy and reference start from it", path=True)
    train_pairs: str = param("", "preference pairs JSONL (`bvip pairs`)", path=True)
    val_pairs: str = param("", "held-out pairs for the preference report (optional)", path=True)
    image_root: str = param("data/synthetic", "folder the pairs' image paths are relative to", path=True)
    output_dir: str = param("", "where the DPO adapter goes (default: runs/<model>/dpo)", path=True)
    beta: float = param(0.1, "how far the policy may move from the reference (higher: less)")
    loss_type: str = param("sigmoid", "comma list of TRL loss types; sigmoid,bco_pair,sft with weights is MPO")
    loss_weights: str = param("", "comma list of weights, one per loss type (default: all 1.0)")
    lr: float = param(5e-6, "peak learning rate (LoRA DPO on a 1-3B model: 5e-7 to 5e-6)")
    lr_scheduler: str = param("cosine", "transformers scheduler name")
    warmup: float = param(0.1, "warmup steps (>= 1) or a fraction of all steps (< 1)")
    epochs: float = param(1.0, "passes over the pairs (max_steps > 0 overrides it)")
    max_steps: int = param(-1, "optimizer steps; > 0 overrides epochs")
    batch_size: int = param(4, "pairs per device and step (each pair is two sequences)")
    grad_accum: int = param(1, "gradient accumulation")
    max_length: int = param(1024, "longest sequence in tokens; a longer one is refused, never truncated")
    optim: str = param("adamw_torch", "transformers optimizer name")
    seed: int = param(0, "seed of the data order")
    save_steps: int = param(0, "a checkpoint every N steps (0: only the final adapter)")
    save_total_limit: int = param(2, "checkpoints kept")
    logging_steps: int = param(5, "log every N steps")
    resume: str = param("", '"" (fresh), "auto" (latest complete checkpoint in output_dir) or a checkpoint folder')
    overwrite: bool = param(False, "train again into an output_dir that holds an earlier DPO run (its files are deleted)")
    example_cache_gb: float = param(2.0, "processed sequences kept in memory (0: none)")
    gradient_checkpointing: bool = param(False, "recompute activations in the backward pass: less memory (a GPU "
                                                "of 16-24 GB wants it for a 2-3B model), about a third slower")
    device: str = param("auto", "auto (CUDA, else MPS, else CPU) | cuda | mps | cpu")
    dtype: str = param("auto", "auto (bf16 from compute capability 8.0, fp16 below, fp32 on the CPU) | bf16 | fp16 | fp32")

    @property
    def model_slug(self) -> str:
        return Path(str(self.model).rstrip("/")).name

    def resolved_output_dir(self) -> Path:
        return resolve(self.output_dir or f"runs/{self.model_slug}/dpo")


@dataclass
class DPOResult:
    output_dir: str
    global_step: int
    train_seconds: float
    pairs: int
    losses: list[tuple[int, float]] = field(default_factory=list)
    reward_accuracy: list[tuple[int, float]] = field(default_factory=list)
    token_budget: dict[str, Any] = field(default_factory=dict)
    loss_curve: str | None = None
    preference_report: str | None = None  # with --val_pairs: the held-out report (see held_out_report)


# --- Batches -----------------------------------------------------------------------------


def _response_record(pair: Mapping[str, Any], side: str) -> dict[str, Any]:
    return {"image": pair["image"], "prompt": pair["prompt"], "response": pair[side]}


class PreferenceCollator:
    """Pairs -> the batch TRL's ``DPOTrainer`` expects: the chosen rows, then the rejected rows, with
    ``completion_mask`` marking the caption tokens (and the end token) that the log-probabilities sum over.

    Each row is what :class:`bvip_helpers.sft.FamilyCollator` builds for SFT (processed once and cached), so a
    caption is tokenized for DPO exactly as SFT trained it.
    """

    def __init__(self, processor: Any, spec: Any, image_root: str | Path, max_length: int | None,
                 cache_bytes: int = 2 * 1024**3):
        from bvip_helpers.sft import FamilyCollator

        self.rows = FamilyCollator(processor, spec, image_root, max_length, cache_bytes=cache_bytes)

    def __call__(self, pairs: list[dict[str, Any]]) -> dict[str, Any]:
        records = [_response_record(p, "chosen") for p in pairs] + [_response_record(p, "rejected") for p in pairs]
        batch = self.rows(records)
        batch["completion_mask"] = (batch.pop("labels") != families.IGNORE_INDEX).long()
        return batch


def _check_family(spec: Any) -> None:
    if getattr(spec, "family", "") in families.ENCODER_DECODER_FAMILIES | families.CAPTION_ONLY_FAMILIES:
        raise ValueError(f"{spec.name}: DPO here trains decoder-only chat models (the registry's trl_sft families); "
                         f"{spec.family} has no prompt-then-answer sequence for TRL's DPOTrainer")


def read_pairs(path: str | Path) -> list[dict[str, Any]]:
    """Pairs from a JSONL file; a line without image, prompt, chosen or rejected is an error naming the line."""
    from bvip_helpers.io import numbered_jsonl

    if not resolve(path).is_file():
        raise FileNotFoundError(f"{path}: no such pairs file; make the pairs with `bvip pairs`")
    pairs = []
    for number, record in numbered_jsonl(resolve(path)):
        missing = [k for k in ("image", "prompt", "chosen", "rejected") if not isinstance(record.get(k), str)]
        if missing:
            raise ValueError(f"{path}: line {number} is not a preference pair (no {', '.join(missing)}); "
                             "make the pairs with `bvip pairs`")
        pairs.append(record)
    if not pairs:
        raise ValueError(f"{path}: no pairs")
    return pairs


# --- Training ------------------------------------------------------------------------------


def load_policy(params: DPOParams) -> tuple[Any, Any, Any]:
    """(PeftModel with the SFT adapter trainable, processor, spec)."""
    from bvip_helpers.registry import get_spec, load_model_and_processor

    if not params.adapter or not (resolve(params.adapter) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"--adapter {params.adapter!r}: not a PEFT adapter folder; DPO starts from the SFT "
                                "adapter (train it with notebook 03 or `bvip sft`)")
    import torch

    from bvip_helpers import devices

    spec = get_spec(params.model)
    _check_family(spec)
    device = devices.resolve_device(params.device)
    # 16-bit frozen weights on a GPU; the Trainer places them and autocasts (as for SFT)
    model, processor = load_model_and_processor(spec, adapter=resolve(params.adapter), trainable_adapter=True,
                                                device=device, dtype=devices.resolve_dtype(params.dtype, device),
                                                place=False)
    for parameter in model.parameters():  # what trains stays fp32 (the LoRA matrices, lm_head under modules_to_save)
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
    return model, processor, spec


def _dpo_config(params: DPOParams, output_dir: Path) -> Any:
    from trl import DPOConfig

    from bvip_helpers import devices, sft

    losses = [t.strip() for t in params.loss_type.split(",") if t.strip()]
    weights = [float(w) for w in params.loss_weights.split(",") if w.strip()] or None
    if weights is not None and len(weights) != len(losses):
        raise ValueError(f"--loss_weights has {len(weights)} values for {len(losses)} loss types ({params.loss_type})")
    device = devices.resolve_device(params.device)
    precision = devices.mixed_precision_flags(devices.resolve_dtype(params.dtype, device), device)
    return DPOConfig(
        output_dir=str(output_dir), per_device_train_batch_size=params.batch_size,
        gradient_accumulation_steps=params.grad_accum, learning_rate=params.lr, num_train_epochs=params.epochs,
        max_steps=params.max_steps, lr_scheduler_type=params.lr_scheduler, warmup_steps=params.warmup,
        optim=params.optim, seed=params.seed, data_seed=params.seed, logging_steps=params.logging_steps,
        logging_first_step=True, report_to="none", save_strategy="steps" if params.save_steps > 0 else "no",
        save_steps=params.save_steps if params.save_steps > 0 else 500, save_total_limit=params.save_total_limit,
        remove_unused_columns=False, use_cpu=device == "cpu", **precision,
        **sft._checkpointing_args(params.gradient_checkpointing),
        beta=params.beta, loss_type=losses,
        loss_weights=weights, max_length=None, precompute_ref_log_probs=False, disable_tqdm=False)


@dataclass
class DPORun:
    """A ready ``DPOTrainer`` and what it was built from."""

    trainer: Any
    pairs: list[dict[str, Any]]
    processor: Any
    spec: Any
    budget: dict[str, Any]


def check_params(params: DPOParams) -> None:
    """Settings that would train nothing, or contradict each other, as a ``ValueError`` naming the flag."""
    if params.max_steps == 0 or params.max_steps < -1:
        raise ValueError(f"--max_steps {params.max_steps} would save the SFT adapter unchanged; pass a positive "
                         "number, or -1 to train for --epochs")
    if params.resume and params.overwrite:
        raise ValueError("--resume continues the earlier run and --overwrite deletes it: pass only one of them")
    if params.beta <= 0:
        raise ValueError(f"--beta {params.beta}: must be positive")


def build_dpo_trainer(params: DPOParams, callbacks: list[Any] | None = None) -> DPORun:
    """The policy (SFT adapter, trainable), the pre-flight token budget, our collator and TRL's trainer."""
    from datasets import Dataset
    from trl import DPOTrainer

    from bvip_helpers import sft
    from bvip_helpers.nb import seed_everything

    seed_everything(params.seed)
    check_params(params)
    pairs = read_pairs(params.train_pairs)
    model, processor, spec = load_policy(params)
    image_root = resolve(params.image_root)
    sides = [_response_record(p, s) for p in pairs for s in ("chosen", "rejected")]
    budget = sft.token_budget(processor, spec, sides, image_root, params.max_length)
    collator = PreferenceCollator(processor, spec, image_root, params.max_length,
                                  cache_bytes=int(params.example_cache_gb * 1024**3))
    columns = ("id", "image", "prompt", "chosen", "rejected", "source", "error_type")
    dataset = Dataset.from_list([{k: str(p.get(k) or "") for k in columns} for p in pairs])
    trainer = DPOTrainer(model=model, ref_model=None, args=_dpo_config(params, params.resolved_output_dir()),
                         train_dataset=dataset, data_collator=collator, processing_class=processor,
                         callbacks=[sft._ProcessorBesideCheckpoints(processor), *(callbacks or [])])
    return DPORun(trainer, pairs, processor, spec, budget)


def train_dpo(params: DPOParams, callbacks: list[Any] | None = None) -> DPOResult:
    """One DPO run end to end (see the module docstring for what lands in ``output_dir``)."""
    from bvip_helpers import sft

    check_params(params)
    read_pairs(params.train_pairs)  # a bad pairs file is named before anything is deleted or loaded
    resume_from = sft.prepare_output_dir(params, outputs=RUN_OUTPUTS, derived=DERIVED_OUTPUTS, markers=RUN_MARKERS,
                                         kind="DPO")  # before any loading: a refusal costs nothing
    run = build_dpo_trainer(params, callbacks)
    trainer, output_dir = run.trainer, params.resolved_output_dir()
    main = trainer.is_world_process_zero()
    if main:
        print(sft.format_budget(run.budget))
        print(f"dpo: {len(run.pairs)} pairs, beta {params.beta}, loss {params.loss_type}, reference = the SFT adapter")
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.perf_counter() - start
    history = trainer.state.log_history
    result = DPOResult(
        output_dir=str(output_dir), global_step=trainer.state.global_step, train_seconds=seconds,
        pairs=len(run.pairs), losses=[(int(e["step"]), float(e["loss"])) for e in history if "loss" in e],
        reward_accuracy=[(int(e["step"]), float(e["rewards/accuracies"])) for e in history
                         if "rewards/accuracies" in e],
        token_budget=run.budget)
    policy = trainer.accelerator.unwrap_model(trainer.model)
    if params.val_pairs and main and "ref" in policy.peft_config:
        report = held_out_report(policy, run.processor, run.spec, read_pairs(params.val_pairs),
                                 resolve(params.image_root), beta=params.beta)
        result.preference_report = str(write_json(output_dir / "preference_report.json", report))
        print(f"dpo: held-out preference accuracy {report['held_out']['sft']['all']['preference_accuracy']} (SFT) -> "
              f"{report['held_out']['dpo']['all']['preference_accuracy']} (DPO) -> {result.preference_report}")
    if "ref" in policy.peft_config:
        policy.delete_adapter("ref")  # the frozen copy of the SFT adapter; not part of the result
    trainer.save_model(str(output_dir))
    if main:
        run.processor.save_pretrained(output_dir)
        sft._copy_twin_meta(run.spec, output_dir)
        write_json(output_dir / "dpo_params.json", {**asdict(params), "family": run.spec.family})
        result.loss_curve = str(sft.save_loss_curve(result.losses, output_dir / "loss_curve.png"))
        write_json(output_dir / "dpo_result.json", asdict(result))
    return result


# --- Scoring pairs ---------------------------------------------------------------------------


def vary_image(image: Any, variant: str) -> Any:
    """The scene itself, a blank mid-grey picture of its size, or its mirror image."""
    from PIL import Image, ImageOps

    if variant == "original":
        return image
    if variant == "blank":
        return Image.new("RGB", image.size, (128, 128, 128))
    if variant == "mirror":
        return ImageOps.mirror(image)
    raise ValueError(f"image variant {variant!r}: choose one of {', '.join(IMAGE_VARIANTS)}")


def score_pairs(model: Any, processor: Any, spec: Any, pairs: Sequence[Mapping[str, Any]],
                image_root: str | Path, *, variant: str = "original", batch_size: int = 8,
                progress: bool = False) -> list[tuple[float, float]]:
    """(log p(chosen), log p(rejected)) of every pair under ``model``, summed over the caption tokens and the end
    token, with the image as ``variant`` shows it."""
    import torch
    from tqdm.auto import tqdm

    image_root = resolve(image_root)
    device = getattr(model, "device", "cpu")
    out: list[tuple[float, float]] = []
    for begin in tqdm(range(0, len(pairs), batch_size), desc=f"score pairs ({variant})", disable=not progress):
        batch = pairs[begin: begin + batch_size]
        images = [vary_image(families.load_record_image(image_root, dict(p)), variant) for p in batch]
        inputs = families.collate_from_parts(processor, spec, images * 2, [p["prompt"] for p in batch] * 2,
                                             [p["chosen"] for p in batch] + [p["rejected"] for p in batch])
        labels = inputs.pop("labels").to(device)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        if inputs.get("pixel_values") is not None and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        with torch.no_grad():
            logits = model(**inputs, use_cache=False).logits[:, :-1].float()
        targets = labels[:, 1:]
        mask = targets != families.IGNORE_INDEX
        token_logps = torch.gather(logits.log_softmax(-1), 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        sums = (token_logps * mask).sum(-1).tolist()
        out += list(zip(sums[: len(batch)], sums[len(batch):], strict=True))
    return out


def _group_key(pair: Mapping[str, Any]) -> str:
    return f"{pair.get('source', '?')}:{pair['error_type']}" if pair.get("error_type") else str(pair.get("source", "?"))


def preference_report(pairs: Sequence[Mapping[str, Any]], policy: Sequence[tuple[float, float]],
                      reference: Sequence[tuple[float, float]] | None = None, beta: float = 0.1) -> dict[str, Any]:
    """Preference accuracy (log p(chosen) > log p(rejected)) and, with ``reference``, DPO reward margins
    (beta times the policy's log-ratio gain over the reference), overall and per source and error type."""
    groups: dict[str, list[int]] = {"all": list(range(len(pairs)))}
    for i, pair in enumerate(pairs):
        groups.setdefault(_group_key(pair), []).append(i)
    report = {}
    for name, index in sorted(groups.items()):
        margins = [policy[i][0] - policy[i][1] for i in index]
        entry: dict[str, Any] = {"pairs": len(index),
                                 "preference_accuracy": round(sum(m > 0 for m in margins) / len(index), 3),
                                 "logp_margin_mean": round(sum(margins) / len(index), 3)}
        if reference is not None:
            rewards = [beta * ((policy[i][0] - reference[i][0]) - (policy[i][1] - reference[i][1])) for i in index]
            entry["reward_margin_mean"] = round(sum(rewards) / len(index), 4)
            entry["reward_accuracy"] = round(sum(r > 0 for r in rewards) / len(index), 3)
        report[name] = entry
    return report


_MIRROR = {"left": "right", "right": "left"}


def mirror_makes_rejected_true(pair: Mapping[str, Any]) -> bool:
    """Whether the mirror image of the scene makes the rejected side of a side-error pair the true one.

    Only then should a model that reads the picture turn its preference round: a Sidewalk flipped from left to
    right, yes; one moved from the centre to a side, or a Road moved from the front, no (the mirror keeps
    them where they were). For an object, the mirrored sides of the chosen caption must be the rejected ones.
    """
    from collections import Counter

    from bvip_helpers import schema

    if pair.get("error_type") not in SIDE_ERRORS:
        return False
    a, b = schema.parse_caption(pair["chosen"]), schema.parse_caption(pair["rejected"])
    fields = [k for k in schema.FIELD_LABELS if a.fields[k] != b.fields[k]]
    objects = [k for k in set(a.near) | set(b.near) if a.near.get(k) != b.near.get(k)]
    if len(fields) + len(objects) != 1:
        return False
    if fields:
        return a.fields[fields[0]] in _MIRROR and b.fields[fields[0]] == _MIRROR[a.fields[fields[0]]]
    mirrored = Counter(_MIRROR.get(p, p) for p in a.near.get(objects[0], []))
    return mirrored == Counter(b.near.get(objects[0], []))


def image_reliance(pairs: Sequence[Mapping[str, Any]], scores: Mapping[str, Sequence[tuple[float, float]]]) -> dict:
    """Per error type: preference accuracy with the scene, a blank picture and the mirror image, and, for the
    side errors, the share of the pairs whose preference the mirror turns round, out of those where the mirror
    makes the rejected caption true (:func:`mirror_makes_rejected_true`; ``mirror_turnable`` counts them).
    ``scores`` maps each variant to :func:`score_pairs`."""
    out: dict[str, Any] = {}
    kinds = sorted({p.get("error_type") for p in pairs if p.get("error_type")})
    for kind in ["all", *kinds]:
        index = [i for i, p in enumerate(pairs) if kind == "all" or p.get("error_type") == kind]
        if not index:
            continue
        entry: dict[str, Any] = {"pairs": len(index)}
        for variant, values in scores.items():
            margins = [values[i][0] - values[i][1] for i in index]
            entry[variant] = {"preference_accuracy": round(sum(m > 0 for m in margins) / len(index), 3),
                              "logp_margin_mean": round(sum(margins) / len(index), 3)}
        turnable = [i for i in index if mirror_makes_rejected_true(pairs[i])]
        if kind in SIDE_ERRORS and "mirror" in scores and "original" in scores:
            turned = sum((scores["original"][i][0] > scores["original"][i][1])
                         and (scores["mirror"][i][0] < scores["mirror"][i][1]) for i in turnable)
            entry["mirror_turnable"] = len(turnable)
            entry["turned_by_mirror"] = round(turned / len(turnable), 3) if turnable else None
        out[kind] = entry
    return out


def held_out_report(policy: Any, processor: Any, spec: Any, pairs: Sequence[Mapping[str, Any]],
                    image_root: str | Path, *, beta: float = 0.1, policy_adapter: str = "default",
                    reference_adapter: str = "ref") -> dict[str, Any]:
    """The held-out pairs scored by the policy and the reference (two adapters of one ``PeftModel``):
    :func:`preference_report` for both, and :func:`image_reliance` of the policy (scene, blank, mirror)."""
    was_training = policy.training
    policy.eval()
    try:
        policy.set_adapter(reference_adapter)
        reference = score_pairs(policy, processor, spec, pairs, image_root)
        policy.set_adapter(policy_adapter)
        scores = {variant: score_pairs(policy, processor, spec, pairs, image_root, variant=variant)
                  for variant in IMAGE_VARIANTS}
    finally:
        policy.set_adapter(policy_adapter)
        policy.train(was_training)
    return {"held_out": {"sft": preference_report(pairs, reference),
                         "dpo": preference_report(pairs, scores["original"], reference, beta=beta)},
            "image_reliance": image_reliance(pairs, scores)}


def load_scoring_model(model: str, adapters: Mapping[str, str | Path], *, device: str = "auto",
                       dtype: str = "auto") -> tuple[Any, Any, Any, Callable[[str], None]]:
    """One base model with several adapters (e.g. ``{"sft": ..., "dpo": ...}``) and a function that switches
    between them: two models scored without two copies of the base weights."""
    from peft import PeftModel

    from bvip_helpers.registry import get_spec, load_model_and_processor

    spec = get_spec(model)
    names = list(adapters)
    base, processor = load_model_and_processor(spec, device=device, dtype=dtype)
    peft_model = PeftModel.from_pretrained(base, str(resolve(adapters[names[0]])), adapter_name=names[0],
                                           is_trainable=False)
    for name in names[1:]:
        peft_model.load_adapter(str(resolve(adapters[name])), adapter_name=name, is_trainable=False)
    peft_model.eval()
    return peft_model, processor, spec, peft_model.set_adapter


# --- CLI -----------------------------------------------------------------------------------------


def configure_cli(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, DPOParams)


def run_cli(args: argparse.Namespace) -> int:
    from bvip_helpers.registry import UnknownModelError

    params = from_flags(args, DPOParams)
    try:
        result = train_dpo(params)
    except (FileNotFoundError, ValueError, RuntimeError, UnknownModelError) as err:
        print(f"bvip dpo: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"global_step": result.global_step, "seconds": round(result.train_seconds, 1),
                      "output_dir": result.output_dir}))
    return 0

