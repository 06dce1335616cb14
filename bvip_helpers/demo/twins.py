"""Tiny offline twins of every Hugging Face-native model family in the model zoo.

A *twin* is a randomly initialised, few-megabyte instance of the very same transformers
class (``Qwen2VLForConditionalGeneration``, ``PaliGemmaForConditionalGeneration``, ...) with
its real processor class, a tokenizer trained here on the BVIP schema text, and the published
checkpoint's own chat template, special tokens, end-of-turn and generation EOS tokens and
image-processor normalisation, read from the family's facts file
(``bvip_helpers/configs/families/<family>.json``, :func:`bvip_helpers.families.family_config`).
Only the sizes are the twin's own. Saved with ``save_pretrained`` it reloads
with ``AutoProcessor`` / ``AutoModelForImageTextToText`` exactly like the hub checkpoint,
so the SFT, predict and notebook code paths can be run end to end on a CPU, offline,
in seconds. The twins are not meant to be good captioners, only to have the same
*interfaces* (and enough capacity to overfit the schema text in a smoke run).

Usage::

    bvip tiny-model --family qwen2-vl --data_dir data/bvpi_out --out runs/models/tiny-qwen2-vl
    bvip tiny-model --family all --out runs/models        # one sub-folder per family
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bvip_helpers import schema
from bvip_helpers.families import family_config
from bvip_helpers.io import atomic_dir, iter_jsonl, remove_tree, write_json

#: bump when a recipe changes in a way that makes old cached twins stale.
TWIN_FORMAT_VERSION = 3
META_FILE = "twin_meta.json"
DEFAULT_VOCAB_SIZE = 2048
DEFAULT_IMAGE_SIZE = 112
#: where ``bvip tiny-model`` puts ``tiny-<family>`` folders by default (the registry looks there).
DEFAULT_TWIN_ROOT = "runs/models"

# Tiny but trainable: enough capacity to memorise the schema text in a smoke run.
TEXT_HIDDEN = 128
TEXT_LAYERS = 2
TEXT_HEADS = 4
TEXT_KV_HEADS = 2
TEXT_HEAD_DIM = TEXT_HIDDEN // TEXT_HEADS
TEXT_FFN = 256
# The vision tower is the wider one: telling a cone from a bollard in two patches takes more than
# reading the schema (a 64-wide, 2-layer tower saw 0.53 of the close objects, this one 0.7+).
VISION_HIDDEN = 128
VISION_LAYERS = 4
VISION_HEADS = 4
VISION_FFN = 256


# --- Tokenizer --------------------------------------------------------------


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE,
                    special_tokens: dict[str, str] | None = None,
                    additional_special_tokens: Iterable[str] = (),
                    extra_tokens: Iterable[str] = (), post_template: str | None = None) -> Any:
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it as ``PreTrainedTokenizerFast``.

    Byte-level BPE round-trips every string exactly (case, digits, ``;``, ``.``, newlines).
    ``special_tokens`` maps a role to a token: the standard roles (``bos_token``,
    ``eos_token``, ``pad_token``, ``unk_token``) become the tokenizer's own, any other role
    (``image_token``, ``boi_token``...) becomes an ``extra_special_tokens`` entry, which gives
    ``tok.image_token`` and ``tok.image_token_id`` as the processors expect.
    ``additional_special_tokens`` are special tokens without a role (chat markers);
    ``extra_tokens`` are ordinary added tokens. ``post_template`` (e.g. ``"[CLS] $A [SEP]"``) makes
    the tokenizer wrap every encoded text in those special tokens, as BERT/OPT tokenizers do;
    without it nothing is added (the chat templates write every marker themselves).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special_tokens = dict(special_tokens or {})
    ordered_specials = list(dict.fromkeys([*special_tokens.values(), *additional_special_tokens]))
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=ordered_specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    if post_template:
        from tokenizers.processors import TemplateProcessing

        used = [t for t in post_template.split() if t != "$A"]
        tokenizer.post_processor = TemplateProcessing(
            single=post_template, pair=f"{post_template} $B:1", special_tokens=[(t, tokenizer.token_to_id(t)) for t in used],
        )
    standard = {k: v for k, v in special_tokens.items() if k in {"bos_token", "eos_token", "pad_token", "unk_token"}}
    extra = {k: v for k, v in special_tokens.items() if k not in standard}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        extra_special_tokens=extra or None,
        clean_up_tokenization_spaces=False,
        **standard,
    )
    role_less = [t for t in additional_special_tokens if t not in special_tokens.values()]
    if role_less:
        tok.add_special_tokens({"additional_special_tokens": role_less}, replace_extra_special_tokens=False)
    extra_tokens = list(extra_tokens)
    if extra_tokens:
        tok.add_tokens(extra_tokens)
    return tok


#: task prompts the real checkpoints are used with (PaliGemma prefix, Florence-2 task expansions).
FAMILY_PROMPT_TEXTS = (
    "caption en", "What does the image describe?", "Describe in detail what is shown in the image.",
    "Describe with a paragraph what is shown in the image.", "a picture of", "Question: Answer:",
)


def schema_texts(seed: int = 0, n_captions: int = 200) -> list[str]:
    """Every word the BVIP schema can produce, plus random composed captions.

    Field labels, enum values, object phrases (near and far, 1-3 objects), the default
    prompt and ``n_captions`` composed captions, so a tokenizer trained on them covers
    the whole schema vocabulary even without a dataset.
    """
    rng = random.Random(seed)
    texts = [schema.DEFAULT_PROMPT, schema.NOTHING_CLOSE, *FAMILY_PROMPT_TEXTS]
    for key, label in schema.FIELD_LABELS.items():
        texts += [f"{label}: {value}." for value in schema.FIELD_ENUMS[key]]
    for side, road in itertools.product(schema.FIELD_ENUMS["sidewalk_pos"], schema.FIELD_ENUMS["road_pos"]):
        texts.append(schema.mandatory_prefix(side, road, schema.derive_relation(side, road)))
    for obj in schema.OBJECT_CLASSES:
        texts += [" ".join(obj.synonyms), obj.plural]
        for near in (True, False):
            for count in (1, 2, 3):
                positions = sorted(rng.choices(schema.OBJECT_POSITIONS, k=count), key=schema.OBJECT_POSITIONS.index)
                texts.append(schema.object_phrase(obj, positions, near))
    contexts = ["", "A sidewalk is shown with a pedestrian ahead.", "The path is clear for navigation.",
                "A road runs along the right side, with trees and grass on the left."]
    for _ in range(n_captions):
        labels = schema.SceneLabels(
            sidewalk_pos=rng.choice(schema.FIELD_ENUMS["sidewalk_pos"]),
            road_pos=rng.choice(schema.FIELD_ENUMS["road_pos"]),
            near=_random_objects(rng), far=_random_objects(rng),
        )
        texts.append(schema.compose_caption(labels, rng.choice(contexts)))
    return texts


def _random_objects(rng: random.Random) -> dict[str, list[str]]:
    chosen = rng.sample(schema.OBJECT_CLASSES, k=rng.randint(0, 3))
    return {o.name: sorted(rng.choices(schema.OBJECT_POSITIONS, k=rng.randint(1, 3)),
                           key=schema.OBJECT_POSITIONS.index) for o in chosen}


def data_texts(data_dir: str | os.PathLike[str]) -> list[str]:
    """Prompts, responses and original captions from a dataset build dir or a synth dir.

    A build dir holds ``bvpi_sft_*.jsonl`` (prompt + response per record) and maybe
    ``bvpi_dpo_*.jsonl`` (chosen + rejected, the original caption); a synth dir
    holds ``complete_captions_sensation.csv`` (``target`` column). Either or both are read.
    Raises ``FileNotFoundError`` naming what was looked for when neither is there.
    """
    data_dir = Path(data_dir)
    texts: list[str] = []
    sft_files = sorted(data_dir.glob("bvpi_sft_*.jsonl"))
    for path in sft_files:
        for record in iter_jsonl(path):
            texts += [str(record.get(k)) for k in ("prompt", "response") if record.get(k)]
    for path in sorted(data_dir.glob("bvpi_dpo_*.jsonl")):  # "rejected" holds the original caption
        for record in iter_jsonl(path):
            texts += [str(record.get(k)) for k in ("chosen", "rejected") if record.get(k)]
    captions = data_dir / "complete_captions_sensation.csv"
    if captions.is_file():
        import pandas as pd

        frame = pd.read_csv(captions)
        if "target" not in frame.columns:
            raise ValueError(f"{captions}: no 'target' column (columns: {list(frame.columns)})")
        texts += [str(t) for t in frame["target"].dropna()]
    if not sft_files and not captions.is_file():
        raise FileNotFoundError(
            f"{data_dir}: neither bvpi_sft_*.jsonl (a `bvip build-dataset` output) nor "
            "complete_captions_sensation.csv (a `bvip synth` output) found; pass one of those folders as --data_dir"
        )
    return texts


# --- Recipes ----------------------------------------------------------------


@dataclass(frozen=True)
class TwinRecipe:
    """How to build one family's twin."""

    family: str
    model_class: str  # transformers class name
    processor_class: str
    imitates: str  # the hub checkpoint whose interface the twin copies
    #: (texts, image_size, **options) -> (model, processor); options: ``image_splitting`` (SmolVLM)
    build: Callable[..., tuple[Any, Any]] = field(repr=False)
    #: how a prompt reaches the model: ``chat`` (processor chat template), ``suffix`` (PaliGemma:
    #: plain prompt, the answer passed as ``suffix=`` so the processor makes the labels), ``prefix``
    #: (plain text before the answer, decoder-only), ``seq2seq`` (prompt to the encoder, answer as labels).
    prompt_style: str = "chat"
    size_multiple: int = 28  # the image side is rounded to this (patch size x merge/stride)
    nested_images: bool = False  # processor wants one list of images per sample
    notes: str = ""


