"""Per-family text and image handling: one place that knows how each model family wants its inputs.

Training and generation share these helpers, so a prompt is tokenized the same way in
both and the model never sees at inference a prompt it was not trained on.

* :func:`format_prompt` -- the prompt text for a family: its chat template
  (``add_generation_prompt``), a task prefix, or nothing.
* :func:`collate_train` -- a training batch whose ``labels`` are ``-100`` everywhere except
  the assistant response and its end token: prompt, image and padding tokens never count.
  The prompt goes through the processor (which expands the image placeholders), the
  response is tokenized on its own and appended, so the boundary is exact.
* :func:`generation_inputs` / :func:`decode_generated` -- left-padded, batched prompts and
  the generated text with the prompt stripped.
* :func:`family_config` -- the facts of each family's published checkpoint (chat template, special
  tokens, end-of-turn token, image-processor settings), one data file per family in
  ``bvip_helpers/configs/families/``, each naming its source. :func:`assistant_text` renders the
  assistant turn exactly as the checkpoint's chat template does, ended by its end-of-turn token
  (:func:`end_token`), and generation stops on that token (:func:`stop_token_ids`).

Family rules (the ``family`` of a registry :class:`ModelSpec`):

* decoder-only (Qwen2/2.5-VL, SmolVLM, DeepSeek-VL, InternVL, Janus, LLaVA-OneVision, BLIP-2):
  prompt ids + response ids in one causal sequence.
* PaliGemma: the same layout plus ``token_type_ids`` (0 prefix, 1 suffix), exactly what the
  processor's ``suffix=`` builds; the suffix is causal, so labels cannot leak.
* Florence-2: encoder-decoder; the prompt feeds the encoder, the response is the decoder target.
* BLIP: the caption itself is the decoder sequence; only its first token (the decoder BOS) is masked.
  That first token is ``[DEC]`` (the tokenizer's BOS, ``text_config.bos_token_id``), as BLIP's
  ``generate()`` writes it over the processor's ``[CLS]``; ``forward()`` does not, so the collator does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from bvip_helpers.io import load_image, safe_image_path

IGNORE_INDEX = -100
#: families whose prompt feeds an encoder and whose response is the decoder's target.
ENCODER_DECODER_FAMILIES = frozenset({"florence2"})
#: families that train on the caption alone (no prompt) through a text decoder with its own BOS.
CAPTION_ONLY_FAMILIES = frozenset({"blip"})
#: families whose attention depends on token_type_ids (bidirectional prefix, causal suffix).
PREFIX_LM_FAMILIES = frozenset({"paligemma"})
#: one JSON file of published-checkpoint facts per family (see :func:`family_config`).
FAMILY_CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "families"


# --- Facts of the published checkpoints ----------------------------------------


@cache
def _read_family_config(family: str) -> dict[str, Any]:
    path = FAMILY_CONFIG_DIR / f"{family}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in FAMILY_CONFIG_DIR.glob("*.json")))
        raise KeyError(f"no checkpoint facts for family {family!r} in {FAMILY_CONFIG_DIR} (known: {known})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); fix the file") from err


def family_config(family: str) -> dict[str, Any]:
    """The published checkpoint's facts for ``family`` (a copy): ``checkpoint``, ``source``,
    ``chat_template``, ``special_tokens``, ``end_of_turn``, ``generation_eos``, ``image_processor``..."""
    return json.loads(json.dumps(_read_family_config(family)))


# --- Records ----------------------------------------------------------------


def _message_text(record: dict[str, Any], role: str) -> str:
    """The text of the first ``role`` message of a chat record."""
    for message in record["messages"]:
        if message.get("role") == role:
            return _text_of(message)
    raise ValueError(f"record for {record.get('image')!r} has no {role} message")


def record_prompt(record: dict[str, Any]) -> str:
    """The user's text of a chat record (``messages``) or the ``prompt`` of an SFT record."""
    if "messages" in record:
        return _message_text(record, "user")
    return str(record.get("prompt", ""))


def record_response(record: dict[str, Any]) -> str:
    """The assistant's text of a chat record or the ``response`` of an SFT record."""
    if "messages" in record:
        return _message_text(record, "assistant")
    if "response" not in record:
        raise ValueError(f"record for {record.get('image')!r} has neither 'messages' nor 'response'")
    return str(record["response"])


