"""Per-family batches: the loss sees exactly the response; PaliGemma's suffix stays causal."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from PIL import Image, ImageDraw  # noqa: E402

from bvip_helpers import families, schema  # noqa: E402
from bvip_helpers.demo import twins  # noqa: E402

RESPONSES = [
    schema.compose_caption(schema.SceneLabels("left", "right", near={"person": ["center"]},
                                              far={"traffic light": ["left"]}), "A sidewalk with a pedestrian."),
    schema.compose_caption(schema.SceneLabels("center", "front")),
]
PROMPTS = [schema.DEFAULT_PROMPT, "Describe the scene."]
ALL_FAMILIES = list(twins.FAMILIES)


@pytest.fixture(scope="session")
def twin_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("family_twins")


_LOADED: dict[str, tuple] = {}


def load_family(family: str, root) -> tuple:
    """(model, processor, spec) of the family's twin, built and loaded once per session."""
    if family not in _LOADED:
        from bvip_helpers.registry import get_spec, load_model_and_processor

        path = twins.build_tiny_model(family, root / family, texts=RESPONSES, seed=0)
        spec = get_spec(str(path))
        model, processor = load_model_and_processor(spec)
        _LOADED[family] = (model.eval(), processor, spec)
    return _LOADED[family]


def scene_image(seed: int, size=(160, 120)) -> Image.Image:
    img = Image.new("RGB", size, (90, 150 + 20 * seed, 80))
    ImageDraw.Draw(img).rectangle([10 * seed, 30, 10 * seed + 50, size[1] - 1], fill=(200, 200, 200))
    return img


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_unmasked_labels_are_exactly_the_response(family, twin_dir):
    model, processor, spec = load_family(family, twin_dir)
    images = [scene_image(0), scene_image(1, size=(120, 150))]  # different sizes: different image token counts
    batch = families.collate_from_parts(processor, spec, images, PROMPTS, RESPONSES)
    tok = processor.tokenizer
    end_id = tok.convert_tokens_to_ids(families.end_token(processor, spec))
    for i, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES, strict=True)):
        labels = batch["labels"][i]
        kept = labels[labels != families.IGNORE_INDEX]
        # the assistant turn as the family's chat template renders it (SmolVLM's starts with a space)
        assert tok.decode(kept.tolist(), skip_special_tokens=True).strip() == response
        assert tok.decode(kept.tolist()) == families.assistant_text(processor, spec, prompt, response)
        assert int(kept[-1]) == end_id, "the end-of-turn token must be trained so the model learns to stop"
        if "attention_mask" in batch and spec.family not in families.ENCODER_DECODER_FAMILIES:
            # padding and image tokens never count
            assert bool((labels[batch["attention_mask"][i] == 0] == families.IGNORE_INDEX).all())
            image_id = families.image_token_id(processor)
            if image_id is not None:
                assert bool((labels[batch["input_ids"][i] == image_id] == families.IGNORE_INDEX).all())
    # the batch is a valid model input with a finite loss on the response only
    with torch.no_grad():
        loss = model(**batch).loss
    assert torch.isfinite(loss)


@pytest.mark.parametrize("family", ["qwen2-vl", "paligemma", "florence2", "blip"])
def test_generation_inputs_and_decode_strip_the_prompt(family, twin_dir):
    model, processor, spec = load_family(family, twin_dir)
    inputs = families.generation_inputs(processor, spec, [scene_image(0), scene_image(1, (100, 140))], PROMPTS)
    tok = processor.tokenizer
    answer = tok("Sidewalk: left.", add_special_tokens=False)["input_ids"]
    if "input_ids" in inputs and family not in families.ENCODER_DECODER_FAMILIES:
        if inputs["attention_mask"].shape[0] == 2 and not bool(inputs["attention_mask"].all()):
            assert bool(inputs["attention_mask"][:, -1].all()), "prompts must be left-padded for generation"
        fake = torch.cat([inputs["input_ids"], torch.tensor([answer, answer])], dim=1)
    else:
        fake = torch.tensor([answer, answer])
    assert families.decode_generated(processor, spec, fake, inputs) == ["Sidewalk: left."] * 2
    texts = families.generate_captions(model, processor, spec, [scene_image(0)], PROMPTS[:1], max_new_tokens=3)
    assert len(texts) == 1 and isinstance(texts[0], str)


