"""Template fidelity: every family trains and generates with its published checkpoint's chat template,
special tokens and end-of-turn token (facts in bvip_helpers/configs/families/<family>.json).

The real template is rendered here with transformers' own renderer straight from the facts file, so
these tests compare the SFT training text with what the checkpoint's template writes, independently
of the processor object the pipeline uses.
"""

from __future__ import annotations

import json
import os
import re

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from PIL import Image  # noqa: E402

from bvip_helpers import families, schema  # noqa: E402
from bvip_helpers.demo import twins  # noqa: E402
from bvip_helpers.registry import FAMILY_REFERENCE, MODELS, get_spec, load_model_and_processor  # noqa: E402

RESPONSE = schema.compose_caption(schema.SceneLabels("left", "right", near={"person": ["center"]}),
                                  "A sidewalk with a pedestrian.")
PROMPT = schema.DEFAULT_PROMPT
ALL = list(twins.FAMILIES)
CHAT = [f for f in ALL if families.family_config(f)["chat_template"]]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    root = tmp_path_factory.mktemp("template_twins")
    cache: dict[str, tuple] = {}

    def load(family: str):
        if family not in cache:
            spec = get_spec(str(twins.build_tiny_model(family, root / family, texts=[RESPONSE], seed=0)))
            model, processor = load_model_and_processor(spec)
            cache[family] = (model, processor, spec)
        return cache[family]

    return load


def render(family: str, messages: list[dict], **kwargs) -> str:
    """The published template, rendered by transformers' renderer from the facts file."""
    from transformers.utils.chat_template_utils import render_jinja_template

    facts = families.family_config(family)
    tokens = {role: token for role, token in facts["special_tokens"].items()}
    rendered, _ = render_jinja_template([messages], chat_template=facts["chat_template"], **tokens, **kwargs)
    return rendered[0]


def user(text: str = PROMPT) -> dict:
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}


ASSISTANT = {"role": "assistant", "content": [{"type": "text", "text": RESPONSE}]}


def test_every_family_has_a_facts_file_naming_its_source():
    files = {p.stem for p in families.FAMILY_CONFIG_DIR.glob("*.json")}
    assert files == set(ALL) == set(FAMILY_REFERENCE)
    for family in ALL:
        facts = families.family_config(family)
        assert facts["family"] == family
        assert facts["checkpoint"] == MODELS[FAMILY_REFERENCE[family]].hub_id, "the facts are the registry model's"
        assert facts["source"]["hub_repo"] == facts["checkpoint"] and facts["source"]["files"]
        assert facts["end_of_turn"] and facts["generation_eos"] and "eos_token" in facts["special_tokens"]
        assert (facts["chat_template"] is not None) == (MODELS[FAMILY_REFERENCE[family]].prompt_style == "chat")


def test_a_missing_or_broken_facts_file_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(families, "FAMILY_CONFIG_DIR", tmp_path)
    families._read_family_config.cache_clear()
    try:
        with pytest.raises(KeyError, match="no checkpoint facts for family 'qwen2-vl'"):
            families.family_config("qwen2-vl")
        (tmp_path / "qwen2-vl.json").write_text("{not json")
        with pytest.raises(ValueError, match=r"qwen2-vl\.json: not valid JSON"):
            families.family_config("qwen2-vl")
    finally:
        families._read_family_config.cache_clear()


@pytest.mark.parametrize("family", CHAT)
def test_training_text_is_what_the_real_template_renders(family, loaded):
    """Prompt + trained answer == the real template's rendering of that turn, up to its end-of-turn token."""
    _, processor, spec = loaded(family)
    facts = families.family_config(family)
    user_turn = render(family, [user()])
    generation_prompt = render(family, [user()], add_generation_prompt=True)
    followed = render(family, [user(), ASSISTANT, user("Anything else?")])  # the answer's turn closed
    answer = families.assistant_text(processor, spec, PROMPT, RESPONSE)

    assert families.format_prompt(processor, spec, PROMPT) == generation_prompt  # inference uses the real prompt
    assert answer.endswith(facts["end_of_turn"]) and answer.count(RESPONSE) == 1
    assert families.end_token(processor, spec) == facts["end_of_turn"]
    assert followed.startswith(user_turn)
    lead = followed[len(user_turn):].split(answer)[0]  # the real turn, from its header to the trained text
    assert followed[len(user_turn):].startswith(lead + answer), "the real template renders the trained text"
    header = generation_prompt[len(user_turn):]
    if facts["generation_prompt_is_turn_header"]:
        assert followed.startswith(generation_prompt + answer)  # exactly the real text, spaces included
    else:  # LLaVA-OneVision: '<|im_start|>assistant \n' in a turn, '<|im_start|>assistant\n' as the prompt
        assert lead != header and re.sub(r"\s", "", lead) == re.sub(r"\s", "", header)


