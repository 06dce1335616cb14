"""Tiny offline twins: each family builds, trains a step, generates and survives save+reload."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from PIL import Image  # noqa: E402

from bvip_helpers import families, schema  # noqa: E402
from bvip_helpers.demo import twins  # noqa: E402
from bvip_helpers.registry import get_spec  # noqa: E402

CAPTION = schema.compose_caption(
    schema.SceneLabels("left", "right", near={"person": ["center"], "obstacle": ["left", "right"]},
                       far={"traffic light": ["left"]}),
    "A sidewalk is shown with a pedestrian ahead.",
)
TEXTS = [CAPTION, schema.compose_caption(schema.SceneLabels("center", "front"), "The path is clear.")]


@pytest.fixture(scope="session")
def built_twin(tmp_path_factory):
    """``built_twin(family)``: the family's twin folder, built once per test session."""
    root = tmp_path_factory.mktemp("twins")
    cache: dict[str, object] = {}

    def build(family: str):
        if family not in cache:
            cache[family] = twins.build_tiny_model(family, root / family, texts=TEXTS, seed=0)
        return cache[family]

    return build


@pytest.fixture
def twin(request, built_twin):
    return built_twin(request.param)


def _image(seed: int = 0) -> Image.Image:
    return Image.new("RGB", (160, 120), (40 + 50 * seed, 120, 200 - 30 * seed))


def _inputs(family: str, processor, with_answer: bool, n: int = 1):
    """Processor-made inputs in the family's prompt format (one image + the BVIP prompt)."""
    recipe = twins.FAMILIES[family]
    prompt = families.format_prompt(processor, get_spec(f"tiny-{family}"), schema.DEFAULT_PROMPT)
    images = [_image(i) for i in range(n)]
    kwargs = {}
    texts = [prompt] * n
    if with_answer and recipe.prompt_style == "suffix":
        kwargs["suffix"] = [CAPTION] * n  # PaliGemma builds its own labels from the suffix
    elif with_answer and recipe.prompt_style != "seq2seq":
        texts = [prompt + CAPTION] * n  # decoder-only: the answer follows the prompt
    images_arg = [[im] for im in images] if recipe.nested_images else images
    batch = processor(images=images_arg, text=texts, return_tensors="pt", padding=True, **kwargs)
    if with_answer and recipe.prompt_style == "seq2seq":  # encoder gets the prompt, decoder learns the answer
        tok = processor.tokenizer
        batch["labels"] = tok([CAPTION + tok.eos_token] * n, add_special_tokens=False, return_tensors="pt")["input_ids"]
    return batch


FAMILY_PARAMS = [pytest.param(f, id=f) for f in twins.FAMILIES]