def test_blip_trains_from_the_token_generate_starts_from(twin_dir, monkeypatch):
    """BLIP's generate() puts text_config.bos_token_id ([DEC]) first; forward() does not, so the batch must."""
    model, processor, spec = load_family("blip", twin_dir)
    bos = model.config.text_config.bos_token_id
    assert bos is not None and bos != processor.tokenizer.cls_token_id
    batch = families.collate_from_parts(processor, spec, [scene_image(0), scene_image(1)], PROMPTS, RESPONSES)
    assert batch["input_ids"][:, 0].tolist() == [bos, bos]
    assert batch["labels"][:, 0].tolist() == [families.IGNORE_INDEX] * 2  # the start token is input, not target

    seen = {}
    real = model.text_decoder.generate

    def spy(*args, **kwargs):
        seen["input_ids"] = kwargs["input_ids"].clone()
        return real(*args, **kwargs)

    monkeypatch.setattr(model.text_decoder, "generate", spy)
    prefixed = replace(spec, task_prefix="a photo of")  # with input_ids, as a prefix gives
    for s in (spec, prefixed):
        families.generate_captions(model, processor, s, [scene_image(0)], PROMPTS[:1], max_new_tokens=2)
        assert int(seen["input_ids"][0, 0]) == int(batch["input_ids"][0, 0]) == bos


def test_generation_does_not_edit_the_callers_input_ids(twin_dir, monkeypatch):
    """BLIP's generate() writes its BOS into input_ids in place; the prompt ids used for decoding stay intact."""
    model, processor, spec = load_family("blip", twin_dir)
    prefixed = replace(spec, task_prefix="a photo of")
    inputs = families.generation_inputs(processor, prefixed, [scene_image(0)], PROMPTS[:1])
    original = inputs["input_ids"].clone()
    monkeypatch.setattr(families, "generation_inputs", lambda *a, **k: inputs)
    seen = {}
    real = families.decode_generated

    def spy(processor, spec, output_ids, given):
        seen["ids"] = given["input_ids"].clone()
        return real(processor, spec, output_ids, given)

    monkeypatch.setattr(families, "decode_generated", spy)
    families.generate_captions(model, processor, prefixed, [scene_image(0)], PROMPTS[:1], max_new_tokens=2)
    assert torch.equal(inputs["input_ids"], original) and torch.equal(seen["ids"], original)


@pytest.mark.parametrize("family", ["qwen2-vl", "smolvlm"])
def test_batched_greedy_equals_one_by_one(family, twin_dir):
    """Batch 3 with different prompt lengths: left padding must give each sample its one-by-one caption."""
    model, processor, spec = load_family(family, twin_dir)
    image = scene_image(0)
    prompts = [schema.DEFAULT_PROMPT, "Describe.", "Describe the scene in one line."]
    inputs = families.generation_inputs(processor, spec, [image] * 3, prompts)
    mask = inputs["attention_mask"]
    assert len(set(mask.sum(1).tolist())) == 3, "the prompts must differ in length"
    assert bool(mask[:, -1].all()) and not bool(mask[:, 0].all()), "padding must be on the left"
    batched = families.generate_captions(model, processor, spec, [image] * 3, prompts, max_new_tokens=8)
    single = [families.generate_captions(model, processor, spec, [image], [p], max_new_tokens=8)[0] for p in prompts]
    assert batched == single
    assert any(single), "the twin generated nothing; the comparison would be empty"