def record_image_path(record: dict[str, Any]) -> str:
    images = record.get("images") or [record.get("image")]
    if not images or not images[0]:
        raise ValueError(f"record has no image: {str(record)[:200]}")
    return str(images[0])


def _text_of(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content or [] if part.get("type") == "text")


def load_record_image(image_root: str | os.PathLike[str], record: dict[str, Any]):
    """The record's image, resolved safely under ``image_root``."""
    return load_image(safe_image_path(image_root, record_image_path(record)))


# --- Prompts ----------------------------------------------------------------


def prompt_style(spec: Any) -> str:
    return getattr(spec, "prompt_style", "chat") or "chat"


def format_prompt(processor: Any, spec: Any, prompt: str) -> str:
    """The text a family's processor expects for one image + ``prompt`` (generation prompt included)."""
    style = prompt_style(spec)
    prefix = getattr(spec, "task_prefix", "") or ""
    if style == "chat":
        return processor.apply_chat_template(_chat_messages(prompt), tokenize=False, add_generation_prompt=True)
    if style == "prefix":
        # PaliGemma ("caption en") and Florence-2 (a task token, which must stand alone) keep
        # their native task prompt; the long instruction is written for chat models.
        return prefix or prompt
    return prefix  # "none": caption-only models (BLIP, BLIP-2), optionally with a fixed text prefix