@pytest.mark.slow
@pytest.mark.parametrize("twin", FAMILY_PARAMS, indirect=True)
def test_twin_forward_backward(twin):
    model, processor = twins.load_twin(twin)
    meta = json.loads((twin / twins.META_FILE).read_text())
    family = meta["family"]
    assert type(model).__name__ == meta["model_class"] == twins.FAMILIES[family].model_class
    assert type(processor).__name__ == twins.FAMILIES[family].processor_class
    batch = _inputs(family, processor, with_answer=True, n=2)
    labels = batch.pop("labels", None)
    if labels is None:
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = -100
    model.train()
    out = model(**batch, labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    # The vision tower must be in the graph: an image feature that never reaches the loss is a wiring bug.
    vision_grads = [p.grad for n, p in model.named_parameters() if twins.is_vision_param(n) and p.grad is not None]
    assert vision_grads and sum(float(g.abs().sum()) for g in vision_grads) > 0


@pytest.mark.slow
@pytest.mark.parametrize("twin", FAMILY_PARAMS, indirect=True)
def test_twin_generate_and_reload_identical(twin, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model, processor = twins.load_twin(twin)
    family = json.loads((twin / twins.META_FILE).read_text())["family"]
    batch = _inputs(family, processor, with_answer=False)
    reference_ids = batch["input_ids"].clone()  # BLIP's generate() overwrites input_ids[:, 0] in place
    with torch.no_grad():
        logits = model(**batch).logits
        gen = model.generate(**batch, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    new_tokens = gen[:, -6:] if gen.shape[1] > 6 else gen
    assert gen.shape[1] >= 6 and new_tokens.numel() == 6
    text = processor.batch_decode(new_tokens, skip_special_tokens=True)
    assert isinstance(text[0], str)

    model.save_pretrained(tmp_path, safe_serialization=True)
    processor.save_pretrained(tmp_path)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path, use_safetensors=True)
    assert type(reloaded) is type(model)
    processor2 = AutoProcessor.from_pretrained(tmp_path)
    assert type(processor2) is type(processor)
    batch2 = _inputs(family, processor2, with_answer=False)
    assert torch.equal(reference_ids, batch2["input_ids"])  # the reloaded processor encodes identically
    with torch.no_grad():
        logits2 = reloaded(**batch2).logits
        gen2 = reloaded.generate(**batch2, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(gen, gen2)
    assert torch.allclose(logits, logits2, atol=1e-5)


@pytest.mark.parametrize("family", list(twins.FAMILIES))
def test_tokenizer_round_trips_schema_text(family, built_twin):
    from transformers import AutoProcessor

    tok = AutoProcessor.from_pretrained(built_twin(family)).tokenizer
    for text in [*TEXTS, schema.DEFAULT_PROMPT, "RoadVsSidewalk: crossing_front.\nNearby: 12 cars; a sign."]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        assert tok.unk_token_id is None or tok.unk_token_id not in ids


@pytest.mark.parametrize("family", list(twins.FAMILIES))
def test_twin_uses_the_published_template_tokens_and_stop_tokens(family, built_twin):
    """The chat template, special tokens and generation EOS come verbatim from the family's facts file;
    training and generation agreeing with them is tested in tests/test_templates.py."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    facts = families.family_config(family)
    processor = AutoProcessor.from_pretrained(built_twin(family))
    tok = processor.tokenizer
    assert processor.chat_template == facts["chat_template"] or (facts["chat_template"] is None
                                                                 and not processor.chat_template)
    for role, token in facts["special_tokens"].items():
        assert getattr(tok, role) == token, role
        assert tok.convert_tokens_to_ids(token) != tok.unk_token_id or token == tok.unk_token, role
    for token in facts["template_tokens"]:
        assert len(tok(token, add_special_tokens=False)["input_ids"]) == 1, token
    model = AutoModelForImageTextToText.from_pretrained(built_twin(family), use_safetensors=True)
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos)
    assert [tok.decode([i]) for i in eos] == facts["generation_eos"]


def test_train_tokenizer_specials_and_round_trip():
    tok = twins.train_tokenizer(twins.schema_texts(), vocab_size=600,
                                special_tokens={"eos_token": "</s>", "image_token": "<image>"},
                                additional_special_tokens=["<turn>"])
    assert tok.image_token == "<image>" and tok.image_token_id == tok.convert_tokens_to_ids("<image>")
    assert tok.eos_token == "</s>"
    ids = tok("Sidewalk: center.<image>", add_special_tokens=False)["input_ids"]
    assert tok.image_token_id in ids  # special tokens are never split
    assert len(tok.tokenize("<turn>")) == 1
    weird = "Context: Ünïcode 42 — ok;\n\ttabs"
    assert tok.decode(tok(weird, add_special_tokens=False)["input_ids"]) == weird


def test_schema_texts_cover_every_enum_and_object():
    joined = "\n".join(twins.schema_texts())
    for key, label in schema.FIELD_LABELS.items():
        assert f"{label}:" in joined
        assert all(v in joined for v in schema.FIELD_ENUMS[key])
    for obj in schema.OBJECT_CLASSES:
        assert f"{obj.name} close on the" in joined and f"{obj.name} farther away on the" in joined


def test_data_texts_reads_build_and_synth_dirs(tmp_path):
    from bvip_helpers.io import write_jsonl

    build = tmp_path / "build"
    write_jsonl(build / "bvpi_sft_train.jsonl", [{"image": "a.jpg", "prompt": "P zebra", "response": "R quokka"}])
    assert twins.data_texts(build) == ["P zebra", "R quokka"]
    synth = tmp_path / "synth"
    synth.mkdir()
    (synth / "complete_captions_sensation.csv").write_text('image_path,target,split\na.jpg,"A wombat.",train\n')
    assert twins.data_texts(synth) == ["A wombat."]
    with pytest.raises(FileNotFoundError, match="bvpi_sft"):
        twins.data_texts(tmp_path / "empty")


def test_cache_reuse_and_determinism(tmp_path):
    first = twins.build_tiny_model("qwen2-vl", tmp_path / "a", texts=TEXTS, seed=3)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    again = twins.build_tiny_model("qwen2-vl", tmp_path / "a", texts=TEXTS, seed=3)
    assert (again / "model.safetensors").stat().st_mtime_ns == stamp  # cache hit: not rewritten
    twin_b = twins.build_tiny_model("qwen2-vl", tmp_path / "b", texts=TEXTS, seed=3)
    assert (first / "model.safetensors").read_bytes() == (twin_b / "model.safetensors").read_bytes()
    twin_c = twins.build_tiny_model("qwen2-vl", tmp_path / "a", texts=TEXTS, seed=4)
    assert json.loads((twin_c / twins.META_FILE).read_text())["seed"] == 4  # a new seed rebuilds
    assert not list(tmp_path.glob(".*building"))  # no staging folder left behind
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a tiny twin"):
        twins.build_tiny_model("qwen2-vl", tmp_path / "notes", texts=TEXTS, seed=3)
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep me"


def test_unknown_family_is_a_clear_error(tmp_path):
    with pytest.raises(KeyError, match="qwen2-vl"):
        twins.build_tiny_model("gpt-17", tmp_path)


def test_cli_builds_a_twin(tmp_path, capsys):
    from bvip_helpers.cli import main

    build = tmp_path / "build"
    from bvip_helpers.io import write_jsonl

    write_jsonl(build / "bvpi_sft_val.jsonl", [{"prompt": schema.DEFAULT_PROMPT, "response": CAPTION}])
    assert main(["tiny-model", "--family", "qwen2-vl", "--data_dir", str(build), "--out", str(tmp_path / "m")]) == 0
    meta = json.loads((tmp_path / "m" / twins.META_FILE).read_text())
    assert meta["family"] == "qwen2-vl" and meta["n_params"] < 5_000_000
    assert "qwen2-vl" in capsys.readouterr().out
