"""The served backends' protocol (request format, retries, errors, structured output), the schema check, the
chain and CLIP-Interrogator. Served models are loopback STUB servers written from the servers' documented
APIs (``tests/stub_servers.py``); the real OpenAI-compatible server is in ``tests/test_backends_serve.py``."""

from __future__ import annotations

import base64
import io
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageStat
from stub_servers import Reply, StubServer, chat_answer, ollama_answer

from bvip_helpers import backends, chain, schema, structured
from bvip_helpers.backends import BackendError, OllamaBackend, OpenAIBackend
from bvip_helpers.io import load_image, read_jsonl, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
IMAGES = sorted(f"testing/images/{p.name}" for p in (SAMPLE / "testing" / "images").glob("*.jpg"))
RECORDS = [{"image": image, "prompt": schema.DEFAULT_PROMPT} for image in IMAGES]
FAST = {"backoff": 0.01, "retries": 3, "timeout": 10.0}  # retries stay bounded and quick in tests


def _caption_of(image: Image.Image) -> str:
    """A schema caption that names its image (the mean of its pixels), so answers can be matched to images."""
    mean = sum(ImageStat.Stat(image).mean) / 3
    return f"Sidewalk: left. Road: right. RoadVsSidewalk: right_of.\nNearby: nothing close.\nContext: mean {mean:.4f}."


def _image_of(data_url: str) -> Image.Image:
    assert data_url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB")


def _openai_echo(request, number) -> Reply:
    content = request.body["messages"][0]["content"]
    image = _image_of(next(p for p in content if p["type"] == "image_url")["image_url"]["url"])
    return Reply(body=chat_answer(_caption_of(image)), delay=random.Random(number).uniform(0, 0.05))


def _expected() -> dict[str, str]:
    return {image: _caption_of(load_image(SAMPLE / image)) for image in IMAGES}


# --- OpenAI-compatible requests ---------------------------------------------------