def test_smolvlm_answer_starts_with_the_space_its_template_writes(loaded):
    _, processor, spec = loaded("smolvlm")
    answer = families.assistant_text(processor, spec, PROMPT, RESPONSE)
    assert answer == " " + RESPONSE + "<end_of_utterance>"
    assert render("smolvlm", [user(), ASSISTANT]).endswith("Assistant: " + RESPONSE + "<end_of_utterance>\n")


@pytest.mark.parametrize("family", ["deepseek-vl", "janus"])
def test_a_template_that_closes_a_turn_only_before_the_next_gets_its_end_token(family, loaded):
    _, processor, spec = loaded(family)
    eos = families.family_config(family)["end_of_turn"]
    assert not render(family, [user(), ASSISTANT]).endswith(eos)  # the real template leaves the last turn open
    assert families.assistant_text(processor, spec, PROMPT, RESPONSE) == " " + RESPONSE + eos


@pytest.mark.parametrize("family", [f for f in ALL if f not in CHAT])
def test_prefix_and_caption_families_end_the_caption_with_their_end_token(family, loaded):
    _, processor, spec = loaded(family)
    end = families.family_config(family)["end_of_turn"]
    assert families.assistant_text(processor, spec, PROMPT, RESPONSE) == RESPONSE + end


@pytest.mark.parametrize("family", [f for f in ALL if f not in families.ENCODER_DECODER_FAMILIES | {"blip"}])
def test_training_and_inference_prompts_are_the_same_tokens(family, loaded):
    """The tokens before the trained answer are exactly the tokens generation starts from."""
    model, processor, spec = loaded(family)
    image = Image.new("RGB", (160, 120), (90, 150, 80))
    batch = families.collate_from_parts(processor, spec, [image], [PROMPT], [RESPONSE])
    start = int((batch["labels"][0] == families.IGNORE_INDEX).sum())
    inputs = families.generation_inputs(processor, spec, [image], [PROMPT])
    assert batch["input_ids"][0][:start].tolist() == inputs["input_ids"][0].tolist()
    trained = processor.tokenizer.decode(batch["input_ids"][0][start:].tolist())
    assert trained == families.assistant_text(processor, spec, PROMPT, RESPONSE)


@pytest.mark.parametrize("family", ALL)
def test_generation_stops_on_the_end_of_turn_token(family, loaded):
    model, processor, spec = loaded(family)
    tok = processor.tokenizer
    stops = families.stop_token_ids(processor, spec, model)
    assert stops[0] == tok.convert_tokens_to_ids(families.family_config(family)["end_of_turn"])
    assert all(tok.decode([i]).strip() for i in stops), "a whitespace token would cut multi-line captions"


def test_blip2_does_not_stop_at_the_newline_its_published_config_names(loaded):
    model, processor, spec = loaded("blip2")
    newline = processor.tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert model.generation_config.eos_token_id in newline  # as in config.json (OPT's 50118)
    assert "\n" in RESPONSE and not set(newline) & set(families.stop_token_ids(processor, spec, model))


def test_end_token_falls_back_to_eos_for_a_tokenizer_without_the_family_token(loaded):
    _, processor, spec = loaded("smolvlm")
    facts_spec = type("Spec", (), {"family": "smolvlm"})()
    other = type("Tok", (), {"eos_token": "</s>", "unk_token": None, "unk_token_id": None,
                             "convert_tokens_to_ids": lambda self, t: None})()
    assert families.end_token(other, facts_spec) == "</s>"
    assert families.end_token(processor, spec) == "<end_of_utterance>"


def test_facts_files_are_plain_json_with_unicode_tokens():
    raw = (families.FAMILY_CONFIG_DIR / "janus.json").read_text(encoding="utf-8")
    assert "<\uff5cend\u2581of\u2581sentence\uff5c>" in raw and json.loads(raw)["family"] == "janus"
