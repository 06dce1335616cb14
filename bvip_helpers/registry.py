"""The model zoo: one :class:`ModelSpec` per model the course compares, and the one loader for all of them.

Every HF-native entry is trained by the same code path (``bvip sft``); the entry only says
what differs between architectures: which class loads it, how the prompt is built, which
linear layers get LoRA, what stays frozen, how big the images are and which batch recipe
fits a 16 GB or an 80 GB GPU. Export-only entries train in their original repositories
(``bvip export``); zero-shot entries only caption, some of them through a server (``bvip predict --backend
ollama|openai``, :mod:`bvip_helpers.backends`); the tiny ``tiny-<family>`` twins are random-weight local copies of each
HF family (``bvip tiny-model``) so that every code path runs offline on a CPU.

Hub ids and classes were checked against the Transformers model docs (see ``docs/models.md``)
and against the classes shipped in the installed ``transformers``.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bvip_helpers.io import resolve, write_text_atomic

# --- Spec -------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """Batch settings that fit one GPU size (effective batch = per_device_batch_size * grad_accum).

    ``bvip sft --recipe 16gb|24gb|80gb|auto`` applies them (:func:`bvip_helpers.sft.effective_params`);
    every recipe assumes gradient checkpointing and a ``max_length`` of 1024 tokens.
    """

    per_device_batch_size: int
    grad_accum: int
    dtype: str  # "bf16" | "fp16" | "fp32"
    load_in_4bit: bool = False
    gradient_checkpointing: bool = True

    def short(self) -> str:
        quant = " 4-bit" if self.load_in_4bit else ""
        return f"{self.per_device_batch_size}x{self.grad_accum} {self.dtype}{quant}"


@dataclass(frozen=True)
class ModelSpec:
    """Everything the trainer, predictor and exporters need to know about one model."""

    name: str
    hub_id: str  # hub repo id, or a repo-relative local dir for tiny twins
    family: str | None  # twin family key; None for export-only models
    model_class: str  # class name in transformers (or the original repo's class for export-only)
    processor_class: str
    licence: str
    prompt_style: str  # "chat" | "prefix" | "none"
    task_prefix: str | None  # PaliGemma "caption en", Florence task token, None otherwise
    trainer: str  # "trl_sft" | "collator_trainer" | "export"
    lora_target_modules: str | None  # PEFT regex (full match) over module names
    frozen_modules: tuple[str, ...]  # module-name prefixes kept frozen even in full fine-tuning
    image_budget: dict[str, Any] = field(default_factory=dict)  # image/video processor settings, see load_processor
    image_note: str = ""  # fixed input size etc., for people
    recipes: dict[str, Recipe] = field(default_factory=dict)  # "16gb" / "24gb" / "80gb" / "cpu"
    trust_remote_code_needed: bool = False
    exporter: str | None = None  # "internvl" | "openflamingo" | "mobilevlm" | "moondream"
    notes: str = ""
    backend: str = "transformers"  # the bvip predict backend that runs it (bvip_helpers.backends)
    endpoint: str | None = None  # a served model's default base URL (--base_url overrides it)

    @property
    def is_local(self) -> bool:
        """True for twins and local checkpoints (a path, not a hub id)."""
        return self.hub_id.startswith(("runs/", "models/", "./", "/", "~")) or Path(self.hub_id).is_absolute()

    @property
    def is_export_only(self) -> bool:
        return self.trainer == "export"

    @property
    def is_zero_shot_only(self) -> bool:
        """Captions zero-shot and is never fine-tuned here (served models, BLIP-2 FlanT5)."""
        return self.trainer == "zero-shot"


# --- LoRA targets, per architecture ------------------------------------------
# Vision towers reuse the names q_proj/fc1/..., so every pattern is anchored on the
# language-model submodule. PEFT full-matches a string target against module names.
_LLAMA_LIKE = "(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
_BART_OPT_LIKE = "(q_proj|k_proj|v_proj|out_proj|fc1|fc2)"

LORA_TARGETS: dict[str, str] = {
    "qwen2-vl": rf".*language_model.*\.{_LLAMA_LIKE}",
    "qwen2.5-vl": rf".*language_model.*\.{_LLAMA_LIKE}",
    "smolvlm": rf".*text_model.*\.{_LLAMA_LIKE}",
    "paligemma": rf".*language_model.*\.{_LLAMA_LIKE}",
    "florence2": rf".*language_model.*\.{_BART_OPT_LIKE}",
    "deepseek-vl": rf".*language_model.*\.{_LLAMA_LIKE}",
    "internvl": rf".*language_model.*\.{_LLAMA_LIKE}",
    "janus": rf".*language_model.*\.{_LLAMA_LIKE}",
    "blip": r".*text_decoder.*\.(query|key|value|dense)",
    "blip2": rf".*language_model.*\.{_BART_OPT_LIKE}",
    "llava-onevision": rf".*language_model.*\.{_LLAMA_LIKE}",
}

#: module-name prefixes (as in ``model.named_modules()``) kept frozen.
FROZEN: dict[str, tuple[str, ...]] = {
    "qwen2-vl": ("model.visual",),
    "qwen2.5-vl": ("model.visual",),
    "smolvlm": ("model.vision_model",),
    "paligemma": ("model.vision_tower",),
    "florence2": ("model.vision_tower",),
    "deepseek-vl": ("model.vision_model",),
    "internvl": ("model.vision_tower",),
    "janus": ("model.vision_model", "model.vqmodel", "model.generation_embeddings",
              "model.generation_aligner", "model.generation_head"),
    "blip": ("vision_model",),
    "blip2": ("vision_model",),
    "llava-onevision": ("model.vision_tower",),
}

#: config.json ``model_type`` -> family (SmolVLM v1 checkpoints are Idefics3 architecture).
MODEL_TYPE_TO_FAMILY: dict[str, str] = {
    "qwen2_vl": "qwen2-vl", "qwen2_5_vl": "qwen2.5-vl", "smolvlm": "smolvlm", "idefics3": "smolvlm",
    "paligemma": "paligemma", "florence2": "florence2", "deepseek_vl": "deepseek-vl", "internvl": "internvl",
    "janus": "janus", "blip": "blip", "blip-2": "blip2", "llava_onevision": "llava-onevision",
}

FAMILIES: tuple[str, ...] = tuple(LORA_TARGETS)
DECODER_ONLY = ("qwen2-vl", "qwen2.5-vl", "smolvlm", "deepseek-vl", "internvl", "janus", "llava-onevision")


def _trainer(family: str) -> str:
    return "trl_sft" if family in DECODER_ONLY else "collator_trainer"


def _r(bs: int, ga: int, dtype: str, q4: bool = False) -> Recipe:
    return Recipe(bs, ga, dtype, q4)


def _hf(name: str, hub_id: str, family: str, model_class: str, processor_class: str, licence: str, *,
        prompt_style: str = "chat", task_prefix: str | None = None, image_budget: dict[str, Any] | None = None,
        image_note: str = "", r16: Recipe, r24: Recipe, r80: Recipe, notes: str = "") -> ModelSpec:
    return ModelSpec(
        name=name, hub_id=hub_id, family=family, model_class=model_class, processor_class=processor_class,
        licence=licence, prompt_style=prompt_style, task_prefix=task_prefix, trainer=_trainer(family),
        lora_target_modules=LORA_TARGETS[family], frozen_modules=FROZEN[family], image_budget=image_budget or {},
        image_note=image_note, recipes={"16gb": r16, "24gb": r24, "80gb": r80}, notes=notes,
    )


#: Qwen's min/max_pixels as transformers 5 spells them (256-640 visual tokens of 28x28 pixels).
_QWEN_PIXELS = {"size": {"shortest_edge": 256 * 28 * 28, "longest_edge": 640 * 28 * 28}}

# 16 GB recipes use fp16 because the common 16 GB card (Colab T4) has no bf16; 24 GB cards (L4, A10, RTX 3090/4090)
# and 80 GB cards (A100, H100) have it. The 24 GB recipes load 2-3B models in 16 bit (LoRA), not in 4 bit.
_HF_NATIVE: list[ModelSpec] = [
    _hf("qwen2-vl-2b", "Qwen/Qwen2-VL-2B-Instruct", "qwen2-vl", "Qwen2VLForConditionalGeneration",
        "Qwen2VLProcessor", "apache-2.0", image_budget=_QWEN_PIXELS, image_note="dynamic resolution; 256-640 visual tokens", r16=_r(1, 16, "fp16", True),
        r24=_r(4, 4, "bf16"), r80=_r(8, 2, "bf16"), notes="HF-first baseline; TRL cookbook recipe."),
    _hf("qwen2.5-vl-3b", "Qwen/Qwen2.5-VL-3B-Instruct", "qwen2.5-vl", "Qwen2_5_VLForConditionalGeneration",
        "Qwen2_5_VLProcessor", "qwen-research (non-commercial)",
        image_budget=_QWEN_PIXELS, image_note="dynamic resolution; 256-640 visual tokens", r16=_r(1, 16, "fp16", True),
        r24=_r(2, 8, "bf16"), r80=_r(8, 2, "bf16"), notes="Used by the DPO weak-to-strong seed pipeline."),
    _hf("smolvlm2-2.2b", "HuggingFaceTB/SmolVLM2-2.2B-Instruct", "smolvlm", "SmolVLMForConditionalGeneration",
        "SmolVLMProcessor", "apache-2.0", image_budget={"size": {"longest_edge": 768}},
        image_note="longest edge 768, split into 384 px tiles", r16=_r(1, 16, "fp16", True), r24=_r(2, 8, "bf16"),
        r80=_r(8, 2, "bf16"), notes="Model card: load, infer and fine-tune with Transformers."),
    _hf("smolvlm-256m", "HuggingFaceTB/SmolVLM-256M-Instruct", "smolvlm", "Idefics3ForConditionalGeneration",
        "Idefics3Processor", "apache-2.0", image_budget={"size": {"longest_edge": 512}},
        image_note="longest edge 512, 512 px tiles", r16=_r(8, 2, "fp16"), r24=_r(16, 1, "bf16"),
        r80=_r(32, 1, "bf16"), notes="Small real model; config is Idefics3 architecture."),
    _hf("paligemma2-3b", "google/paligemma2-3b-pt-224", "paligemma", "PaliGemmaForConditionalGeneration",
        "PaliGemmaProcessor", "gemma (gated: accept on the hub)", prompt_style="prefix", task_prefix="caption en",
        image_note="fixed 224x224 (256 image tokens)", r16=_r(2, 8, "fp16", True), r24=_r(4, 4, "bf16"),
        r80=_r(16, 1, "bf16"), notes="pt checkpoint is meant for fine-tuning; labels via processor(suffix=...)."),
    _hf("florence2-base", "florence-community/Florence-2-base", "florence2", "Florence2ForConditionalGeneration",
        "Florence2Processor", "mit", prompt_style="prefix", task_prefix="<MORE_DETAILED_CAPTION>",
        image_note="fixed 768x768", r16=_r(8, 2, "fp16"), r24=_r(16, 1, "bf16"), r80=_r(32, 1, "bf16"),
        notes="Native Transformers port (no remote code); encoder-decoder."),
    _hf("deepseek-vl-1.3b", "deepseek-community/deepseek-vl-1.3b-chat", "deepseek-vl",
        "DeepseekVLForConditionalGeneration", "DeepseekVLProcessor", "deepseek (model licence)",
        image_note="fixed 384x384", r16=_r(2, 8, "fp16"), r24=_r(8, 2, "bf16"), r80=_r(16, 1, "bf16"),
        notes="Converted checkpoint of deepseek-ai/deepseek-vl-1.3b-chat."),
    _hf("internvl3-1b", "OpenGVLab/InternVL3-1B-hf", "internvl", "InternVLForConditionalGeneration",
        "InternVLProcessor", "apache-2.0 (hub card of -hf lists qwen)", image_budget={"crop_to_patches": False},
        image_note="448 px thumbnail only (crop_to_patches=False) to bound tokens", r16=_r(2, 8, "fp16"),
        r24=_r(8, 2, "bf16"), r80=_r(16, 1, "bf16"), notes="Native class; InternVL2 original repo is the export-only route."),
    _hf("janus-pro-1b", "deepseek-community/Janus-Pro-1B", "janus", "JanusForConditionalGeneration",
        "JanusProcessor", "mit (+ DeepSeek model licence)", image_note="fixed 384x384", r16=_r(2, 8, "fp16"),
        r24=_r(8, 2, "bf16"), r80=_r(16, 1, "bf16"), notes="Understanding head only; image generation modules stay frozen."),
    _hf("blip-base", "Salesforce/blip-image-captioning-base", "blip", "BlipForConditionalGeneration",
        "BlipProcessor", "bsd-3-clause", prompt_style="none", image_note="fixed 384x384",
        r16=_r(16, 1, "fp16"), r24=_r(32, 1, "bf16"), r80=_r(64, 1, "bf16"), notes="Unconditional captioner; learns the schema as text."),
    _hf("blip2-opt-2.7b", "Salesforce/blip2-opt-2.7b", "blip2", "Blip2ForConditionalGeneration",
        "Blip2Processor", "mit", prompt_style="none", image_note="fixed 224x224", r16=_r(2, 8, "fp16", True),
        r24=_r(4, 4, "bf16"), r80=_r(16, 1, "bf16"), notes="Q-Former + OPT-2.7B; LoRA on OPT."),
    replace(_hf("blip2-flan-t5-xl", "Salesforce/blip2-flan-t5-xl", "blip2", "Blip2ForConditionalGeneration",
                "Blip2Processor", "mit", prompt_style="none", image_note="fixed 224x224", r16=_r(2, 8, "fp16", True),
                r24=_r(4, 4, "bf16"), r80=_r(16, 1, "bf16")), trainer="zero-shot", lora_target_modules=None,
            notes="Zero-shot only: FlanT5-XL writes short captions, so it serves as the first expert of a chain "
            "(bvip predict --backend chain); its encoder-decoder LM is not what the blip2 SFT batches build."),
    _hf("blip-large", "Salesforce/blip-image-captioning-large", "blip", "BlipForConditionalGeneration",
        "BlipProcessor", "bsd-3-clause", prompt_style="none", image_note="fixed 384x384",
        r16=_r(8, 2, "fp16"), r24=_r(16, 1, "bf16"), r80=_r(32, 1, "bf16"),
        notes="CLIP-Interrogator's caption model (bvip predict --backend clip-interrogator)."),
    _hf("llava-onevision-0.5b", "llava-hf/llava-onevision-qwen2-0.5b-ov-hf", "llava-onevision",
        "LlavaOnevisionForConditionalGeneration", "LlavaOnevisionProcessor", "apache-2.0",
        image_note="anyres up to 3x3 tiles of 384", r16=_r(2, 8, "fp16"), r24=_r(8, 2, "bf16"),
        r80=_r(16, 1, "bf16"),
        notes="Qwen2-0.5B language model."),
]

#: the canonical real model of each family; tiny twins and local dirs copy its settings.
FAMILY_REFERENCE: dict[str, str] = {
    "qwen2-vl": "qwen2-vl-2b", "qwen2.5-vl": "qwen2.5-vl-3b", "smolvlm": "smolvlm2-2.2b",
    "paligemma": "paligemma2-3b", "florence2": "florence2-base", "deepseek-vl": "deepseek-vl-1.3b",
    "internvl": "internvl3-1b", "janus": "janus-pro-1b", "blip": "blip-base", "blip2": "blip2-opt-2.7b",
    "llava-onevision": "llava-onevision-0.5b",
}
DEFAULT_MODEL = "tiny-qwen2-vl"
TINY_DIR = "runs/models"
#: the tiny Qwen2-VL twin pre-trained as a generic captioner: the CPU demo's base model, committed under
#: ``models/`` like a downloaded checkpoint (``bvip demo base`` rebuilds it; ``docs/demo.md``).
TINY_BASE = "tiny-qwen2-vl-base"
TINY_BASE_DIR = f"models/{TINY_BASE}"
#: written by ``bvip_helpers.demo.twins`` into every twin (and copied by sft into models trained from one).
TWIN_META_FILE = "twin_meta.json"


def _tiny(reference: ModelSpec) -> ModelSpec:
    family = reference.family
    return replace(
        reference, name=f"tiny-{family}", hub_id=f"{TINY_DIR}/tiny-{family}", licence="n/a (random weights, local)",
        image_budget={}, recipes={"cpu": Recipe(2, 1, "fp32", False, False)},
        notes=f"Offline twin of {reference.hub_id}; build with `bvip tiny-model --family {family}`."
        + (" CPU demo default." if f"tiny-{family}" == DEFAULT_MODEL else ""),
    )


def _export(name: str, hub_id: str, exporter: str | None, model_class: str, licence: str, *, remote: bool,
            notes: str) -> ModelSpec:
    return ModelSpec(
        name=name, hub_id=hub_id, family=None, model_class=model_class, processor_class="(original repo)",
        licence=licence, prompt_style="chat", task_prefix=None, trainer="export", lora_target_modules=None,
        frozen_modules=(), trust_remote_code_needed=remote, exporter=exporter, notes=notes,
    )


_EXPORT_ONLY: list[ModelSpec] = [
    _export("internvl2-1b", "OpenGVLab/InternVL2-1B", "internvl", "InternVLChatModel (remote code)", "mit",
            remote=True, notes="Train with InternVL's internvl_chat finetune scripts (conversation JSONL + meta)."),
    _export("openflamingo-3b", "openflamingo/OpenFlamingo-3B-vitl-mpt1b", "openflamingo",
            "open_flamingo.Flamingo", "mit", remote=False,
            notes="Not a Transformers checkpoint; train with open_flamingo on WebDataset shards."),
    _export("mobilevlm-v2-1.7b", "mtgv/MobileVLM_V2-1.7B", "mobilevlm", "MobileLlamaForCausalLM (original repo)",
            "apache-2.0", remote=True, notes="Train with the MobileVLM repo (LLaVA-style JSON)."),
    _export("moondream2", "vikhyatk/moondream2", "moondream", "HfMoondream (remote code)", "apache-2.0",
            remote=True, notes="Fine-tune with moondream/finetune/finetune_text.py."),
    _export("janus-1.3b", "deepseek-ai/Janus-1.3B", None, "MultiModalityCausalLM (janus repo)",
            "mit (+ DeepSeek model licence)", remote=True,
            notes="Original-weights route: Align-Anything (scripts/janus_sft.sh) with a dataset template over "
            "bvpi_sft_*.jsonl (image/prompt/response); no bvip exporter. Prefer janus-pro-1b for the HF pipeline."),
]


def _zero_shot(name: str, model_id: str, backend: str, model_class: str, licence: str, *, notes: str,
               endpoint: str | None = None, processor_class: str = "(the server's)") -> ModelSpec:
    return ModelSpec(
        name=name, hub_id=model_id, family=None, model_class=model_class, processor_class=processor_class,
        licence=licence, prompt_style="chat", task_prefix=None, trainer="zero-shot", lora_target_modules=None,
        frozen_modules=(), backend=backend, endpoint=endpoint, notes=notes,
    )


#: Models that only caption, each through its backend: the source project's LLaVA on Ollama, its remote APIs
#: (any OpenAI-compatible endpoint works the same way) and CLIP-Interrogator's CLIP.
_ZERO_SHOT: list[ModelSpec] = [
    _zero_shot("llava-7b", "llava:7b", "ollama", "LLaVA 1.6 (Ollama)", "llama 2 community / apache-2.0 (see its "
               "Ollama page)", notes="`ollama pull llava:7b`, then `bvip predict --backend ollama --model llava:7b`; "
               "images go as raw base64, the schema as Ollama's `format`."),
    _zero_shot("gpt-4o", "gpt-4o", "openai", "GPT-4o (API)", "proprietary (OpenAI terms)",
               endpoint="https://api.openai.com/v1",
               notes="A remote API through the openai backend: key in $OPENAI_API_KEY, `--structured json-schema`."),
    _zero_shot("gemini-2.0-flash", "gemini-2.0-flash", "openai", "Gemini 2.0 Flash (API)",
               "proprietary (Google terms)", endpoint="https://generativelanguage.googleapis.com/v1beta/openai",
               notes="Gemini's OpenAI-compatible endpoint through the openai backend: `--api_key_env GEMINI_API_KEY`."),
    _zero_shot("clip-interrogator", "openai/clip-vit-large-patch14", "clip-interrogator", "CLIPModel", "mit",
               processor_class="CLIPProcessor",
               notes="CLIP ViT-L/14 ranks BVIP phrases (sidewalk, road, objects and their sides) for blip-large's "
               "caption: CLIP-Interrogator's method on transformers' classes."),
]


def _tiny_base() -> ModelSpec:
    twin = _tiny(next(s for s in _HF_NATIVE if s.name == FAMILY_REFERENCE["qwen2-vl"]))
    return replace(twin, name=TINY_BASE, hub_id=TINY_BASE_DIR, licence="n/a (local, synthetic captions)",
                   notes="tiny-qwen2-vl pre-trained as a generic captioner on the original captions: the CPU demo's "
                   "base, committed; `bvip demo base` rebuilds it.")


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        *_HF_NATIVE,
        *(_tiny(s) for s in _HF_NATIVE if s.name in FAMILY_REFERENCE.values()),
        _tiny_base(),
        *_EXPORT_ONLY,
        *_ZERO_SHOT,
    ]
}


# --- Lookup -----------------------------------------------------------------


class ModelLoadError(ValueError):
    """Weights, processor or adapter that could not be loaded (offline without a cached copy, a broken folder)."""


class UnknownModelError(KeyError):
    """A name that is neither a registry entry, a known hub id, nor a local model directory."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def _spec_from_dir(path: Path) -> ModelSpec:
    """Infer the family of a local checkpoint (or PEFT adapter) from its config files."""
    adapter_cfg = path / "adapter_config.json"
    if adapter_cfg.is_file() and not (path / "config.json").is_file():
        base = json.loads(adapter_cfg.read_text(encoding="utf-8")).get("base_model_name_or_path")
        if not base:
            raise UnknownModelError(f"{adapter_cfg} has no base_model_name_or_path; pass the base model explicitly")
        return get_spec(base)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UnknownModelError(f"{path} is a directory but has no config.json (not a saved model)")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    model_type = config.get("model_type", "")
    family = MODEL_TYPE_TO_FAMILY.get(model_type)
    if family is None:
        raise UnknownModelError(
            f"{config_file}: model_type {model_type!r} is not a registry family "
            f"(known: {', '.join(sorted(MODEL_TYPE_TO_FAMILY))})"
        )
    reference = MODELS[FAMILY_REFERENCE[family]]
    architectures = config.get("architectures") or [reference.model_class]
    spec = replace(reference, name=path.name, hub_id=str(path), model_class=architectures[0],
                   licence="see the source checkpoint", notes=f"local dir; family inferred from {model_type!r}")
    if (path / TWIN_META_FILE).is_file():
        # A tiny twin (or a model trained from one) keeps its own image size: the real model's budget
        # (e.g. 256-640 Qwen visual tokens) would blow its 12-token images up to hundreds of tokens.
        spec = replace(spec, image_budget={})
    return spec


