"""``bvip predict``: output format, batching, resuming after a kill, bad images, the notebook smoke run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bvip_helpers import schema
from bvip_helpers.io import ImagePathError, JsonlError, read_jsonl, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def twin_dir(tiny_twin):
    return tiny_twin("qwen2-vl")


@pytest.fixture(scope="module")
def loaded(twin_dir):
    from bvip_helpers.predict import load

    return load(twin_dir)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """Synthetic scenes and prediction records (image + prompt) for every scene."""
    from bvip_helpers.dataset import load_ground_truth
    from bvip_helpers.demo.synth import generate_dataset

    paths = generate_dataset(tmp_path_factory.mktemp("synth"), n=30, seed=5, image_size=(128, 96), show_progress=False)
    truth = load_ground_truth(paths["captions_csv"], paths["annotations_csv"])
    records = [{"image": p, "prompt": schema.DEFAULT_PROMPT} for p in truth["image_path"]]
    jsonl = paths["image_root"] / "records.jsonl"
    write_jsonl(jsonl, records)
    return {"root": paths["image_root"], "records": records, "jsonl": jsonl, "truth": truth}


def _cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "bvip_helpers", "predict", *args, "--no_progress"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300, **kwargs)


@pytest.mark.slow
def test_output_lines_carry_model_and_generation_parameters(loaded, scenes, tmp_path):
    from bvip_helpers.predict import predict

    out = tmp_path / "preds.jsonl"
    stats = predict(loaded, scenes["records"], scenes["root"], out, batch_size=4, max_new_tokens=12, limit=6,
                    progress=False)
    lines = read_jsonl(out)
    assert stats.generated == 6 and stats.total == 6 and len(lines) == 6
    assert [line["image"] for line in lines] == sorted(r["image"] for r in scenes["records"][:6])
    for line in lines:
        assert isinstance(line["text"], str)
        assert line["model"] == loaded.name and line["adapter"] is None
        assert (line["max_new_tokens"], line["num_beams"], line["do_sample"], line["constrained"]) == (12, 1, False, False)
    # Rerun: nothing left to do, the file is unchanged.
    before = out.read_bytes()
    again = predict(loaded, scenes["records"], scenes["root"], out, batch_size=4, max_new_tokens=12, limit=6,
                    progress=False)
    assert again.generated == 0 and again.already_done == 6 and out.read_bytes() == before
    # Other settings into the same file are refused, not mixed.
    with pytest.raises(ValueError, match="other settings"):
        predict(loaded, scenes["records"], scenes["root"], out, batch_size=4, max_new_tokens=20, limit=6,
                progress=False)
    restarted = predict(loaded, scenes["records"], scenes["root"], out, batch_size=4, max_new_tokens=20, limit=6,
                        restart_if_changed=True, progress=False)
    assert restarted.generated == 6 and {line["max_new_tokens"] for line in read_jsonl(out)} == {20}


def test_retrained_weights_never_resume_old_captions(twin_dir, scenes, tmp_path):
    import shutil

    from bvip_helpers.predict import load, predict

    model_dir = shutil.copytree(twin_dir, tmp_path / "model")
    out = tmp_path / "preds.jsonl"
    predict(load(model_dir), scenes["records"][:2], scenes["root"], out, max_new_tokens=4, progress=False)
    weights = model_dir / "model.safetensors"
    os.utime(weights, (weights.stat().st_atime, weights.stat().st_mtime + 60))  # as if saved again by training
    with pytest.raises(ValueError, match="weights"):
        predict(load(model_dir), scenes["records"][:2], scenes["root"], out, max_new_tokens=4, progress=False)


def test_a_redrawn_image_is_captioned_again_not_resumed(loaded, scenes, tmp_path):
    """Same names, new pictures (`bvip synth` redrawn): the old captions describe other images."""
    import shutil

    from bvip_helpers.predict import predict

    root = Path(shutil.copytree(scenes["root"], tmp_path / "images"))
    records = scenes["records"][:2]
    out = tmp_path / "preds.jsonl"
    predict(loaded, records, root, out, max_new_tokens=4, progress=False)
    shutil.copyfile(root / scenes["records"][5]["image"], root / records[0]["image"])
    with pytest.raises(ValueError, match=r"another version of the image"):
        predict(loaded, records, root, out, max_new_tokens=4, progress=False)
    again = predict(loaded, records, root, out, max_new_tokens=4, restart_if_changed=True, progress=False)
    assert again.generated == 2 and (tmp_path / "preds.jsonl.previous").is_file()


@pytest.mark.slow
def test_batched_left_padded_greedy_matches_one_by_one(loaded, scenes, tmp_path):
    from bvip_helpers.predict import predict

    # Two prompt lengths so the batch really is padded.
    records = [{**r, "prompt": "Describe." if i % 2 else r["prompt"]} for i, r in enumerate(scenes["records"][:6])]
    texts = {}
    for batch_size in (1, 6):
        out = tmp_path / f"b{batch_size}.jsonl"
        predict(loaded, records, scenes["root"], out, batch_size=batch_size, max_new_tokens=16, constrained=True,
                progress=False)
        texts[batch_size] = {line["image"]: line["text"] for line in read_jsonl(out)}
    assert texts[1] == texts[6]


def test_bad_image_is_named_and_skipped_only_on_request(loaded, scenes, tmp_path):
    from bvip_helpers.predict import predict

    root = scenes["root"]
    broken = root / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    records = [*scenes["records"][:2], {"image": "broken.jpg"}, {"image": "missing/none.jpg"}]
    out = tmp_path / "preds.jsonl"
    with pytest.raises(ImagePathError, match="broken.jpg"):
        predict(loaded, records, root, out, max_new_tokens=4, progress=False)
    assert not out.exists()  # checked before any generation
    stats = predict(loaded, records, root, out, max_new_tokens=4, skip_bad_images=True, progress=False)
    assert stats.generated == 2 and len(stats.bad_images) == 2
    assert "broken.jpg" in stats.bad_images[0] and "none.jpg" in stats.bad_images[1]
    with pytest.raises(ImagePathError, match="escapes"):
        predict(loaded, [{"image": "../outside.jpg"}], root, tmp_path / "p2.jsonl", progress=False)


def test_recover_output_drops_only_a_truncated_last_line_and_leaves_the_file_alone(tmp_path):
    from bvip_helpers.predict import recover_output

    path = tmp_path / "p.jsonl"
    torn = '{"image": "a.jpg", "text": "x"}\n{"image": "b.jpg", "te'
    path.write_text(torn, encoding="utf-8")
    records, dropped, rewrite = recover_output(path)
    assert dropped == 1 and rewrite and [r["image"] for r in records] == ["a.jpg"]
    assert path.read_text(encoding="utf-8") == torn  # the caller rewrites it, once the file is known to be its run's
    path.write_bytes('{"image": "a.jpg", "text": "é"}\n{"image": "b.jpg", "text": "é'.encode()[:-1])  # a cut character
    assert recover_output(path)[:2] == ([{"image": "a.jpg", "text": "é"}], 1)
    path.write_text('{"image": "a.jpg", "text": "x"}\nnot json\n{"image": "c.jpg", "text": "y"}\n', encoding="utf-8")
    with pytest.raises(JsonlError, match="line 2"):
        recover_output(path)
    path.write_bytes(b'{"image": "a.jpg", "text": "caf\xe9"}\n{"image": "c.jpg", "text": "y"}\n')  # Latin-1: not ours
    with pytest.raises(JsonlError, match="line 1 is not a UTF-8"):
        recover_output(path)
    path.write_text('{"image": "a.jpg", "text": "x"}', encoding="utf-8")  # complete, newline missing: kept
    assert recover_output(path) == ([{"image": "a.jpg", "text": "x"}], 0, True)


def test_injected_crash_then_resume_gives_one_line_per_image(loaded, scenes, tmp_path, monkeypatch):
    """Deterministic crash after two batches plus a half-written line, then a resume."""
    from bvip_helpers import predict as predict_module

    records = scenes["records"][:8]
    out = tmp_path / "preds.jsonl"
    real = predict_module._generate_batch
    calls = {"n": 0}

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            with open(out, "a", encoding="utf-8") as fh:
                fh.write('{"image": "half-writ')  # what a kill during the write leaves behind
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(predict_module, "_generate_batch", crashing)
    with pytest.raises(KeyboardInterrupt):
        predict_module.predict(loaded, records, scenes["root"], out, batch_size=2, max_new_tokens=6, progress=False)
    monkeypatch.setattr(predict_module, "_generate_batch", real)
    stats = predict_module.predict(loaded, records, scenes["root"], out, batch_size=2, max_new_tokens=6,
                                   progress=False)
    assert stats.dropped_partial_lines == 1 and stats.already_done == 4 and stats.generated == 4
    lines = read_jsonl(out)
    assert sorted(line["image"] for line in lines) == sorted(r["image"] for r in records)


@pytest.mark.slow
def test_cli_killed_midway_resumes_with_exactly_one_line_per_image(twin_dir, scenes, tmp_path):
    out = tmp_path / "preds.jsonl"
    args = ["--model", str(twin_dir), "--jsonl", str(scenes["jsonl"]), "--image_root", str(scenes["root"]),
            "--out", str(out), "--batch_size", "1", "--max_new_tokens", "24"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "bvip_helpers", "predict", *args, "--no_progress"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 2:
                break
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
    n_before = out.read_bytes().count(b"\n")
    assert 2 <= n_before < len(scenes["records"]), "the kill must land mid-run"
    with open(out, "ab") as fh:  # and as if it had landed inside a write
        fh.write(b'{"image": "testing/images/0')
    done = _cli(*args)
    assert done.returncode == 0, done.stderr
    assert "truncated" in done.stderr
    lines = read_jsonl(out)
    images = [line["image"] for line in lines]
    assert len(images) == len(set(images)) == len(scenes["records"])
    assert set(images) == {r["image"] for r in scenes["records"]}
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["already_done"] == n_before and summary["dropped_partial_lines"] == 1


def test_cli_reports_bad_jsonl_and_missing_images_clearly(twin_dir, scenes, tmp_path):
    records = tmp_path / "r.jsonl"
    write_jsonl(records, [{"image": "nowhere/x.jpg", "prompt": "p"}])
    done = _cli("--model", str(twin_dir), "--jsonl", str(records), "--image_root", str(scenes["root"]),
                "--out", str(tmp_path / "p.jsonl"))
    assert done.returncode == 2 and "nowhere/x.jpg" in done.stderr and "--skip_bad_images" in done.stderr


@pytest.mark.slow
def test_notebook_05_smoke_runs(tmp_path):
    papermill = pytest.importorskip("papermill")
    notebook = ROOT / "notebooks" / "05_eval.ipynb"
    if not notebook.exists():
        pytest.fail("notebooks/05_eval.ipynb is missing")
    env_before = os.environ.get("BVIP_SMOKE")
    os.environ["BVIP_SMOKE"] = "1"
    try:
        papermill.execute_notebook(str(notebook), str(tmp_path / "05_out.ipynb"), cwd=str(notebook.parent),
                                   kernel_name="python3", progress_bar=False)
    finally:
        if env_before is None:
            os.environ.pop("BVIP_SMOKE", None)
        else:
            os.environ["BVIP_SMOKE"] = env_before
    from bvip_helpers.io import figures_dir

    assert (figures_dir() / "05_presence_accuracy.png").is_file()