def test_openai_request_is_a_chat_completion_with_a_lossless_data_url_greedy_and_bounded():
    with StubServer(_openai_echo) as stub:
        backend = OpenAIBackend("my-model", base_url=stub.url + "/v1", api_key="sk-test-123", **FAST)
        results = backend.caption([load_image(SAMPLE / IMAGES[0])], ["Describe."], max_new_tokens=17)
    request = stub.requests[0]
    assert request.path == "/v1/chat/completions" and request.headers["Authorization"] == "Bearer sk-test-123"
    body = request.body
    assert (body["model"], body["max_tokens"], body["temperature"]) == ("my-model", 17, 0.0)
    assert "seed" not in body and not {"response_format", "structured_outputs", "grammar", "json_schema"} & set(body)
    parts = body["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["image_url", "text"] and parts[1]["text"] == "Describe."
    sent = _image_of(parts[0]["image_url"]["url"])
    assert sent.tobytes() == load_image(SAMPLE / IMAGES[0]).tobytes()  # PNG: the very pixels, not a re-encoding
    assert results[0].text == _expected()[IMAGES[0]] and results[0].extra["schema_ok"] is True


def test_concurrent_answers_out_of_order_are_matched_by_image(tmp_path):
    from bvip_helpers.predict import predict

    out = tmp_path / "preds.jsonl"
    with StubServer(_openai_echo) as stub:
        backend = OpenAIBackend("m", base_url=stub.url + "/v1", concurrency=4, **FAST)
        stats = predict(backend, RECORDS, SAMPLE, out, max_new_tokens=20, progress=False)
    assert stub.max_in_flight == 4  # never more than the limit, and the limit is used
    lines = read_jsonl(out)
    assert stats.generated == len(IMAGES) and {line["image"]: line["text"] for line in lines} == _expected()
    assert all(line["backend"]["name"] == "openai" and line["server"] == stub.url + "/v1" for line in lines)
    assert all(line["schema_ok"] is True for line in lines) and stats.schema_failures == 0


def test_a_file_is_resumed_only_by_the_same_backend_settings_wherever_the_server_listens(tmp_path):
    from bvip_helpers.predict import predict

    out = tmp_path / "preds.jsonl"
    with StubServer(_openai_echo) as stub:
        predict(OpenAIBackend("m", base_url=stub.url + "/v1", **FAST), RECORDS[:2], SAMPLE, out, progress=False)
    with StubServer(_openai_echo) as moved:  # the same model on a restarted server, another port: resumed
        again = predict(OpenAIBackend("m", base_url=moved.url + "/v1", **FAST), RECORDS[:3], SAMPLE, out, progress=False)
        assert again.already_done == 2 and again.generated == 1
        for other in ({"structured_output": "json-schema"}, {"temperature": 0.7}, {"image_format": "jpeg"}):
            with pytest.raises(ValueError, match="other settings.*backend"):
                predict(OpenAIBackend("m", base_url=moved.url + "/v1", **FAST, **other), RECORDS[:3], SAMPLE, out,
                        progress=False)
    lines = read_jsonl(out)
    assert lines[0]["server"] != lines[2]["server"] and lines[0]["backend"] == lines[2]["backend"]
    assert lines[0]["do_sample"] is False and "temperature" not in lines[0]  # under backend, not beside it


def test_429_5xx_timeouts_and_dropped_connections_are_retried_with_backoff():
    script = {1: Reply(429, {"error": {"message": "rate limited"}}, {"Retry-After": "0"}),
              2: Reply(503, {"error": "overloaded"}), 3: Reply(drop=True), 4: Reply(body=chat_answer("x"), delay=1.0)}

    def flaky(request, number):
        return script.get(number) or Reply(body=chat_answer("Sidewalk: left."))

    with StubServer(flaky) as stub:
        backend = OpenAIBackend("m", base_url=stub.url + "/v1", backoff=0.01, retries=4, timeout=0.5)
        result = backend.caption([load_image(SAMPLE / IMAGES[0])], ["p"], max_new_tokens=8)[0]
    assert len(stub.requests) == 5 and result.text == "Sidewalk: left."
    assert result.extra["schema_ok"] is False and result.extra["schema_errors"]


def test_every_5xx_but_501_is_retried():
    assert all(backends.retryable(code) for code in (408, 429, 500, 502, 520, 524, 529, 599))
    assert not any(backends.retryable(code) for code in (400, 401, 404, 413, 422, 501))
    script = {1: Reply(520, {"error": "origin error"}), 2: Reply(529, {"error": "overloaded"})}
    with StubServer(lambda request, number: script.get(number) or Reply(body=chat_answer("Sidewalk: left."))) as stub:
        backend = OpenAIBackend("m", base_url=stub.url + "/v1", **FAST)
        assert backend.caption([load_image(SAMPLE / IMAGES[0])], ["p"], max_new_tokens=8)[0].text == "Sidewalk: left."
    assert len(stub.requests) == 3


def test_an_empty_answer_is_not_a_caption_and_a_cut_off_one_says_so(tmp_path):
    from bvip_helpers.predict import predict

    empty_for = {IMAGES[1], IMAGES[2]}

    def answer(request, number):
        reply = _openai_echo(request, number)
        image = next(i for i in IMAGES if _caption_of(load_image(SAMPLE / i)) == reply.body["choices"][0]["message"]["content"])
        if image in empty_for:
            return Reply(body={"choices": [{"index": 0, "finish_reason": "length",
                                            "message": {"role": "assistant", "content": None if image == IMAGES[1] else " "}}]})
        reply.body["choices"][0]["finish_reason"] = "length"
        return reply

    out = tmp_path / "preds.jsonl"
    with StubServer(answer) as stub:
        stats = predict(OpenAIBackend("m", base_url=stub.url + "/v1", **FAST), RECORDS, SAMPLE, out,
                        max_new_tokens=20, progress=False)
    assert len(stats.failed) == 2 and all("no text (finish_reason 'length')" in f for f in stats.failed)
    lines = read_jsonl(out)
    assert {line["image"] for line in lines} == set(IMAGES) - empty_for  # left for the next run to ask again
    assert all(line["finish_reason"] == "length" for line in lines)


def test_a_request_that_fails_for_good_is_reported_for_its_image_and_the_rerun_fills_it(tmp_path, capsys):
    from bvip_helpers.predict import predict

    broken = {"on": True}
    bad_mean = _caption_of(load_image(SAMPLE / IMAGES[3]))

    def sometimes(request, number):
        reply = _openai_echo(request, number)
        if broken["on"] and reply.body["choices"][0]["message"]["content"] == bad_mean:
            return Reply(500, {"error": {"message": "CUDA out of memory"}})
        return reply

    out = tmp_path / "preds.jsonl"
    with StubServer(sometimes) as stub:
        backend = OpenAIBackend("m", base_url=stub.url + "/v1", concurrency=2, **FAST)
        stats = predict(backend, RECORDS, SAMPLE, out, max_new_tokens=20, progress=False)
        assert stats.generated == len(IMAGES) - 1 and len(stats.failed) == 1
        assert stats.failed[0].startswith(IMAGES[3]) and "HTTP 500: CUDA out of memory (after 4 tries)" in stats.failed[0]
        assert IMAGES[3] not in {line["image"] for line in read_jsonl(out)}  # nothing written for it
        assert "1 image(s) got no caption" in capsys.readouterr().err
        broken["on"] = False
        again = predict(OpenAIBackend("m", base_url=stub.url + "/v1", **FAST), RECORDS, SAMPLE, out,
                        max_new_tokens=20, progress=False)
    assert again.generated == 1 and again.already_done == len(IMAGES) - 1 and not again.failed
    assert {line["image"]: line["text"] for line in read_jsonl(out)} == _expected()


def test_a_refused_key_is_one_clear_error_and_the_key_is_never_written(tmp_path):
    key = "sk-never-shown-42"

    def refuse(request, number):
        return Reply(401, {"error": {"message": f"Incorrect API key provided: {key}", "code": "invalid_api_key"}})

    jsonl = tmp_path / "records.jsonl"
    write_jsonl(jsonl, RECORDS[:2])
    out = tmp_path / "preds.jsonl"
    with StubServer(refuse) as stub:
        done = subprocess.run(
            [sys.executable, "-m", "bvip_helpers", "predict", "--backend", "openai", "--model", "m",
             "--base_url", stub.url + "/v1", "--jsonl", str(jsonl), "--image_root", str(SAMPLE), "--out", str(out),
             "--retries", "1", "--backoff", "0.01", "--no_progress"],
            capture_output=True, text=True, timeout=120, env={**os.environ, "OPENAI_API_KEY": key}, cwd=ROOT)
    assert done.returncode == 2 and len(stub.requests) == 1  # one request, not one per image
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("bvip predict: error: ") and "HTTP 401" in error and "$OPENAI_API_KEY" in error
    assert key not in done.stderr + done.stdout and "***" in error
    assert not out.exists() or key not in out.read_text()
    assert key not in repr(OpenAIBackend("m", api_key=key))


def test_a_wrong_url_is_one_clear_error():
    port = backends.LocalServer.free_port()  # nothing listens there
    backend = OpenAIBackend("m", base_url=f"http://127.0.0.1:{port}/v1", retries=1, backoff=0.01)
    with pytest.raises(BackendError, match=rf"cannot reach http://127.0.0.1:{port}/v1/chat/completions.*--base_url"):
        backend.caption([load_image(SAMPLE / IMAGES[0])] * 3, ["p"] * 3, max_new_tokens=4)
    with StubServer(lambda request, number: Reply(404, {"detail": "Not Found"})) as stub:
        with pytest.raises(BackendError, match=r"answered HTTP 404: Not Found.*--base_url.*--model 'm'"):
            OpenAIBackend("m", base_url=stub.url, **FAST).caption([load_image(SAMPLE / IMAGES[0])], ["p"],
                                                                  max_new_tokens=4)
    with pytest.raises(ValueError, match="http"):
        OpenAIBackend("m", base_url="127.0.0.1:8000/v1")


# --- Structured output -------------------------------------------------------------


@pytest.mark.parametrize("dialect", structured.DIALECTS)
def test_each_dialect_sends_its_own_field_and_gives_caption_text(dialect):
    fields = {"vllm-regex": "structured_outputs", "vllm-json": "structured_outputs", "llamacpp-grammar": "grammar",
              "llamacpp-json": "json_schema", "json-schema": "response_format"}
    answer = {"sidewalk_pos": "left", "road_pos": "front", "road_vs_sidewalk": "crossing_front",
              "nearby": "a person close on the left", "far": "", "context": "A crossing ahead."}
    caption = structured.caption_from_json(answer)
    content = json.dumps(answer) if dialect in structured.JSON_DIALECTS else caption
    with StubServer(lambda request, number: Reply(body=chat_answer(content))) as stub:
        backend = OpenAIBackend("m", base_url=stub.url + "/v1", structured_output=dialect, **FAST)
        result = backend.caption([load_image(SAMPLE / IMAGES[0])], ["p"], max_new_tokens=64)[0]
    sent = set(stub.requests[0].body) & {"structured_outputs", "grammar", "json_schema", "response_format"}
    assert sent == ({fields[dialect]} if dialect != "none" else set())
    assert result.text == caption and result.extra["schema_ok"] is True
    assert caption == ("Sidewalk: left. Road: front. RoadVsSidewalk: crossing_front.\n"
                       "Nearby: a person close on the left.\nContext: A crossing ahead.")


def test_a_server_that_refuses_the_dialect_stops_with_a_clear_error():
    """As `transformers serve` does: 422 to fields it does not know."""
    refuse = Reply(422, {"detail": "Unexpected fields in the request: {'structured_outputs'}"})
    with StubServer(lambda request, number: refuse) as stub:
        backend = OpenAIBackend("m", base_url=stub.url + "/v1", structured_output="vllm-regex", **FAST)
        with pytest.raises(BackendError, match=r"HTTP 422.*'vllm-regex' structured output.*--structured none"):
            backend.caption([load_image(SAMPLE / IMAGES[0])], ["p"], max_new_tokens=4)


def test_schema_failures_are_counted_and_marked_or_asked_again(tmp_path):
    from bvip_helpers.predict import predict

    good = _expected()[IMAGES[0]]
    for choice, expect_ok, expect_requests in (("mark", False, 1), ("retry", True, 2)):
        with StubServer(lambda request, number: Reply(body=chat_answer("A street." if number == 1 else good))) as stub:
            backend = OpenAIBackend("m", base_url=stub.url + "/v1", on_schema_failure=choice, **FAST)
            stats = predict(backend, RECORDS[:1], SAMPLE, tmp_path / f"{choice}.jsonl", progress=False)
        line = read_jsonl(tmp_path / f"{choice}.jsonl")[0]
        assert line["schema_ok"] is expect_ok and len(stub.requests) == expect_requests
        assert stats.schema_failures == (0 if expect_ok else 1)
        assert ("schema_errors" in line) is (not expect_ok) and line["backend"]["on_schema_failure"] == choice


def test_the_schema_regex_grammar_and_check_agree_with_every_composed_caption():
    from bvip_helpers.dataset import load_ground_truth

    truth = load_ground_truth(SAMPLE / "complete_captions_sensation.csv", SAMPLE / "annotations_with_obj_pos.csv")
    captions = list(truth["response"])
    assert len(captions) == 60
    for caption in captions:
        assert re.fullmatch(structured.CAPTION_REGEX, caption), caption
        assert structured.check_caption(caption) == [], caption
    assert "\\ " not in structured.CAPTION_REGEX  # spaces unescaped: not every server's regex engine reads "\ "
    for key, values in schema.FIELD_ENUMS.items():
        assert structured.CAPTION_JSON_SCHEMA["properties"][key]["enum"] == list(values)
        assert all(f'"{v}"' in structured.CAPTION_GBNF for v in values)
    assert structured.check_caption("The sidewalk is on the left.")[0].startswith("the first line")
    assert structured.check_caption("Sidewalk: left. Road: right. RoadVsSidewalk: right_of.\nContext: x")[0] \
        == "no 'Nearby:' line after the mandatory line"
    assert structured.check_caption("Sidewalk: middle. Road: right. RoadVsSidewalk: right_of.\nNearby: x.\nContext: y")


# --- Ollama -------------------------------------------------------------------------


def _ollama_docs_stub(request, number) -> Reply:
    """Ollama's /api/chat as its API docs describe it (a stub, not Ollama): 404 for a model it has not pulled."""
    if request.path != "/api/chat":
        return Reply(404, {"error": "404 page not found"})
    if request.body.get("model") != "llava:7b":
        return Reply(404, {"error": f"model \"{request.body.get('model')}\" not found, try pulling it first"})
    message = request.body["messages"][0]
    image = Image.open(io.BytesIO(base64.b64decode(message["images"][0], validate=True))).convert("RGB")
    return Reply(body=ollama_answer(_caption_of(image)))


def test_ollama_request_format_raw_base64_options_and_format():
    """Against a stub written from Ollama's documented /api/chat (not a real Ollama)."""
    with StubServer(_ollama_docs_stub) as stub:
        backend = OllamaBackend("llava:7b", base_url=stub.url, structured_output="json-schema", **FAST)
        body = backend._body(*backends.encode_image(load_image(SAMPLE / IMAGES[0])), "Describe.", 33)
        plain = OllamaBackend("llava:7b", base_url=stub.url, **FAST)
        result = plain.caption([load_image(SAMPLE / IMAGES[1])], ["Describe."], max_new_tokens=33)[0]
    request = stub.requests[0].body
    assert request["stream"] is False and request["options"] == {"temperature": 0.0, "num_predict": 33}
    message = request["messages"][0]
    assert message["role"] == "user" and message["content"] == "Describe." and not message["images"][0].startswith("data:")
    assert "format" not in request and body["format"] == structured.CAPTION_JSON_SCHEMA
    assert result.text == _expected()[IMAGES[1]]


def test_ollama_errors_unknown_model_is_clear_and_5xx_is_retried(tmp_path, monkeypatch):
    """Against the documented error shape ``{"error": "..."}`` (a stub, not a real Ollama)."""
    from bvip_helpers.predict import predict

    with StubServer(_ollama_docs_stub) as stub:
        with pytest.raises(BackendError, match=r'HTTP 404: model "llava:13b" not found, try pulling it first.*--model'):
            OllamaBackend("llava:13b", base_url=stub.url, **FAST).caption([load_image(SAMPLE / IMAGES[0])], ["p"],
                                                                          max_new_tokens=4)
    calls = {"n": 0}

    def busy_once(request, number):
        calls["n"] += 1
        return Reply(500, {"error": "model runner has unexpectedly stopped"}) if number == 1 else _ollama_docs_stub(request, number)

    with StubServer(busy_once) as stub:
        monkeypatch.setenv("OLLAMA_HOST", f"127.0.0.1:{stub.port}")  # as Ollama writes it: no scheme
        stats = predict(OllamaBackend("llava:7b", **FAST), RECORDS[:3], SAMPLE, tmp_path / "p.jsonl", progress=False)
    assert stats.generated == 3 and calls["n"] == 4
    with pytest.raises(ValueError, match="json-schema"):
        OllamaBackend("llava:7b", structured_output="vllm-regex")


# --- Building backends ----------------------------------------------------------------


def test_parse_chain_and_registry_names_of_served_models():
    assert backends.parse_chain("transformers:models/a, openai:llava:7b@http://127.0.0.1:9/v1,ollama:llava:7b") == [
        ("transformers", "models/a", None), ("openai", "llava:7b", "http://127.0.0.1:9/v1"), ("ollama", "llava:7b", None)]
    with pytest.raises(ValueError, match="at least two"):
        backends.parse_chain("transformers:a")
    with pytest.raises(ValueError, match="BACKEND:MODEL"):
        backends.parse_chain("vllm:a,transformers:b")
    gpt = backends.make_backend("openai", "gpt-4o", api_key="x")
    assert (gpt.model_name, gpt.base_url) == ("gpt-4o", "https://api.openai.com/v1")
    assert backends.make_backend("ollama", "llava-7b").model_name == "llava:7b"
    with pytest.raises(ValueError, match="--backend ollama"):
        backends.make_backend("openai", "llava-7b")
    with pytest.raises(ValueError, match="transformers backend"):
        backends.make_backend("openai", "m", num_beams=4)
    assert backends.public_url("https://user:secret@host.example:8443/v1/?key=abc") == "https://host.example:8443/v1"


def test_a_chain_gives_base_url_to_its_openai_steps_and_each_step_its_own_url(monkeypatch):
    monkeypatch.setenv("OLLAMA_HOST", "127.0.0.1:11500")
    made = backends.make_backend("chain", None, chain="openai:a,ollama:llava:7b,openai:b@http://127.0.0.1:9/v1",
                                 base_url="http://127.0.0.1:8000/v1")
    assert [step.base_url for step in made.steps] == ["http://127.0.0.1:8000/v1", "http://127.0.0.1:11500",
                                                      "http://127.0.0.1:9/v1"]


def test_zero_shot_registry_entries_are_never_loaded_or_trained_here():
    from bvip_helpers.registry import MODELS, load_model_and_processor
    from bvip_helpers.sft import SFTParams, _trainer_kind

    assert {"blip2-flan-t5-xl", "llava-7b", "gpt-4o", "gemini-2.0-flash", "clip-interrogator", "blip-large"} <= set(MODELS)
    with pytest.raises(ValueError, match="--backend ollama --model llava-7b"):
        load_model_and_processor("llava-7b")
    with pytest.raises(ValueError, match="zero-shot only"):
        _trainer_kind(SFTParams(model="blip2-flan-t5-xl"), MODELS["blip2-flan-t5-xl"])


# --- Chain and CLIP-Interrogator on tiny twins -------------------------------------------


@pytest.fixture(scope="module")
def base_backend():
    from bvip_helpers.predict import load

    return backends.TransformersBackend(load("tiny-qwen2-vl-base"))


@pytest.mark.slow
def test_chain_of_two_twins_keeps_every_step_and_refines_the_previous_text(base_backend, tiny_twin, tmp_path):
    from bvip_helpers.predict import load, predict

    twin = backends.TransformersBackend(load(tiny_twin("qwen2-vl")))
    experts = chain.ChainBackend([base_backend, twin])
    seen: list[str] = []
    real = twin.caption

    def spy(images, prompts, **kwargs):
        seen.extend(prompts)
        return real(images, prompts, **kwargs)

    twin.caption = spy
    out = tmp_path / "chain.jsonl"
    stats = predict(experts, RECORDS[:3], SAMPLE, out, max_new_tokens=12, progress=False)
    lines = read_jsonl(out)
    assert stats.generated == 3 and all(len(line["steps"]) == 2 for line in lines)
    for line in lines:
        first, second = line["steps"]
        assert (first["backend"], first["model"], second["model"]) == ("transformers", "tiny-qwen2-vl-base", twin.model_name)
        assert line["text"] == second["text"] and any(first["text"] in prompt for prompt in seen)
    assert all(prompt.startswith("Another model described") for prompt in seen)
    assert lines[0]["backend"]["name"] == "chain" and len(lines[0]["backend"]["steps"]) == 2
    steps = chain.chain_step_predictions(lines)
    assert list(steps) == ["step 1 (transformers:tiny-qwen2-vl-base)", f"step 2 (transformers:{twin.model_name})"]
    assert [p["text"] for p in steps[list(steps)[1]]] == [line["text"] for line in lines]


def test_chain_additions_count_what_each_expert_added_and_whether_it_is_there():
    truth = {"a.jpg": "Sidewalk: left. Road: right. RoadVsSidewalk: right_of.\nNearby: a person close on the left.\n"
             "Context: x"}
    line = {"image": "a.jpg", "steps": [
        {"step": 1, "backend": "transformers", "model": "m1", "text": "A street."},
        {"step": 2, "backend": "openai", "model": "m2", "text": "Nearby: a person close on the left; a car close on the right."},
        {"step": 3, "backend": "openai", "model": "m3", "text": "Nearby: a person close on the left; 2 cars close on the "
         "left and right; a bicycle close on the center."}]}
    assert chain.chain_additions([line, {"image": "unknown.jpg", "steps": line["steps"]}], truth) == [
        {"step": 2, "expert": "openai:m2", "images": 1, "added": 2, "confirmed": 1, "invented": 1},
        {"step": 3, "expert": "openai:m3", "images": 1, "added": 1, "confirmed": 0, "invented": 1}]


def _tiny_clip(folder: Path, tokenizer) -> Path:
    """A tiny random CLIP from a small CLIPConfig, with the BLIP twin's tokenizer (tests only)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 32, "eos_token_id": tokenizer.sep_token_id,
                     "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.cls_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_clip_interrogator_adds_the_clip_ranked_bvip_phrases_to_the_blip_caption(tiny_twin, tmp_path):
    from transformers import AutoTokenizer

    blip = tiny_twin("blip")
    clip = _tiny_clip(tmp_path / "tiny-clip", AutoTokenizer.from_pretrained(blip))
    backend = backends.ClipInterrogatorBackend(str(clip), str(blip), top_k=2)
    images = [load_image(SAMPLE / image) for image in IMAGES[:2]]
    captions = backend.captioner.caption(images, ["p", "p"], max_new_tokens=10)
    ranked = backend.rank(images)
    results = backend.caption(images, ["p", "p"], max_new_tokens=10)
    for result, caption, rank in zip(results, captions, ranked, strict=True):
        phrases = [rank["sidewalk"][0][0], rank["road"][0][0], rank["objects"][0][0], rank["objects"][1][0]]
        assert result.text == ", ".join([caption.text.rstrip(". "), *phrases])
        scores = [score for _, score in rank["objects"]]
        assert scores == sorted(scores, reverse=True) and len(scores) == len(backends.BVIP_VOCABULARY["objects"])
    # Through the command line, into the resumable file.
    jsonl = tmp_path / "r.jsonl"
    write_jsonl(jsonl, RECORDS[:2])
    out = tmp_path / "p.jsonl"
    done = subprocess.run([sys.executable, "-m", "bvip_helpers", "predict", "--backend", "clip-interrogator",
                           "--model", str(clip), "--captioner", str(blip), "--top_k", "2", "--max_new_tokens", "10",
                           "--jsonl", str(jsonl), "--image_root", str(SAMPLE), "--out", str(out), "--no_progress"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    lines = read_jsonl(out)
    assert [line["text"] for line in lines] == [r.text for r in results]
    assert lines[0]["backend"]["name"] == "clip-interrogator" and lines[0]["weights"]


@pytest.mark.slow
def test_notebook_00_smoke_runs_and_writes_its_runs_where_the_leaderboard_reads_them(tmp_path):
    papermill = pytest.importorskip("papermill")
    from bvip_helpers import batch
    from bvip_helpers.io import figures_dir

    before = os.environ.get("BVIP_SMOKE")
    os.environ["BVIP_SMOKE"] = "1"
    try:  # the smoke run writes under runs/smoke, as every notebook's smoke run does
        papermill.execute_notebook(str(ROOT / "notebooks" / "00_zero_shot.ipynb"), str(tmp_path / "00.ipynb"),
                                   cwd=str(ROOT / "notebooks"), kernel_name="python3", progress_bar=False,
                                   parameters={"SMOKE": True})
    finally:
        if before is None:
            os.environ.pop("BVIP_SMOKE", None)
        else:
            os.environ["BVIP_SMOKE"] = before
    for name in ("presence_accuracy", "object_recall_precision", "safety_rates", "near_recall_by_crowding"):
        assert (figures_dir() / f"00_{name}.png").is_file(), name
    board = batch.collect_leaderboard(ROOT / "runs" / "smoke")
    runs_seen = set(board["run"])
    assert {"tiny-qwen2-vl-base/zero_shot_transformers_plain", "tiny-qwen2-vl-base/zero_shot_transformers_bvip",
            "chain_tiny-qwen2-vl-base+tiny-qwen2-vl-base/bvip/step_1",
            "chain_tiny-qwen2-vl-base+tiny-qwen2-vl-base/bvip/step_2"} <= runs_seen