def get_spec(name_or_path: str | os.PathLike[str] | ModelSpec) -> ModelSpec:
    """Look up a registry name, a hub id, or a local model directory (family read from config.json)."""
    if isinstance(name_or_path, ModelSpec):
        return name_or_path
    key = str(name_or_path)
    if key in MODELS:
        return MODELS[key]
    for spec in MODELS.values():
        if spec.hub_id.lower() == key.lower():
            return spec
    path = resolve(key)
    if path.is_dir():
        return _spec_from_dir(path)
    raise UnknownModelError(
        f"unknown model {key!r}: not a registry name, hub id or local model directory. "
        f"Known names: {', '.join(MODELS)}. Run `bvip models` for the table."
    )


# --- Loading ----------------------------------------------------------------

def four_bit_config_kwargs(compute_dtype: Any) -> dict[str, Any]:
    """NF4 with double quantisation, computing in ``compute_dtype``: the model's own dtype, so the 4-bit
    matmuls, the 16-bit layers and the Trainer's autocast all agree (never fp16 under a bf16 model)."""
    if compute_dtype is None or isinstance(compute_dtype, str):
        raise ValueError(f"the 4-bit compute dtype must be the model's torch dtype, not {compute_dtype!r}")
    return {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": compute_dtype}


def _four_bit_config(compute_dtype: Any) -> Any:
    """BitsAndBytes NF4 config, or a clear error where 4-bit cannot work."""
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("load_in_4bit needs a CUDA GPU (bitsandbytes 4-bit does not run on CPU/MPS); "
                           "drop --load_in_4bit or run on a GPU")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RuntimeError("load_in_4bit needs bitsandbytes: pip install 'bvip-helpers[gpu]' (or bitsandbytes)")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(**four_bit_config_kwargs(compute_dtype))


def recipe_for(spec: ModelSpec | str, recipe: str) -> tuple[str, Recipe | None]:
    """``(name, Recipe)`` for ``recipe`` = ``""`` (none), ``auto`` (from the GPU memory) or 16gb/24gb/80gb.

    ``auto`` on a machine without CUDA gives no recipe (a tiny twin's CPU settings stay as they are).
    """
    from bvip_helpers.devices import resolve_recipe

    spec = get_spec(spec)
    name = resolve_recipe(recipe)
    if not name:
        return "", None
    if name not in spec.recipes:
        known = ", ".join(spec.recipes) or "none"
        raise ValueError(f"{spec.name} has no {name} recipe (it has: {known}); drop --recipe or pick another model")
    return name, spec.recipes[name]


def model_source(spec: ModelSpec) -> str:
    """What ``from_pretrained`` gets: the hub id, or the resolved local dir (which must exist)."""
    if not spec.is_local:
        return spec.hub_id
    path = resolve(spec.hub_id)
    if not (path / "config.json").is_file():
        if spec.name == TINY_BASE:
            hint = "it is committed with the repository; restore it with `git checkout models/` or `make demo-base`"
        elif spec.name.startswith("tiny-"):
            hint = f"build it with `bvip tiny-model --family {spec.family}`"
        else:
            hint = "check the path"
        raise FileNotFoundError(f"model directory {path} not found or has no config.json; {hint}")
    return str(path)


def load_model_and_processor(spec: ModelSpec | str, *, adapter: str | os.PathLike[str] | None = None,
                             load_in_4bit: bool = False, device: str = "cpu", dtype: Any = "auto",
                             place: bool = True, trust_remote_code: bool = False,
                             trainable_adapter: bool = False) -> tuple[Any, Any]:
    """Load weights (safetensors only) and the processor; optionally 4-bit and a PEFT adapter on top.

    ``device`` and ``dtype`` follow :mod:`bvip_helpers.devices` (``device="auto"``: CUDA, else MPS, else
    CPU; ``dtype="auto"``: bf16 from compute capability 8.0, fp16 on older GPUs, fp32 on the CPU). The
    default ``device="cpu"`` keeps what every CPU caller always had: fp32 weights on the CPU.
    ``place=False`` picks the dtype for ``device`` but leaves the weights on the CPU for a Trainer
    (or DeepSpeed) to place; a 4-bit model is always placed, on this process's GPU (``LOCAL_RANK``).
    Tiny twins and local checkpoints go through the same ``from_pretrained`` calls as hub ids.
    ``trust_remote_code`` is never switched on by the registry: entries that need it are refused
    unless the caller passes ``trust_remote_code=True`` (export-only entries are always refused).
    """
    from bvip_helpers import devices

    spec = get_spec(spec)
    if spec.is_export_only:
        route = f"`bvip export --format {spec.exporter}`" if spec.exporter else "its notes"
        raise ValueError(f"{spec.name} is export-only (trains outside Transformers); "
                         f"use {route} and the original repository ({spec.notes})")
    if spec.backend != "transformers":
        raise ValueError(f"{spec.name} is not loaded in this process: caption with "
                         f"`bvip predict --backend {spec.backend} --model {spec.name}` ({spec.notes})")
    if spec.trust_remote_code_needed and not trust_remote_code:
        raise ValueError(f"{spec.name} needs trust_remote_code=True; read the remote code first, then pass it")
    import transformers

    source = model_source(spec)
    model_cls = getattr(transformers, spec.model_class, None) or transformers.AutoModelForImageTextToText
    where = devices.placement(device, dtype or "auto")
    kwargs: dict[str, Any] = {"use_safetensors": True, "trust_remote_code": trust_remote_code,
                              "dtype": where.torch_dtype}
    if load_in_4bit:
        kwargs["quantization_config"] = _four_bit_config(where.torch_dtype)
        kwargs["device_map"] = devices.four_bit_device_map()
    elif place and where.device_map is not None:
        kwargs["device_map"] = where.device_map
    try:
        model = model_cls.from_pretrained(source, **kwargs)
        processor = load_processor(source, spec.image_budget, trust_remote_code=trust_remote_code)
    except OSError as err:  # transformers reports a missing hub connection or file as a (multi-line) OSError
        from bvip_helpers.io import os_error_line

        raise ModelLoadError(f"cannot load {spec.name} from {source}: {os_error_line(err)}. Without the model "
                             "hub, download it first (or set HF_HOME to a cache that has it), or pass a local "
                             "model folder") from err
    if spec.family == "blip":
        _sync_decoder_bos(model, processor)
    if adapter is not None:  # its own errors name the adapter folder and what is wrong with it
        model = _load_adapter(model, Path(adapter), trainable=trainable_adapter)
    return model, processor


def load_processor(source: str | os.PathLike[str], image_budget: dict[str, Any] | None = None, *,
                   trust_remote_code: bool = False) -> Any:
    """``AutoProcessor.from_pretrained(source)`` with ``image_budget`` set on its image (and video) processor.

    The budget is deliberately not passed to ``from_pretrained``: transformers also hands those kwargs to
    the tokenizer, which replays them on every processor call (Qwen's ``min_pixels``/``max_pixels`` then
    print a FutureWarning each time), and a checkpoint whose ``preprocessor_config.json`` still holds
    ``min_pixels``/``max_pixels`` (the Qwen hub repos) would override a ``size=`` kwarg while loading.
    Rebuilding each sub-processor from its own settings plus the budget avoids both.
    """
    import copy

    import transformers

    processor = transformers.AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
    used: set[str] = set()
    for name in ("image_processor", "video_processor"):
        sub = getattr(processor, name, None)
        valid = getattr(getattr(sub, "valid_kwargs", None), "__annotations__", {})
        settings = {k: copy.deepcopy(v) for k, v in (image_budget or {}).items() if k in valid}
        if settings:  # deep copies: transformers edits size dicts in place
            setattr(processor, name, type(sub).from_dict(sub.to_dict(), **settings))
            used |= set(settings)
    unknown = set(image_budget or {}) - used
    if unknown:
        raise ValueError(f"image budget key(s) {sorted(unknown)} are not settings of the image processor of "
                         f"{source} ({type(getattr(processor, 'image_processor', None)).__name__})")
    return processor


def _sync_decoder_bos(model: Any, processor: Any) -> None:
    """BLIP generates from ``text_config.bos_token_id`` (``[DEC]``): make it the tokenizer's BOS, which the
    training collator puts first (:func:`bvip_helpers.families.decoder_bos_id`)."""
    bos = model.config.text_config.bos_token_id
    tok = processor.tokenizer
    if bos is not None and tok.bos_token_id != bos:
        tok.bos_token = tok.convert_ids_to_tokens(bos)


def _load_adapter(model: Any, adapter_dir: Path, trainable: bool = False) -> Any:
    from peft import PeftModel

    adapter_dir = resolve(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir} is not a PEFT adapter (no adapter_config.json)")
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(f"{adapter_dir} has no adapter_model.safetensors; pickled adapters are not loaded")
    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)