def test_paligemma_batch_matches_processor_suffix(twin_dir):
    _, processor, spec = load_family("paligemma", twin_dir)
    image = scene_image(0)
    ours = families.collate_from_parts(processor, spec, [image], PROMPTS[:1], RESPONSES[:1])
    text = families.format_prompt(processor, spec, PROMPTS[0])
    reference = processor(text=[text], images=[[image]], suffix=[RESPONSES[0]], return_tensors="pt")
    for key in ("input_ids", "token_type_ids", "labels"):
        assert torch.equal(ours[key], reference[key]), key


def test_paligemma_response_is_causal(twin_dir):
    """Changing a later response token must not change the logits before it (no label leak)."""
    model, processor, spec = load_family("paligemma", twin_dir)
    batch = families.collate_from_parts(processor, spec, [scene_image(0)], PROMPTS[:1], RESPONSES[:1])
    response_at = int((batch["labels"][0] != families.IGNORE_INDEX).nonzero()[0])
    change_at = response_at + 5
    altered = {k: v.clone() for k, v in batch.items()}
    altered["input_ids"][0, change_at] = (int(batch["input_ids"][0, change_at]) + 7) % model.config.text_config.vocab_size
    with torch.no_grad():
        before = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        after = model(**{k: v for k, v in altered.items() if k != "labels"}).logits
        assert torch.allclose(before[0, :change_at], after[0, :change_at], atol=1e-5)
        assert not torch.allclose(before[0, change_at:], after[0, change_at:], atol=1e-5)
        # Control: all-zero token_type_ids (TRL's collator) make the whole sequence a bidirectional
        # prefix, so the same change DOES leak into earlier positions. The check above can fail.
        leaky = {k: v for k, v in batch.items() if k != "labels"}
        leaky["token_type_ids"] = torch.zeros_like(batch["token_type_ids"])
        leaky_altered = {**{k: v for k, v in altered.items() if k != "labels"}, "token_type_ids": leaky["token_type_ids"]}
        assert not torch.allclose(model(**leaky).logits[0, response_at:change_at],
                                  model(**leaky_altered).logits[0, response_at:change_at], atol=1e-5)


def test_too_long_sample_raises_instead_of_truncating(twin_dir):
    _, processor, spec = load_family("qwen2-vl", twin_dir)
    with pytest.raises(families.SequenceTooLongError, match="max_length"):
        families.collate_from_parts(processor, spec, [scene_image(0)], PROMPTS[:1], RESPONSES[:1], max_length=20)


def test_record_accessors_read_chat_and_sft_records():
    chat = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "P"}]},
                         {"role": "assistant", "content": [{"type": "text", "text": "R"}]}],
            "images": ["a/b.jpg"], "image": "a/b.jpg"}
    sft = {"image": "a/b.jpg", "prompt": "P", "response": "R"}
    for record in (chat, sft):
        assert (families.record_prompt(record), families.record_response(record),
                families.record_image_path(record)) == ("P", "R", "a/b.jpg")
    with pytest.raises(ValueError, match="assistant"):
        families.record_response({"messages": chat["messages"][:1], "image": "x"})


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_cached_encodings_batch_exactly_like_the_processor(family, twin_dir):
    """The SFT collator's shortcut (process each example once, then only pad) changes nothing."""
    model, processor, spec = load_family(family, twin_dir)
    images = [scene_image(0), scene_image(1, size=(120, 150))]
    encoded = [families.encode_example(processor, spec, image, prompt, response)
               for image, prompt, response in zip(images, PROMPTS, RESPONSES, strict=True)]
    if family in families.ENCODER_DECODER_FAMILIES:
        assert encoded == [None, None]
        return
    expected = families.collate_from_parts(processor, spec, images, PROMPTS, RESPONSES)
    batch = families.collate_encoded(processor, spec, encoded)
    assert batch.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(batch[key], value), key