def _tokenizer(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def end_token(processor: Any, spec: Any = None) -> str:
    """The token that ends a response: the end-of-turn token of the family's chat template.

    That is not always the tokenizer's EOS: a SmolVLM/Idefics3 turn ends with ``<end_of_utterance>``,
    which a tokenizer may not name as its EOS. The family's facts (:func:`family_config`) say which
    token it is; a tokenizer without it (an unknown local checkpoint) falls back to its EOS.
    """
    tok = _tokenizer(processor)
    family = getattr(spec, "family", None)
    if family:
        token = family_config(family).get("end_of_turn")
        if token and _known_token(tok, token):
            return token
    if tok.eos_token is None:
        raise ValueError(f"{type(tok).__name__} has no eos_token; set one so the model learns to stop")
    return tok.eos_token


def _known_token(tok: Any, token: str) -> bool:
    """True when ``token`` is one token of ``tok``'s vocabulary (not mapped to its unknown token)."""
    token_id = tok.convert_tokens_to_ids(token)
    return token_id is not None and (token_id != tok.unk_token_id or token == tok.unk_token)


def _chat_messages(prompt: str, response: str | None = None) -> list[dict[str, Any]]:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    if response is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": response}]})
    return messages


def assistant_text(processor: Any, spec: Any, prompt: str, response: str) -> str:
    """What the model is trained to write after the generation prompt: the assistant turn exactly as
    the family's chat template renders it, up to and including its end-of-turn token.

    The template is rendered with and without the answer; the text between the generation prompt and
    the response (SmolVLM's and Janus's ``Assistant:`` are followed by a space in the rendered turn) and
    after it (up to the end-of-turn token) is kept. A template that closes a turn only when another
    follows (DeepSeek-VL, Janus) gets its end-of-turn token appended. Where the template's own
    generation prompt differs from its rendered turn header (LLaVA-OneVision writes
    ``<|im_start|>assistant \n`` in a turn but ``<|im_start|>assistant\n`` as the prompt), the model
    learns what follows the prompt it will really be given: the response and the end token.
    Prefix and caption-only families train on ``response + end token``.
    """
    end = end_token(processor, spec)
    if prompt_style(spec) != "chat":
        return response + end
    user_turn = processor.apply_chat_template(_chat_messages(prompt), tokenize=False)
    generation_prompt = format_prompt(processor, spec, prompt)
    full = processor.apply_chat_template(_chat_messages(prompt, response), tokenize=False)
    if not (full.startswith(user_turn) and generation_prompt.startswith(user_turn)):
        raise ValueError(f"{getattr(spec, 'family', '?')}: the chat template renders the user turn differently "
                         "with and without the answer; cannot tell where the assistant turn starts")
    header = generation_prompt[len(user_turn):]
    turn = full[len(user_turn):]
    at = turn.find(response)
    if at < 0:
        raise ValueError(f"{getattr(spec, 'family', '?')}: the chat template rewrites the response text "
                         f"(leading or trailing whitespace?): {response[:80]!r}")
    lead, tail = turn[:at], turn[at + len(response):]
    extra = lead[len(header):] if lead.startswith(header) else ""
    tail = tail[: tail.index(end) + len(end)] if end in tail else tail.rstrip() + end
    return extra + response + tail


@contextmanager
def padding_side(processor: Any, side: str):
    tok = _tokenizer(processor)
    old = tok.padding_side
    tok.padding_side = side
    try:
        yield
    finally:
        tok.padding_side = old


def _call_processor(processor: Any, texts: list[str], images: list[Any], **kwargs: Any) -> Any:
    """Batch through the processor; one image per sample, passed nested ([[img], [img]])."""
    return processor(text=texts, images=[[img] for img in images], return_tensors="pt", padding=True, **kwargs)


# --- Training batches -------------------------------------------------------


@dataclass
class _Row:
    ids: list[int]
    labels: list[int]
    extras: dict[str, list[int]]  # per-token tensors other than input_ids / attention_mask


def collate_train(processor: Any, spec: Any, examples: Sequence[dict[str, Any]],
                  image_root: str | os.PathLike[str], max_length: int | None = None) -> dict[str, Any]:
    """A training batch for ``examples`` (chat or SFT records).

    ``labels`` are ``-100`` on the prompt, the image tokens and the padding; only the response
    tokens and the end token count. A sample longer than ``max_length`` raises (never truncated:
    cutting image tokens breaks the model, cutting the response teaches it to stop early).
    """
    images = [load_record_image(image_root, ex) for ex in examples]
    prompts = [record_prompt(ex) for ex in examples]
    responses = [record_response(ex) for ex in examples]
    return collate_from_parts(processor, spec, images, prompts, responses, max_length)


def collate_from_parts(processor: Any, spec: Any, images: list[Any], prompts: list[str], responses: list[str],
                       max_length: int | None = None) -> dict[str, Any]:
    """:func:`collate_train` for images already loaded (benchmarks cache them)."""
    family = getattr(spec, "family", "")
    if family in ENCODER_DECODER_FAMILIES:
        return _collate_encoder_decoder(processor, spec, images, prompts, responses, max_length)
    return _collate_causal(processor, spec, images, prompts, responses, max_length)


@dataclass
class EncodedExample:
    """One training example run through the processor once: its unpadded row and image tensors."""

    row: _Row
    inputs: dict[str, Any]

    @property
    def nbytes(self) -> int:
        return sum(v.element_size() * v.nelement() for v in self.inputs.values() if hasattr(v, "nelement"))


def encode_example(processor: Any, spec: Any, image: Any, prompt: str, response: str) -> EncodedExample | None:
    """The processor's work for one example, to be cached and batched by :func:`collate_encoded`.

    ``None`` for encoder-decoder families, whose batches are built by :func:`collate_from_parts` only.
    """
    if getattr(spec, "family", "") in ENCODER_DECODER_FAMILIES:
        return None
    rows, enc = _causal_rows(processor, spec, [image], [prompt], [response])
    return EncodedExample(rows[0], dict(enc))


def collate_encoded(processor: Any, spec: Any, examples: Sequence[EncodedExample],
                    max_length: int | None = None) -> dict[str, Any]:
    """The batch :func:`collate_from_parts` would build from the same examples, without the processor.

    Image tensors are concatenated along their first axis, which is how the processors batch one
    image per sample (stacked for fixed-size images, flattened patches plus grids for Qwen2-VL).
    Where the examples differ in a later axis (SmolVLM/Idefics3 split an image into a number of tiles
    that depends on its aspect ratio; LLaVA-OneVision's anyres patches) they are zero-padded to the
    batch's largest, as the processors themselves pad a batch (:func:`pad_and_concat`).
    """
    per_token = {"input_ids", "attention_mask", "labels", *examples[0].row.extras}
    first = examples[0].inputs
    enc = {k: (pad_and_concat([e.inputs[k] for e in examples]) if k not in per_token else v) for k, v in first.items()}
    return _pad_causal(processor, spec, [e.row for e in examples], enc, max_length)


def pad_and_concat(tensors: Sequence[Any]) -> Any:
    """Concatenate along axis 0, zero-padding every later axis to the largest size in the batch.

    Zeros are what the SmolVLM/Idefics3 and LLaVA-OneVision processors pad with: the models drop
    all-zero tiles (and ``pixel_attention_mask`` is 0 there), so a padded batch computes what the
    processor's own batch computes.
    """
    import torch

    shapes = {tuple(t.shape[1:]) for t in tensors}
    if len(shapes) == 1:
        return torch.cat(list(tensors))
    if len({t.dim() for t in tensors}) != 1:
        raise ValueError(f"cannot batch image tensors of ranks {sorted({t.dim() for t in tensors})}")
    target = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    padded = []
    for t in tensors:
        out = t.new_zeros((t.shape[0], *target))
        out[(slice(None), *(slice(0, n) for n in t.shape[1:]))] = t
        padded.append(out)
    return torch.cat(padded)


def _response_ids(processor: Any, spec: Any, prompt: str, response: str) -> list[int]:
    text = assistant_text(processor, spec, prompt, response)
    return _tokenizer(processor)(text, add_special_tokens=False)["input_ids"]


def _collate_causal(processor: Any, spec: Any, images: list[Any], prompts: list[str], responses: list[str],
                    max_length: int | None) -> dict[str, Any]:
    rows, enc = _causal_rows(processor, spec, images, prompts, responses)
    return _pad_causal(processor, spec, rows, enc, max_length)


def _causal_rows(processor: Any, spec: Any, images: list[Any], prompts: list[str],
                 responses: list[str]) -> tuple[list[_Row], Any]:
    """Unpadded (ids, labels, per-token extras) rows and the processor output (image tensors)."""
    family = getattr(spec, "family", "")
    if family in CAPTION_ONLY_FAMILIES:
        # BLIP's decoder starts from its own BOS: the "prompt" is the (optional) prefix, no end token after it.
        texts = [format_prompt(processor, spec, p) for p in prompts]
        with padding_side(processor, "right"):
            enc = _call_processor(processor, texts, images)
        prompt_rows = _unpadded_rows(enc)
        prompt_rows = [_drop_trailing(row, _tokenizer(processor).sep_token_id) for row in prompt_rows]
        bos = decoder_bos_id(processor)
        prompt_rows = [_Row([bos, *row.ids[1:]], row.labels, row.extras) for row in prompt_rows]
    else:
        texts = [format_prompt(processor, spec, p) for p in prompts]
        with padding_side(processor, "right"):
            enc = _call_processor(processor, texts, images)
        prompt_rows = _unpadded_rows(enc)
    rows = []
    for row, prompt, response in zip(prompt_rows, prompts, responses, strict=True):
        target = _response_ids(processor, spec, prompt, response)
        extras = {k: v + [1 if k == "token_type_ids" else 0] * len(target) for k, v in row.extras.items()}
        rows.append(_Row(row.ids + target, [IGNORE_INDEX] * len(row.ids) + target, extras))
    return rows, enc


def _pad_causal(processor: Any, spec: Any, rows: list[_Row], enc: Any, max_length: int | None) -> dict[str, Any]:
    """Right-pad ``rows`` into a batch; ``enc`` gives the image tensors and the extras' dtypes."""
    import torch

    family = getattr(spec, "family", "")
    _check_length(rows, max_length)
    pad_id = _pad_id(processor)
    width = max(len(r.ids) for r in rows)
    # PaliGemma's processor returns prompt-only "labels" even without a suffix: ours replace them.
    skip = {"input_ids", "attention_mask", "labels", *rows[0].extras}
    batch: dict[str, Any] = {k: v for k, v in enc.items() if k not in skip}
    batch["input_ids"] = torch.tensor([r.ids + [pad_id] * (width - len(r.ids)) for r in rows])
    batch["attention_mask"] = torch.tensor([[1] * len(r.ids) + [0] * (width - len(r.ids)) for r in rows])
    batch["labels"] = torch.tensor([r.labels + [IGNORE_INDEX] * (width - len(r.labels)) for r in rows])
    for key in rows[0].extras:
        dtype = enc[key].dtype
        batch[key] = torch.tensor([r.extras[key] + [0] * (width - len(r.ids)) for r in rows], dtype=dtype)
    if family in PREFIX_LM_FAMILIES and "token_type_ids" not in batch:
        raise ValueError(f"{family}: the processor returned no token_type_ids; the suffix would not be causal")
    return batch


def _collate_encoder_decoder(processor: Any, spec: Any, images: list[Any], prompts: list[str],
                             responses: list[str], max_length: int | None) -> dict[str, Any]:
    import torch

    texts = [format_prompt(processor, spec, p) for p in prompts]
    enc = _call_processor(processor, texts, images)
    rows = [_Row(t, t, {}) for t in (_response_ids(processor, spec, p, r) for p, r in zip(prompts, responses, strict=True))]
    _check_length(rows, max_length, encoder_len=enc["input_ids"].shape[1])
    width = max(len(r.ids) for r in rows)
    batch = dict(enc)
    # The model shifts labels right (decoder_start_token) to build its decoder inputs.
    batch["labels"] = torch.tensor([r.labels + [IGNORE_INDEX] * (width - len(r.labels)) for r in rows])
    return batch


def _unpadded_rows(enc: Any) -> list[_Row]:
    """Each sample's non-padding tokens (either padding side) with its other per-token tensors."""
    ids, mask = enc["input_ids"], enc["attention_mask"]
    per_token = [k for k, v in enc.items()
                 if k not in {"input_ids", "attention_mask", "labels"} and hasattr(v, "shape") and tuple(v.shape) == tuple(ids.shape)]
    rows = []
    for i in range(ids.shape[0]):
        keep = mask[i].bool()
        rows.append(_Row(ids[i][keep].tolist(), [], {k: enc[k][i][keep].tolist() for k in per_token}))
    return rows


def decoder_bos_id(processor: Any) -> int:
    """BLIP's decoder start token (``[DEC]``): what ``generate()`` puts first, so training must start with it too.

    :func:`bvip_helpers.registry.load_model_and_processor` makes the tokenizer's BOS the model's
    ``text_config.bos_token_id``.
    """
    bos = _tokenizer(processor).bos_token_id
    if bos is None:
        raise ValueError("the BLIP tokenizer has no bos_token ([DEC]); load it with "
                         "bvip_helpers.registry.load_model_and_processor, which sets it from the model config")
    return bos


def _drop_trailing(row: _Row, token_id: int | None) -> _Row:
    if token_id is not None and row.ids and row.ids[-1] == token_id:
        return _Row(row.ids[:-1], [], {k: v[:-1] for k, v in row.extras.items()})
    return row


def _pad_id(processor: Any) -> int:
    tok = _tokenizer(processor)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pad is None:
        raise ValueError(f"{type(tok).__name__} has neither a pad nor an eos token")
    return pad


class SequenceTooLongError(ValueError):
    """A training sample does not fit ``max_length``."""


def _check_length(rows: list[_Row], max_length: int | None, encoder_len: int = 0) -> None:
    if not max_length:
        return
    longest = max(max(len(r.ids) for r in rows), encoder_len)
    if longest > max_length:
        raise SequenceTooLongError(
            f"a sample needs {longest} tokens but max_length is {max_length}; truncating would cut image "
            "tokens or the response. Raise --max_length (see the pre-flight token budget) or shorten the prompt."
        )


def sample_token_counts(processor: Any, spec: Any, image: Any, prompt: str, response: str) -> dict[str, int]:
    """Token budget of one sample: image tokens, prompt tokens (images included), response tokens, total."""
    batch = collate_from_parts(processor, spec, [image], [prompt], [response])
    family = getattr(spec, "family", "")
    response_len = int((batch["labels"] != IGNORE_INDEX).sum())
    image_id = image_token_id(processor)
    if family in ENCODER_DECODER_FAMILIES:
        encoder = batch["input_ids"][0]
        n_image = int((encoder == image_id).sum()) if image_id is not None else 0
        return {"image_tokens": n_image, "prompt_tokens": int(encoder.numel()),
                "response_tokens": response_len, "total_tokens": max(int(encoder.numel()), response_len)}
    ids = batch["input_ids"][0]
    n_image = int((ids == image_id).sum()) if image_id is not None else 0
    total = int(batch["attention_mask"][0].sum())
    return {"image_tokens": n_image, "prompt_tokens": total - response_len, "response_tokens": response_len,
            "total_tokens": total}


def image_token_id(processor: Any) -> int | None:
    """The id of the image placeholder token the processor expands, if the family has one."""
    for owner in (processor, _tokenizer(processor)):
        value = getattr(owner, "image_token_id", None)
        if isinstance(value, int):
            return value
    token = getattr(processor, "image_token", None) or getattr(_tokenizer(processor), "image_token", None)
    if isinstance(token, str):
        return _tokenizer(processor).convert_tokens_to_ids(token)
    return None


def decode_labels(processor: Any, batch: dict[str, Any], index: int, skip_special_tokens: bool = False) -> str:
    """The text of sample ``index``'s unmasked label tokens (what the loss covers)."""
    labels = batch["labels"][index]
    return _tokenizer(processor).decode(labels[labels != IGNORE_INDEX].tolist(),
                                        skip_special_tokens=skip_special_tokens)


# --- Generation -------------------------------------------------------------


def generation_inputs(processor: Any, spec: Any, images: list[Any], prompts: list[str]) -> Any:
    """Left-padded model inputs for greedy batched generation (generation prompt included)."""
    family = getattr(spec, "family", "")
    texts = [format_prompt(processor, spec, p) for p in prompts]
    with padding_side(processor, "left"):
        if family in CAPTION_ONLY_FAMILIES and not any(texts):
            return processor(images=images, return_tensors="pt")
        enc = _call_processor(processor, texts, images)
    if family in CAPTION_ONLY_FAMILIES:
        # Generate after the prefix, not after its [SEP].
        sep = _tokenizer(processor).sep_token_id
        if sep is not None and bool((enc["input_ids"][:, -1] == sep).all()):
            enc["input_ids"] = enc["input_ids"][:, :-1]
            enc["attention_mask"] = enc["attention_mask"][:, :-1]
    return enc


def decode_generated(processor: Any, spec: Any, output_ids: Any, inputs: Any) -> list[str]:
    """Generated texts without the prompt and special tokens, stripped."""
    family = getattr(spec, "family", "")
    if family not in ENCODER_DECODER_FAMILIES and "input_ids" in inputs:
        prompt_len = inputs["input_ids"].shape[1]
        if output_ids.shape[1] >= prompt_len and bool((output_ids[:, :prompt_len] == inputs["input_ids"]).all()):
            output_ids = output_ids[:, prompt_len:]
    texts = _tokenizer(processor).batch_decode(output_ids, skip_special_tokens=True)
    return [t.strip() for t in texts]


def stop_token_ids(processor: Any, spec: Any, model: Any = None) -> list[int]:
    """The ids generation stops on: the family's end-of-turn token (what SFT trains the model to write),
    then the model's own EOS ids, except those that decode to whitespace only.

    BLIP-2's published config stops on OPT's newline token (50118), which ends a one-line caption;
    a BVIP caption spans lines, so it would be cut after ``RoadVsSidewalk``.
    """
    tok = _tokenizer(processor)
    ids = [tok.convert_tokens_to_ids(end_token(processor, spec))]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for token_id in [configured] if isinstance(configured, int) else list(configured or []):
        if token_id not in ids and tok.decode([token_id]).strip():
            ids.append(token_id)
    return ids


def generate_captions(model: Any, processor: Any, spec: Any, images: list[Any], prompts: list[str],
                      max_new_tokens: int = 96, **generate_kwargs: Any) -> list[str]:
    """Greedy captions for one batch (no sampling, so reruns agree)."""
    import torch

    inputs = generation_inputs(processor, spec, images, prompts)
    inputs = inputs.to(model.device)
    if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    if getattr(model.generation_config, "pad_token_id", None) is None and getattr(spec, "family", "") != "blip":
        generate_kwargs.setdefault("pad_token_id", _pad_id(processor))  # silences the open-end warning
    if getattr(spec, "family", "") != "blip":  # BLIP's generate() stops on its [SEP] by itself
        generate_kwargs.setdefault("eos_token_id", stop_token_ids(processor, spec, model))
    # BLIP's generate() writes its BOS into input_ids in place; decode_generated needs the ids as they were.
    model_inputs = {k: v.clone() if k == "input_ids" else v for k, v in inputs.items()}
    with torch.no_grad():
        output = model.generate(**model_inputs, max_new_tokens=max_new_tokens, do_sample=False, **generate_kwargs)
    return decode_generated(processor, spec, output, inputs)