# --- Table ------------------------------------------------------------------

_TABLE_COLUMNS = ("name", "hub id", "family", "class", "trainer", "prompt", "licence", "16 GB", "24 GB", "80 GB",
                  "remote code")


def _row(spec: ModelSpec) -> tuple[str, ...]:
    prompt = spec.prompt_style + (f" `{spec.task_prefix}`" if spec.task_prefix else "")
    trainer = spec.trainer if not spec.is_export_only else f"export ({spec.exporter or 'see notes'})"
    if spec.backend != "transformers":
        trainer += f" ({spec.backend})"
    recipe = {k: (r.short() if r else "-") for k, r in spec.recipes.items()}
    r16 = recipe.get("16gb") or recipe.get("cpu", "-")
    r24, r80 = recipe.get("24gb", "-"), recipe.get("80gb", "-")
    return (spec.name, spec.hub_id, spec.family or "-", spec.model_class, trainer, prompt, spec.licence,
            r16, r24, r80, "yes" if spec.trust_remote_code_needed else "no")


def registry_table(markdown: bool = True) -> str:
    """The registry as a Markdown document (``docs/models.md``) or a plain fixed-width table."""
    rows = [_row(spec) for spec in MODELS.values()]
    if not markdown:
        widths = [max(len(str(c)) for c in col) for col in zip(_TABLE_COLUMNS, *rows, strict=True)]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                 for r in (_TABLE_COLUMNS, *rows)]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines) + "\n"

    def md(cells: tuple[str, ...] | list[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    out = [
        "# Model registry",
        "",
        "Generated by `bvip models --markdown` from `bvip_helpers/registry.py`; do not edit by hand",
        "(`pytest tests/test_registry.py` fails when this file and the registry drift apart).",
        "",
        "Recipes read `per_device_batch_size x grad_accum dtype [4-bit]`, all with gradient checkpointing;",
        "`bvip sft --recipe auto|16gb|24gb|80gb` applies them (`docs/gpu.md`). 16 GB recipes use fp16 because",
        "the common 16 GB card (T4) has no bf16. Tiny twins show their CPU recipe in the 16 GB column.",
        "",
        md(list(_TABLE_COLUMNS)),
        md(["---"] * len(_TABLE_COLUMNS)),
        *(md(r) for r in rows),
        "",
        "## Training details",
        "",
        md(["name", "LoRA target modules (PEFT regex)", "frozen modules", "image budget", "notes"]),
        md(["---"] * 5),
    ]
    for spec in MODELS.values():
        if spec.name.startswith("tiny-"):
            continue
        budget = ", ".join(f"{k}={v}" for k, v in spec.image_budget.items())
        image = "; ".join(p for p in (budget, spec.image_note) if p) or "-"
        out.append(md([spec.name, f"`{spec.lora_target_modules}`" if spec.lora_target_modules else "-",
                       ", ".join(spec.frozen_modules) or "-", image, spec.notes]))
    out += [
        "",
        "## Sources checked",
        "",
        "Hub ids and classes were checked against the Transformers model docs "
        "(https://huggingface.co/docs/transformers/model_doc/<model>: qwen2_vl, qwen2_5_vl, smolvlm, "
        "paligemma, florence2, deepseek_vl, internvl, janus, blip, blip-2, llava_onevision) and against the "
        "classes exported by the installed `transformers`. Export-only entries follow the original "
        "repositories (see `docs/exporters.md`). Zero-shot entries caption only; those with a backend in the "
        "trainer column run through `bvip predict --backend` (Ollama's /api/chat, any OpenAI-compatible "
        "chat-completions endpoint, or CLIP-Interrogator's method on transformers' CLIP and BLIP classes).",
        "",
    ]
    return "\n".join(out)


def write_models_doc(path: str | os.PathLike[str] = "docs/models.md") -> Path:
    return write_text_atomic(resolve(path), registry_table(markdown=True))


# --- CLI --------------------------------------------------------------------


def configure_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--markdown", action="store_true", help="print the Markdown document (docs/models.md)")
    from bvip_helpers.io import resolve_cli_path

    parser.add_argument("--write", metavar="PATH", type=resolve_cli_path, help="also write the Markdown document to PATH")


def run_cli(args: argparse.Namespace) -> int:
    print(registry_table(markdown=args.markdown), end="")
    if args.write:
        print(f"wrote {write_models_doc(args.write)}")
    return 0
