"""The ``openai`` backend against a REAL OpenAI-compatible server: ``transformers serve`` on 127.0.0.1.

The fixture starts transformers' own server (``bvip_helpers.backends.LocalServer``: a free loopback port,
``HF_HUB_OFFLINE=1``, the committed tiny base pinned by its path) and stops it by its PID. Requests are
bounded (the sample's images) and so are retries and timeouts. Greedy decoding with the same prompt and
limits must give the very texts of the local ``transformers`` backend.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bvip_helpers import schema
from bvip_helpers.backends import BackendError, LocalServer, OpenAIBackend
from bvip_helpers.io import load_image, read_jsonl, write_jsonl

pytest.importorskip("transformers")
from transformers.utils.import_utils import is_serve_available  # noqa: E402

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not is_serve_available(), reason="transformers serve needs fastapi, uvicorn and "
                                 "openai: pip install 'bvip-helpers[serve]' (make venv installs them)")]

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
BASE = ROOT / "models" / "tiny-qwen2-vl-base"
TEST_IMAGES = sorted(f"testing/images/{p.name}" for p in (SAMPLE / "testing" / "images").glob("*.jpg"))
ALL_IMAGES = sorted(f"{split}/images/{p.name}" for split in ("training", "validation", "testing")
                    for p in (SAMPLE / split / "images").glob("*.jpg"))
FAST = {"backoff": 0.05, "retries": 2, "timeout": 60.0}
MAX_NEW_TOKENS = 48


def _records(images):
    return [{"image": image, "prompt": schema.DEFAULT_PROMPT} for image in images]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bvip_helpers", "predict", *args, "--no_progress"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def server():
    with LocalServer(BASE) as running:
        yield running


@pytest.fixture(scope="module")
def test_jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("records") / "test.jsonl"
    write_jsonl(path, _records(TEST_IMAGES))
    return path


def test_cli_captions_the_test_split_through_transformers_serve_as_the_local_backend_does(server, test_jsonl, tmp_path):
    """Done-when: `bvip predict --backend openai` on loopback scores the same under `bvip evaluate` as the twin run
    locally, because greedy decoding with the same prompt and limits gives identical texts."""
    from bvip_helpers.evaluate import evaluate_files

    served, local = tmp_path / "served.jsonl", tmp_path / "local.jsonl"
    done = _cli("--backend", "openai", "--model", server.model, "--base_url", server.base_url, "--concurrency", "4",
                "--jsonl", str(test_jsonl), "--image_root", str(SAMPLE), "--out", str(served),
                "--max_new_tokens", str(MAX_NEW_TOKENS))
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["generated"] == len(TEST_IMAGES) and summary["failed"] == 0
    done = _cli("--model", str(BASE), "--batch_size", "1", "--jsonl", str(test_jsonl), "--image_root", str(SAMPLE),
                "--out", str(local), "--max_new_tokens", str(MAX_NEW_TOKENS))
    assert done.returncode == 0, done.stderr
    texts = {side: {line["image"]: line["text"] for line in read_jsonl(path)} for side, path in
             (("served", served), ("local", local))}
    assert texts["served"] == texts["local"] and len(texts["local"]) == len(TEST_IMAGES)
    assert all(len(text.split()) >= 5 for text in texts["local"].values())  # real captions, not empty answers
    captions, annotations = SAMPLE / "complete_captions_sensation.csv", SAMPLE / "annotations_with_obj_pos.csv"
    report = {side: {k: v for k, v in evaluate_files(path, captions, annotations, "test").items() if k != "pred_file"}
              for side, path in (("served", served), ("local", local))}
    assert report["served"] == report["local"] and report["local"]["n"] == len(TEST_IMAGES)
    line = read_jsonl(served)[0]
    assert line["backend"]["name"] == "openai" and line["weights"]  # the served folder's weights are in the identity
    assert line["schema_ok"] is False  # the base model knows nothing of the format: checked and marked


def test_concurrent_run_resumes_and_matches_each_caption_to_its_image(server, tmp_path):
    from bvip_helpers.predict import predict

    records = _records(ALL_IMAGES[:12])
    out = tmp_path / "preds.jsonl"
    first = predict(OpenAIBackend(server.model, base_url=server.base_url, concurrency=4, **FAST), records, SAMPLE, out,
                    max_new_tokens=MAX_NEW_TOKENS, limit=5, progress=False)
    assert first.generated == 5
    rest = predict(OpenAIBackend(server.model, base_url=server.base_url, concurrency=4, **FAST), records, SAMPLE, out,
                   max_new_tokens=MAX_NEW_TOKENS, progress=False)
    assert rest.already_done == 5 and rest.generated == 7 and not rest.failed
    one_by_one = predict(OpenAIBackend(server.model, base_url=server.base_url, concurrency=1, **FAST), records, SAMPLE,
                         tmp_path / "serial.jsonl", max_new_tokens=MAX_NEW_TOKENS, progress=False)
    assert one_by_one.generated == 12
    lines = read_jsonl(out)
    assert sorted(line["image"] for line in lines) == sorted(r["image"] for r in records)
    assert {line["image"]: line["text"] for line in lines} == \
        {line["image"]: line["text"] for line in read_jsonl(tmp_path / "serial.jsonl")}


def test_server_killed_midway_every_image_reported_nothing_lost_and_the_rerun_completes(tmp_path):
    from bvip_helpers.predict import predict

    records = _records(ALL_IMAGES[:30])
    out = tmp_path / "preds.jsonl"
    first_server = LocalServer(BASE).start()
    killed = threading.Event()

    def kill_after_two_lines():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed.is_set():
            if out.exists() and out.read_bytes().count(b"\n") >= 2:
                first_server.kill()  # SIGKILL by PID, mid-run
                killed.set()
                return
            time.sleep(0.005)

    watcher = threading.Thread(target=kill_after_two_lines)
    watcher.start()
    try:
        stats = predict(OpenAIBackend(first_server.model, base_url=first_server.base_url, concurrency=2, **FAST),
                        records, SAMPLE, out, batch_size=2, max_new_tokens=MAX_NEW_TOKENS, progress=False)
    finally:
        killed.set()
        watcher.join()
        first_server.stop()
    written = [line["image"] for line in read_jsonl(out)]
    failed = [reason.split(": ", 1)[0] for reason in stats.failed]
    assert 2 <= len(written) < len(records) and failed, "the kill must land mid-run"
    assert sorted(written + failed) == sorted(r["image"] for r in records)  # every image: written or reported
    assert len(set(written)) == len(written) and not set(written) & set(failed)
    assert all(reason.endswith(f"(after {FAST['retries'] + 1} tries)") for reason in stats.failed), stats.failed
    with LocalServer(BASE) as restarted:  # another port: the URL is not part of the run's identity
        again = predict(OpenAIBackend(restarted.model, base_url=restarted.base_url, concurrency=2, **FAST), records,
                        SAMPLE, out, batch_size=2, max_new_tokens=MAX_NEW_TOKENS, progress=False)
    assert again.already_done == len(written) and again.generated == len(failed) and not again.failed
    images = [line["image"] for line in read_jsonl(out)]
    assert len(images) == len(set(images)) == len(records)


def test_wrong_model_url_or_dialect_is_one_clear_error(server, test_jsonl, tmp_path):
    image = [load_image(SAMPLE / TEST_IMAGES[0])]
    with pytest.raises(BackendError, match=r"HTTP 400: Server is pinned to"):
        OpenAIBackend("some-other-model", base_url=server.base_url, **FAST).caption(image, ["p"], max_new_tokens=4)
    with pytest.raises(BackendError, match=r"HTTP 404.*--base_url"):
        OpenAIBackend(server.model, base_url=server.base_url.removesuffix("/v1"), **FAST).caption(
            image, ["p"], max_new_tokens=4)
    # transformers serve answers 422 to vLLM's field: the first request stops the run with advice, nothing more is sent.
    done = _cli("--backend", "openai", "--model", server.model, "--base_url", server.base_url, "--structured",
                "vllm-regex", "--jsonl", str(test_jsonl), "--image_root", str(SAMPLE), "--out", str(tmp_path / "p.jsonl"))
    assert done.returncode == 2 and "HTTP 422" in done.stderr and "--structured none" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    # It ignores response_format: the answers come back unconstrained, and the local check counts every one.
    done = _cli("--backend", "openai", "--model", server.model, "--base_url", server.base_url, "--structured",
                "json-schema", "--jsonl", str(test_jsonl), "--image_root", str(SAMPLE), "--out", str(tmp_path / "j.jsonl"),
                "--limit", "3", "--max_new_tokens", "16")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["schema_failures"] == 3
    assert all(line["schema_ok"] is False and line["text_raw"] for line in read_jsonl(tmp_path / "j.jsonl"))


def test_a_corrupt_image_is_reported_for_that_image(server, tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for image in TEST_IMAGES[:2]:
        (root / Path(image).name).write_bytes((SAMPLE / image).read_bytes())
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    jsonl = tmp_path / "r.jsonl"
    write_jsonl(jsonl, _records([Path(i).name for i in TEST_IMAGES[:2]] + ["broken.jpg"]))
    args = ["--backend", "openai", "--model", server.model, "--base_url", server.base_url, "--jsonl", str(jsonl),
            "--image_root", str(root), "--max_new_tokens", "8"]
    refused = _cli(*args, "--out", str(tmp_path / "a.jsonl"))
    assert refused.returncode == 2 and "broken.jpg" in refused.stderr and "--skip_bad_images" in refused.stderr
    assert not (tmp_path / "a.jsonl").exists()  # checked before any request
    skipped = _cli(*args, "--out", str(tmp_path / "b.jsonl"), "--skip_bad_images")
    assert skipped.returncode == 0, skipped.stderr
    summary = json.loads(skipped.stdout.strip().splitlines()[-1])
    assert summary["generated"] == 2 and "1 bad images skipped" in skipped.stdout and "broken.jpg" in skipped.stderr


def test_cli_chain_of_two_twins_keeps_each_steps_output(server, test_jsonl, tiny_twin, tmp_path):
    """Done-when: `bvip predict --backend chain --chain ...`: a local twin, then the served base refines it."""
    twin = tiny_twin("qwen2-vl")
    out = tmp_path / "chain.jsonl"
    done = _cli("--backend", "chain", "--chain", f"transformers:{twin},openai:{server.model}@{server.base_url}",
                "--jsonl", str(test_jsonl), "--image_root", str(SAMPLE), "--out", str(out), "--limit", "3",
                "--max_new_tokens", "24")
    assert done.returncode == 0, done.stderr
    lines = read_jsonl(out)
    assert len(lines) == 3
    for line in lines:
        first, second = line["steps"]
        assert (first["backend"], second["backend"]) == ("transformers", "openai")
        assert first["text"] is not None and line["text"] == second["text"]
    assert [step["name"] for step in lines[0]["backend"]["steps"]] == ["transformers", "openai"]