def _rope(head_dim_half_sections: list[int] | None = None, theta: float = 10000.0) -> dict[str, Any]:
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    if head_dim_half_sections:
        params["mrope_section"] = head_dim_half_sections
    return params


def _text_kwargs(tok: Any, **overrides: Any) -> dict[str, Any]:
    """Shared tiny decoder settings; vocab sized to the tokenizer."""
    kwargs = dict(
        vocab_size=len(tok), hidden_size=TEXT_HIDDEN, intermediate_size=TEXT_FFN,
        num_hidden_layers=TEXT_LAYERS, num_attention_heads=TEXT_HEADS, num_key_value_heads=TEXT_KV_HEADS,
        max_position_embeddings=2048, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    kwargs.update(overrides)
    return kwargs


def family_tokenizer(texts: list[str], family: str, post_template: str | None = None) -> Any:
    """A tokenizer trained on ``texts`` with the published checkpoint's special tokens (roles and order),
    plus the role-less special tokens its chat template or processor writes (``template_tokens``)."""
    facts = family_config(family)
    return train_tokenizer(texts, special_tokens=facts["special_tokens"],
                           additional_special_tokens=facts.get("template_tokens", []), post_template=post_template)


def chat_template(family: str) -> str:
    """The published checkpoint's chat template, verbatim from the family's facts file."""
    template = family_config(family).get("chat_template")
    if not template:
        raise ValueError(f"the {family} checkpoint has no chat template (its prompt is a prefix or nothing)")
    return template


def image_settings(family: str, *keys: str) -> dict[str, Any]:
    """The published image-processor settings named by ``keys`` (normalisation, resampling, ...);
    sizes stay the twin's own."""
    published = family_config(family).get("image_processor", {})
    return {k: published[k] for k in keys if k in published}


def _build_qwen_vl(texts: list[str], image_size: int, version: str, **_: Any) -> tuple[Any, Any]:
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    family = "qwen2-vl" if version == "2" else "qwen2.5-vl"
    tok = family_tokenizer(texts, family)
    # Real Qwen tokenizers have no BOS; the pad token doubles as <|endoftext|>.
    patch, merge = 14, 2
    pixels = image_size * image_size
    image_kwargs = dict(size={"shortest_edge": pixels, "longest_edge": pixels}, patch_size=patch, merge_size=merge,
                        temporal_patch_size=2, **image_settings(family, "image_mean", "image_std"))
    text_cfg = _text_kwargs(tok, bos_token_id=None, rope_parameters=_rope(_mrope_sections(TEXT_HEAD_DIM), 1e6))
    ids = dict(image_token_id=tok.image_token_id, video_token_id=tok.video_token_id,
               vision_start_token_id=tok.vision_start_token_id, vision_end_token_id=tok.vision_end_token_id)
    if version == "2":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

        vision_cfg = dict(depth=VISION_LAYERS, embed_dim=VISION_HIDDEN, hidden_size=TEXT_HIDDEN,
                          num_heads=VISION_HEADS, mlp_ratio=2, patch_size=patch, spatial_merge_size=merge)
        config = Qwen2VLConfig(text_config=text_cfg, vision_config=vision_cfg, **ids)
        model = Qwen2VLForConditionalGeneration(config)
        processor_cls = Qwen2VLProcessor
    else:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

        vision_cfg = dict(depth=VISION_LAYERS, hidden_size=VISION_HIDDEN, out_hidden_size=TEXT_HIDDEN,
                          intermediate_size=VISION_FFN, num_heads=VISION_HEADS, patch_size=patch,
                          spatial_merge_size=merge, window_size=image_size, fullatt_block_indexes=[VISION_LAYERS - 1])
        config = Qwen2_5_VLConfig(text_config=text_cfg, vision_config=vision_cfg, **ids)
        model = Qwen2_5_VLForConditionalGeneration(config)
        processor_cls = Qwen2_5_VLProcessor
    processor = processor_cls(
        image_processor=Qwen2VLImageProcessor(**image_kwargs),
        video_processor=Qwen2VLVideoProcessor(**image_kwargs),
        tokenizer=tok, chat_template=chat_template(family),
    )
    return model, processor


def _vision_kwargs(image_size: int | list[int], patch: int | list[int], **overrides: Any) -> dict[str, Any]:
    """Shared tiny ViT settings (SigLIP / InternViT style configs)."""
    kwargs = dict(hidden_size=VISION_HIDDEN, intermediate_size=VISION_FFN, num_hidden_layers=VISION_LAYERS,
                  num_attention_heads=VISION_HEADS, image_size=image_size, patch_size=patch)
    kwargs.update(overrides)
    return kwargs


#: SmolVLM with image splitting: an image is resized to at most SPLIT_RATIO tiles per side, then cut into
#: tiles of the twin's image size plus one global view, as the registry's budget does for the real model
#: (longest edge 768 = 2 x 384 px tiles).
SPLIT_RATIO = 2


def _build_smolvlm(texts: list[str], image_size: int, image_splitting: bool = False, **_: Any) -> tuple[Any, Any]:
    from transformers import (
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMImageProcessor,
        SmolVLMProcessor,
        SmolVLMVideoProcessor,
    )

    patch, scale = 14, 2
    grid = image_size // patch
    tok = family_tokenizer(texts, "smolvlm")  # the row/col tile markers are its template tokens
    image_seq_len = (grid // scale) ** 2
    config = SmolVLMConfig(
        text_config=dict(model_type="llama", **_text_kwargs(tok, head_dim=TEXT_HEAD_DIM,
                                                            rope_parameters=_rope(theta=1e5))),
        vision_config=_vision_kwargs(image_size, patch), scale_factor=scale, image_token_id=tok.image_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = SmolVLMForConditionalGeneration(config)
    # The real checkpoint splits every image into tiles (their number depends on the aspect ratio) plus a
    # global view; the default twin keeps the global view only, which keeps its sequences short.
    tile = {"longest_edge": image_size}
    size = {"longest_edge": image_size * SPLIT_RATIO} if image_splitting else tile
    normalise = image_settings("smolvlm", "image_mean", "image_std", "resample")
    image_processor = SmolVLMImageProcessor(size=size, max_image_size=tile, do_image_splitting=image_splitting,
                                            **normalise)
    video_processor = SmolVLMVideoProcessor(size=tile, max_image_size=tile)
    processor = SmolVLMProcessor(image_processor=image_processor, tokenizer=tok, video_processor=video_processor,
                                 image_seq_len=image_seq_len, chat_template=chat_template("smolvlm"))
    return model, processor


def _build_llava_onevision(texts: list[str], image_size: int, **_: Any) -> tuple[Any, Any]:
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    patch = 14
    tok = family_tokenizer(texts, "llava-onevision")
    published = family_config("llava-onevision")["processor"]
    config = LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2", **_text_kwargs(tok, bos_token_id=None, rope_parameters=_rope(theta=1e6))),
        vision_config=dict(model_type="siglip_vision_model", **_vision_kwargs(image_size, patch)),
        image_token_index=tok.image_token_id, video_token_index=tok.video_token_id,
        vision_feature_select_strategy=published["vision_feature_select_strategy"], vision_feature_layer=-1,
        image_grid_pinpoints=[[image_size, image_size]],
    )
    model = LlavaOnevisionForConditionalGeneration(config)
    size = {"height": image_size, "width": image_size}
    # One pinpoint: every image is one tile plus the base view (the real model allows up to 6x6 tiles).
    normalise = image_settings("llava-onevision", "image_mean", "image_std", "resample")
    image_processor = LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=[[image_size, image_size]],
                                                   **normalise)
    video_processor = LlavaOnevisionVideoProcessor(size=size, **image_settings("llava-onevision", "image_mean",
                                                                               "image_std"))
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor, tokenizer=tok, video_processor=video_processor,
        num_image_tokens=(image_size // patch) ** 2,
        vision_feature_select_strategy=published["vision_feature_select_strategy"],
        chat_template=chat_template("llava-onevision"), vision_aspect_ratio=published["vision_aspect_ratio"],
    )
    return model, processor


def _build_internvl(texts: list[str], image_size: int, **_: Any) -> tuple[Any, Any]:
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
    )

    patch, downsample = 14, 0.5
    grid = image_size // patch
    tok = family_tokenizer(texts, "internvl")
    # Processor and config must agree on the number of <IMG_CONTEXT> tokens per tile.
    image_seq_length = int(grid * grid * downsample * downsample)
    config = InternVLConfig(
        text_config=dict(model_type="qwen2", **_text_kwargs(tok, bos_token_id=None, rope_parameters=_rope(theta=1e6))),
        vision_config=_vision_kwargs([image_size, image_size], [patch, patch]),
        image_token_id=tok.context_image_token_id, image_seq_length=image_seq_length,
        downsample_ratio=downsample, tie_word_embeddings=False,
    )
    model = InternVLForConditionalGeneration(config)
    size = {"height": image_size, "width": image_size}
    # max_patches=1: one tile per image (the real model crops up to 12 tiles plus a thumbnail; the
    # processor class forces crop_to_patches=True, so the tile count is capped here instead).
    normalise = image_settings("internvl", "image_mean", "image_std")
    image_processor = GotOcr2ImageProcessor(size=size, crop_to_patches=True, min_patches=1, max_patches=1, **normalise)
    video_processor = InternVLVideoProcessor(size=size, **normalise)
    processor = InternVLProcessor(image_processor=image_processor, tokenizer=tok, video_processor=video_processor,
                                  image_seq_length=image_seq_length, chat_template=chat_template("internvl"))
    return model, processor


def _fit(image_size: int, multiple: int) -> int:
    """The nearest multiple of ``multiple`` (at least one) to the requested image size."""
    return max(multiple, round(image_size / multiple) * multiple)


def _build_paligemma(texts: list[str], image_size: int, **_: Any) -> tuple[Any, Any]:
    from transformers import (
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessor,
    )

    patch = 14
    tok = family_tokenizer(texts, "paligemma")
    image_seq_length = (image_size // patch) ** 2
    image_processor = SiglipImageProcessor(size={"height": image_size, "width": image_size},
                                           **image_settings("paligemma", "image_mean", "image_std", "resample"))
    image_processor.image_seq_length = image_seq_length  # saved to preprocessor_config.json, read by the processor
    # The processor adds the 1024 <locNNNN> and 128 <segNNN> tokens; the vocab is sized after it.
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok)
    text_cfg = _text_kwargs(processor.tokenizer, head_dim=TEXT_HEAD_DIM, query_pre_attn_scalar=TEXT_HEAD_DIM,
                            sliding_window=512, rope_parameters=_rope())
    config = PaliGemmaConfig(
        text_config=dict(model_type="gemma2", **text_cfg),
        vision_config=dict(model_type="siglip_vision_model", **_vision_kwargs(image_size, patch),
                           projection_dim=TEXT_HIDDEN),
        image_token_index=tok.image_token_id, vocab_size=len(processor.tokenizer), projection_dim=TEXT_HIDDEN,
        hidden_size=TEXT_HIDDEN, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return PaliGemmaForConditionalGeneration(config), processor


def _build_florence2(texts: list[str], image_size: int, **_: Any) -> tuple[Any, Any]:
    from transformers import CLIPImageProcessor, Florence2Config, Florence2ForConditionalGeneration, Florence2Processor

    stride = 32  # DaViT downsamples 4 * 2 * 2 * 2
    tok = family_tokenizer(texts, "florence2")
    grid = image_size // stride
    image_processor = CLIPImageProcessor(size={"height": image_size, "width": image_size},
                                         **image_settings("florence2", "do_center_crop", "image_mean", "image_std",
                                                          "resample"))
    image_processor.image_seq_length = grid * grid + 1  # every cell plus one pooled token
    text_cfg = dict(
        model_type="bart", vocab_size=len(tok), d_model=TEXT_HIDDEN, encoder_layers=TEXT_LAYERS,
        decoder_layers=TEXT_LAYERS, encoder_attention_heads=TEXT_HEADS, decoder_attention_heads=TEXT_HEADS,
        encoder_ffn_dim=TEXT_FFN, decoder_ffn_dim=TEXT_FFN, max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        decoder_start_token_id=tok.eos_token_id, forced_bos_token_id=None, forced_eos_token_id=tok.eos_token_id,
    )
    vision_cfg = dict(depths=[1, 1, 1, 1], embed_dim=[32, 32, 64, 64], num_heads=[1, 1, 2, 2],
                      num_groups=[1, 1, 2, 2], window_size=4, drop_path_rate=0.0, projection_dim=TEXT_HIDDEN,
                      max_position_embeddings=max(grid, 8))
    config = Florence2Config(text_config=text_cfg, vision_config=vision_cfg, image_token_id=tok.image_token_id,
                             pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.eos_token_id)
    model = Florence2ForConditionalGeneration(config)
    processor = Florence2Processor(image_processor=image_processor, tokenizer=tok)
    return model, processor


def _build_deepseek_vl(texts: list[str], image_size: int, **_: Any) -> tuple[Any, Any]:
    from transformers import (
        DeepseekVLConfig,
        DeepseekVLForConditionalGeneration,
        DeepseekVLImageProcessor,
        DeepseekVLProcessor,
    )

    patch = 16
    bos = family_config("deepseek-vl")["special_tokens"]["bos_token"]
    tok = family_tokenizer(texts, "deepseek-vl", post_template=f"{bos} $A")  # the tokenizer adds BOS itself
    num_image_tokens = (image_size // patch) ** 2
    config = DeepseekVLConfig(
        text_config=dict(model_type="llama", **_text_kwargs(tok, head_dim=TEXT_HEAD_DIM, rope_parameters=_rope())),
        vision_config=dict(model_type="siglip_vision_model", **_vision_kwargs(image_size, patch)),
        image_token_id=tok.image_token_id, tie_word_embeddings=False,
    )
    model = DeepseekVLForConditionalGeneration(config)
    image_processor = DeepseekVLImageProcessor(size={"height": image_size, "width": image_size},
                                               **image_settings("deepseek-vl", "image_mean", "image_std"))
    processor = DeepseekVLProcessor(image_processor=image_processor, tokenizer=tok, num_image_tokens=num_image_tokens,
                                    chat_template=chat_template("deepseek-vl"))
    return model, processor


def _build_janus(texts: list[str], image_size: int, **_: Any) -> tuple[Any, Any]:
    from transformers import JanusConfig, JanusForConditionalGeneration, JanusImageProcessor, JanusProcessor

    patch = 16
    facts = family_config("janus")
    tok = family_tokenizer(texts, "janus", post_template=f"{facts['special_tokens']['bos_token']} $A")
    num_image_tokens = (image_size // patch) ** 2
    config = JanusConfig(
        text_config=dict(model_type="llama", **_text_kwargs(tok, head_dim=TEXT_HEAD_DIM, rope_parameters=_rope())),
        vision_config=dict(hidden_size=VISION_HIDDEN, num_hidden_layers=VISION_LAYERS, num_attention_heads=VISION_HEADS,
                           image_size=image_size, patch_size=patch, mlp_ratio=2.0, projection_dim=TEXT_HIDDEN,
                           num_image_tokens=num_image_tokens, depth=2),
        # The VQ-VAE is only for image generation, but the class always builds it; GroupNorm needs
        # channel counts that are multiples of 32.
        vq_config=dict(embed_dim=8, num_embeddings=256, latent_channels=32, base_channels=32,
                       channel_multiplier=[1, 1], num_res_blocks=1, num_patches=image_size // 2,
                       projection_dim=TEXT_HIDDEN, image_token_embed_dim=TEXT_HIDDEN, num_hidden_layers=1),
        image_token_id=tok.image_token_id, tie_word_embeddings=False,
    )
    model = JanusForConditionalGeneration(config)
    image_processor = JanusImageProcessor(size={"height": image_size, "width": image_size},
                                          **image_settings("janus", "image_mean", "image_std"))
    # The published processor prepends DeepSeek's default system prompt to every text.
    processor = JanusProcessor(image_processor=image_processor, tokenizer=tok, chat_template=chat_template("janus"),
                               num_image_tokens=num_image_tokens,
                               use_default_system_prompt=facts["processor"]["use_default_system_prompt"])
    return model, processor


def _build_blip(texts: list[str], image_size: int, **_: Any) -> tuple[Any, Any]:
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    patch = 16
    # BERT-style vocabulary: [CLS] text [SEP]; generation swaps [CLS] for [DEC] and stops at [SEP].
    tok = _bert_style(family_tokenizer(texts, "blip", post_template="[CLS] $A [SEP]"))
    config = BlipConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=TEXT_HIDDEN, encoder_hidden_size=VISION_HIDDEN,
                         intermediate_size=TEXT_FFN, num_hidden_layers=TEXT_LAYERS, num_attention_heads=TEXT_HEADS,
                         max_position_embeddings=512, bos_token_id=tok.bos_token_id, eos_token_id=tok.sep_token_id,
                         pad_token_id=tok.pad_token_id, sep_token_id=tok.sep_token_id, projection_dim=TEXT_HIDDEN),
        vision_config=dict(hidden_size=VISION_HIDDEN, intermediate_size=VISION_FFN, num_hidden_layers=VISION_LAYERS,
                           num_attention_heads=VISION_HEADS, image_size=image_size, patch_size=patch,
                           projection_dim=TEXT_HIDDEN, initializer_range=0.02),
        projection_dim=TEXT_HIDDEN, image_text_hidden_size=TEXT_HIDDEN,
    )
    model = BlipForConditionalGeneration(config)
    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size},
                                         **image_settings("blip", "image_mean", "image_std", "resample"))
    return model, BlipProcessor(image_processor=image_processor, tokenizer=tok)


def _bert_style(tok: Any) -> Any:
    """BERT tokenizers hand out no token_type_ids to BLIP; padding on the right like the real one."""
    tok.model_input_names = ["input_ids", "attention_mask"]
    return tok


def _build_blip2(texts: list[str], image_size: int, **_: Any) -> tuple[Any, Any]:
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor

    patch, num_query_tokens = 14, 8
    # OPT: </s> is BOS (prepended to every text), EOS and UNK. No image_token role: the
    # processor adds its own <image> AddedToken and expects to own it.
    tok = family_tokenizer(texts, "blip2", post_template="</s> $A")
    tok.model_input_names = ["input_ids", "attention_mask"]
    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size},
                                         **image_settings("blip2", "image_mean", "image_std", "resample"))
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tok, num_query_tokens=num_query_tokens)
    tok = processor.tokenizer
    config = Blip2Config(
        vision_config=dict(hidden_size=VISION_HIDDEN, intermediate_size=VISION_FFN, num_hidden_layers=VISION_LAYERS,
                           num_attention_heads=VISION_HEADS, image_size=image_size, patch_size=patch,
                           initializer_range=0.02),
        qformer_config=dict(vocab_size=len(tok), hidden_size=VISION_HIDDEN, num_hidden_layers=VISION_LAYERS,
                            num_attention_heads=VISION_HEADS, intermediate_size=VISION_FFN,
                            encoder_hidden_size=VISION_HIDDEN, cross_attention_frequency=1,
                            pad_token_id=tok.pad_token_id),
        text_config=dict(model_type="opt", vocab_size=len(tok), hidden_size=TEXT_HIDDEN, ffn_dim=TEXT_FFN,
                         num_hidden_layers=TEXT_LAYERS, num_attention_heads=TEXT_HEADS,
                         word_embed_proj_dim=TEXT_HIDDEN, max_position_embeddings=2048,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        num_query_tokens=num_query_tokens, image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    return Blip2ForConditionalGeneration(config), processor


def _mrope_sections(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies over (time, height, width) like Qwen's [16, 24, 24] for 128."""
    half = head_dim // 2
    hw = (half * 3) // 8
    return [half - 2 * hw, hw, hw]


FAMILIES: dict[str, TwinRecipe] = {
    "qwen2-vl": TwinRecipe(
        "qwen2-vl", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor", "Qwen/Qwen2-VL-2B-Instruct",
        lambda texts, size, **options: _build_qwen_vl(texts, size, "2", **options),
        notes="mrope_section sums to head_dim/2; image tokens = (size/14)^2/4 after 2x2 merge",
    ),
    "qwen2.5-vl": TwinRecipe(
        "qwen2.5-vl", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor", "Qwen/Qwen2.5-VL-3B-Instruct",
        lambda texts, size, **options: _build_qwen_vl(texts, size, "2.5", **options),
        notes="as qwen2-vl plus window attention (window = image size, last block full attention)",
    ),
    "smolvlm": TwinRecipe(
        "smolvlm", "SmolVLMForConditionalGeneration", "SmolVLMProcessor", "HuggingFaceTB/SmolVLM2-2.2B-Instruct",
        _build_smolvlm, nested_images=True,
        notes="global view only (image_splitting=True: tiles plus the global view, as the real model); "
              "image_seq_len = (size/14/scale)^2 per view; <fake_token_around_image>, <global-img>, row/col tokens",
    ),
    "llava-onevision": TwinRecipe(
        "llava-onevision", "LlavaOnevisionForConditionalGeneration", "LlavaOnevisionProcessor",
        "llava-hf/llava-onevision-qwen2-0.5b-ov-hf", _build_llava_onevision, size_multiple=14,
        notes="SigLIP + Qwen2; a single grid pinpoint so anyres yields base view + one tile",
    ),
    "internvl": TwinRecipe(
        "internvl", "InternVLForConditionalGeneration", "InternVLProcessor", "OpenGVLab/InternVL3-1B-hf",
        _build_internvl,
        notes="image_seq_length identical in processor and config; no tile cropping",
    ),
    "paligemma": TwinRecipe(
        "paligemma", "PaliGemmaForConditionalGeneration", "PaliGemmaProcessor", "google/paligemma2-3b-pt-224",
        _build_paligemma, prompt_style="suffix", size_multiple=14,
        notes="Gemma2 text; image_seq_length on the image processor; processor adds 1,152 <loc>/<seg> tokens",
    ),
    "florence2": TwinRecipe(
        "florence2", "Florence2ForConditionalGeneration", "Florence2Processor", "florence-community/Florence-2-base",
        _build_florence2, prompt_style="seq2seq", size_multiple=32,
        notes="DaViT + BART encoder-decoder; image size a multiple of 32; image_seq_length = (size/32)^2 + 1",
    ),
    "deepseek-vl": TwinRecipe(
        "deepseek-vl", "DeepseekVLForConditionalGeneration", "DeepseekVLProcessor",
        "deepseek-community/deepseek-vl-1.3b-chat", _build_deepseek_vl, size_multiple=16,
        notes="SigLIP + Llama; 'User: <image_placeholder>...\n\nAssistant:' template; BOS added by the tokenizer",
    ),
    "janus": TwinRecipe(
        "janus", "JanusForConditionalGeneration", "JanusProcessor", "deepseek-community/Janus-Pro-1B",
        _build_janus, size_multiple=16,
        notes="<begin_of_image>/<end_of_image> around the image; tiny VQ-VAE with 32-channel multiples",
    ),
    "blip": TwinRecipe(
        "blip", "BlipForConditionalGeneration", "BlipProcessor", "Salesforce/blip-image-captioning-base",
        _build_blip, prompt_style="prefix", size_multiple=16,
        notes="[CLS] text [SEP]; generate() swaps the first token for [DEC] and drops the last",
    ),
    "blip2": TwinRecipe(
        "blip2", "Blip2ForConditionalGeneration", "Blip2Processor", "Salesforce/blip2-opt-2.7b",
        _build_blip2, prompt_style="prefix", size_multiple=14,
        notes="OPT text; tokenizer.image_token left unset (the processor adds <image>); 8 query tokens",
    ),
}


# --- Building and caching ---------------------------------------------------


def _recipe_fingerprint(family: str, texts: list[str], seed: int, image_size: int,
                        options: dict[str, Any] | None = None) -> str:
    digest = hashlib.sha256()
    sizes = [TEXT_HIDDEN, TEXT_LAYERS, TEXT_HEADS, TEXT_KV_HEADS, TEXT_FFN,
             VISION_HIDDEN, VISION_LAYERS, VISION_HEADS, VISION_FFN]  # resized towers make a new twin
    digest.update(json.dumps([TWIN_FORMAT_VERSION, family, seed, image_size, sizes]).encode())
    if options:  # only non-default options enter, so default twins keep their fingerprints
        digest.update(json.dumps(options, sort_keys=True).encode())
    digest.update(json.dumps(family_config(family), sort_keys=True).encode())  # new facts make a new twin
    for text in texts:
        digest.update(text.encode("utf-8", "replace") + b"\0")
    return digest.hexdigest()[:16]


def _is_complete(out_dir: Path, fingerprint: str) -> bool:
    meta_path = out_dir / META_FILE
    if not meta_path.is_file():
        return False
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except ValueError:
        return False
    needed = ("config.json", "model.safetensors")
    return meta.get("fingerprint") == fingerprint and all((out_dir / n).is_file() for n in needed)


def build_tiny_model(family: str, out_dir: str | os.PathLike[str], texts: Iterable[str] | None = None,
                     data_dir: str | os.PathLike[str] | None = None, seed: int = 0,
                     image_size: int = DEFAULT_IMAGE_SIZE, force: bool = False, image_splitting: bool = False) -> Path:
    """Build (or reuse) the tiny twin of ``family`` in ``out_dir`` and return ``out_dir``.

    The tokenizer is trained on the schema vocabulary plus ``texts`` and the texts found in
    ``data_dir`` (see :func:`data_texts`). Weights are initialised from ``seed`` so the same
    inputs give the same twin; a folder already holding a twin with the same recipe, texts,
    seed and image size (``twin_meta.json``) is reused unless ``force``. ``image_splitting``
    (SmolVLM only) splits images into tiles plus a global view, as the real checkpoint does.
    """
    if family not in FAMILIES:
        raise KeyError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    if image_splitting and family != "smolvlm":
        raise ValueError(f"image_splitting is a SmolVLM/Idefics3 setting; the {family} twin has no tiles to split")
    recipe = FAMILIES[family]
    out_dir = Path(out_dir)
    requested_size = image_size
    image_size = _fit(image_size, recipe.size_multiple)
    all_texts = schema_texts(seed) + list(texts or []) + (data_texts(data_dir) if data_dir else [])
    options = {"image_splitting": True} if image_splitting else {}
    fingerprint = _recipe_fingerprint(family, all_texts, seed, image_size, options)
    if not force and _is_complete(out_dir, fingerprint):
        return out_dir
    import torch  # only now: a cache hit needs no torch

    start = time.perf_counter()
    torch.manual_seed(seed)
    random.seed(seed)
    model, processor = recipe.build(all_texts, image_size, **options)
    model.eval()
    _set_generation_defaults(model, processor.tokenizer, family)
    with atomic_dir(out_dir, clear=_remove_previous_twin) as staging:
        _save_twin(model, processor, staging, {
            "family": family, "model_class": recipe.model_class, "processor_class": recipe.processor_class,
            "imitates": recipe.imitates, "seed": seed, "image_size": image_size,
            "requested_image_size": requested_size, "fingerprint": fingerprint, **options,
            "format_version": TWIN_FORMAT_VERSION, "n_params": sum(p.numel() for p in model.parameters()),
            "vocab_size": len(processor.tokenizer), "n_texts": len(all_texts),
            "build_seconds": round(time.perf_counter() - start, 2),
        })
    return out_dir


def _save_twin(model: Any, processor: Any, folder: Path, meta: dict[str, Any]) -> None:
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    write_json(folder / META_FILE, meta)


def _remove_previous_twin(out_dir: Path) -> None:
    """Clear ``out_dir`` for a rebuild, refusing to delete a folder that is not a twin."""
    if not out_dir.exists():
        return
    if out_dir.is_dir() and (not any(out_dir.iterdir()) or (out_dir / META_FILE).is_file()):
        remove_tree(out_dir)
        return
    raise FileExistsError(
        f"{out_dir} exists and is not a tiny twin (no {META_FILE}); pass an empty or new folder as --out"
    )


def _set_generation_defaults(model: Any, tok: Any, family: str) -> None:
    """Stop where the published generation config stops (``generation_eos``) and pad with the pad token."""
    gen = model.generation_config
    eos = [_single_token_id(tok, text, family) for text in family_config(family)["generation_eos"]]
    gen.eos_token_id = eos[0] if len(eos) == 1 else eos
    gen.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if tok.bos_token_id is not None:
        gen.bos_token_id = tok.bos_token_id


def _single_token_id(tok: Any, text: str, family: str) -> int:
    """The id of ``text`` as one token (a special token, or plain text such as OPT's newline)."""
    token_id = tok.convert_tokens_to_ids(text)
    if token_id is not None and (token_id != tok.unk_token_id or text == tok.unk_token):
        return token_id
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"{family}: generation_eos {text!r} is {len(ids)} tokens in the twin's vocabulary, not one")
    return ids[0]


def load_twin(path: str | os.PathLike[str]) -> tuple[Any, Any]:
    """Load a twin's model (its family class) and processor from ``path``; safetensors only."""
    import transformers
    from transformers import AutoProcessor

    path = Path(path)
    meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    model_cls = getattr(transformers, meta["model_class"])
    model = model_cls.from_pretrained(path, use_safetensors=True)
    processor = AutoProcessor.from_pretrained(path)
    return model, processor


_VISION_PARAM = re.compile(r"(^|\.)(visual|vision_tower|vision_model|vision|image_encoder|vision_encoder)\.")


def is_vision_param(name: str) -> bool:
    """True for a parameter of the vision tower (for freezing or gradient checks)."""
    return bool(_VISION_PARAM.search(name))


def iter_families(selection: str) -> Iterator[str]:
    """``all`` or a comma-separated list of family keys."""
    names = list(FAMILIES) if selection == "all" else [s.strip() for s in selection.split(",") if s.strip()]
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise KeyError(f"unknown family {', '.join(unknown)}; choose from {', '.join(FAMILIES)} or 'all'")
    yield from names


# --- CLI --------------------------------------------------------------------


def configure_cli(parser: argparse.ArgumentParser) -> None:
    from bvip_helpers.io import resolve_cli_path

    parser.add_argument("--family", required=True,
                        help=f"one of {', '.join(FAMILIES)}, a comma-separated list, or 'all'")
    parser.add_argument("--data_dir", type=resolve_cli_path, default=None,
                        help="a `bvip build-dataset` output or a `bvip synth` output; its texts train the tokenizer")
    parser.add_argument("--out", type=resolve_cli_path, default=None,
                        help=f"output folder (default {DEFAULT_TWIN_ROOT}/tiny-<family>); with several families "
                             "or 'all', the parent folder that gets one tiny-<family> sub-folder per family")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image_size", type=int, default=DEFAULT_IMAGE_SIZE)
    parser.add_argument("--force", action="store_true", help="rebuild even if a matching twin is cached")
    parser.add_argument("--image_splitting", action="store_true",
                        help="SmolVLM: split images into tiles plus a global view, as the real checkpoint does")


def run_cli(args: argparse.Namespace) -> int:
    from bvip_helpers.io import resolve_cli_path

    families = list(iter_families(args.family))
    data_dir = args.data_dir
    single = len(families) == 1 and args.family != "all" and args.out is not None
    out = args.out or resolve_cli_path(DEFAULT_TWIN_ROOT)
    for family in families:
        target = out if single else out / f"tiny-{family}"
        start = time.perf_counter()
        build_tiny_model(family, target, data_dir=data_dir, seed=args.seed, image_size=args.image_size,
                         force=args.force, image_splitting=args.image_splitting)
        meta = json.loads((target / META_FILE).read_text(encoding="utf-8"))
        print(f"{family:16s} {meta['model_class']:42s} {meta['n_params'] / 1e6:6.2f}M params  "
              f"{time.perf_counter() - start:5.1f}s  -> {target}")
    return 0
