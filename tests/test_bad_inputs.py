"""Bad input and faults, one row per case (issue 21, and issue 16 part 4), each run through ``bvip`` in-process.

Every case states the exit code and the message it must end with. An exception escaping
``bvip_helpers.cli.main`` fails the case: that is the traceback the user would have seen. The
cases use the committed 60-scene sample (``data/sample``) and the committed demo base
(``tiny-qwen2-vl-base``), so each takes a second or two; the two that train are marked slow.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from bvip_helpers import cli
from bvip_helpers.io import read_jsonl, write_jsonl

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"
CAPTIONS, ANNOTATIONS = SAMPLE / "complete_captions_sensation.csv", SAMPLE / "annotations_with_obj_pos.csv"
MODEL = "tiny-qwen2-vl-base"


# --- shared inputs -------------------------------------------------------------------


@pytest.fixture(scope="module")
def truth() -> pd.DataFrame:
    from bvip_helpers.dataset import load_ground_truth

    return load_ground_truth(CAPTIONS, ANNOTATIONS)


@pytest.fixture(scope="module")
def finished_sft_run(sample_data, tmp_path_factory) -> Path:
    """A real two-step run with a checkpoint after each step (copied by the cases that change it)."""
    out = tmp_path_factory.mktemp("sft_run") / "run"
    assert cli.main(["sft", *_sft_args(sample_data, out), "--max_steps", "2", "--save_steps", "1"]) == 0
    return out


@pytest.fixture
def env(tmp_path, monkeypatch, sample_data, truth, request) -> SimpleNamespace:
    def finished_sft(dest: Path) -> Path:
        return Path(shutil.copytree(request.getfixturevalue("finished_sft_run"), dest))

    return SimpleNamespace(tmp=tmp_path, monkeypatch=monkeypatch, data=sample_data, truth=truth,
                           finished_sft=finished_sft, cleanup=request.addfinalizer)


def _sft_args(data: Path, out: Path) -> list[str]:
    return ["--model", MODEL, "--data_dir", str(data), "--image_root", str(SAMPLE), "--output_dir", str(out),
            "--batch_size", "2", "--max_steps", "1", "--logging_steps", "1", "--eval", "false", "--merge", "false"]


def _predict_args(jsonl: Path, out: Path, *extra: str, image_root: Path = SAMPLE) -> list[str]:
    return ["predict", "--model", MODEL, "--jsonl", str(jsonl), "--image_root", str(image_root), "--out", str(out),
            "--max_new_tokens", "8", "--no_progress", *extra]


def _test_records(e) -> Path:
    return e.data / "bvpi_sft_test.jsonl"


def _split_predictions(e, split: str = "test", suffix: str | None = None) -> list[dict]:
    rows = e.truth[e.truth["split"] == split]
    images = rows["image_path"] if suffix is None else rows["image_path"].str.replace(".jpg", suffix, regex=False)
    return [{"image": image, "text": text} for image, text in zip(images, rows["response"], strict=True)]


def _evaluate_args(preds: Path, *extra: str, captions: Path = CAPTIONS, annotations: Path = ANNOTATIONS) -> list[str]:
    return ["evaluate", "--pred_jsonl", str(preds), "--captions_csv", str(captions), "--annotations_csv",
            str(annotations), *extra]


def _build_args(e, *extra: str, captions: Path = CAPTIONS, annotations: Path = ANNOTATIONS) -> list[str]:
    return ["build-dataset", "--captions_csv", str(captions), "--annotations_csv", str(annotations),
            "--out_dir", str(e.tmp / "out"), "--quiet", *extra]


def _write_preds(e, records: list[dict], name: str = "preds.jsonl") -> Path:
    path = e.tmp / name
    write_jsonl(path, records)
    return path


def _csv_rows(path: Path) -> list[list[str]]:
    import csv

    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


def _write_csv(path: Path, rows: list[list[str]]) -> Path:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(rows)
    return path


def _annotations_with(e, column: str, value: str, image: str | None = None) -> Path:
    """The sample's annotations with ``column`` set to ``value`` in every row, or in the row of ``image`` only."""
    rows = _csv_rows(ANNOTATIONS)
    index = rows[0].index(column)
    for row in rows[1:]:
        if image is None or row[0] == image:
            row[index] = value
    return _write_csv(e.tmp / "annotations.csv", rows)


def _captions_sharing_a_file_name(e) -> Path:
    """Lines 2 and 3 name 000015.jpg, in testing/ and in training/."""
    rows = _csv_rows(CAPTIONS)
    rows[2][0] = "training/images/" + rows[1][0].rsplit("/", 1)[1]
    return _write_csv(e.tmp / "captions.csv", rows)


def _latin1_copy(e, source: Path, name: str) -> Path:
    """``source`` with an ``é`` in Latin-1 (one byte, 0xe9) on its line 2."""
    lines = source.read_bytes().split(b"\n")
    lines[1] = lines[1].replace(b"sidewalk", b"caf\xe9 sidewalk", 1)
    path = e.tmp / name
    path.write_bytes(b"\n".join(lines))
    return path


def _random_bytes(e, name: str) -> Path:
    import random

    path = e.tmp / name
    path.write_bytes(random.Random(0).randbytes(4096))
    return path


def _bomb_records(e) -> tuple[Path, Path]:
    """An image root holding the test images and a 14,000 x 14,000 PNG of a few kilobytes; records for all of them."""
    from PIL import Image

    root = e.tmp / "images"
    records = read_jsonl(_test_records(e))
    for record in records:
        (root / record["image"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SAMPLE / record["image"], root / record["image"])
    Image.new("1", (14_000, 14_000)).save(root / "bomb.png")  # 1 bit per pixel: 24 MB in memory, 24 kB on disk
    jsonl = e.tmp / "records.jsonl"
    write_jsonl(jsonl, [*records, {**records[0], "image": "bomb.png"}])
    return jsonl, root


def _hold_lock(e, out: Path) -> None:
    """Another process is writing ``out``: its advisory lock on ``<out>.lock``, held until the test ends."""
    import fcntl

    lock = out.with_name(out.name + ".lock")
    fh = open(lock, "w")  # noqa: SIM115 - held open for the whole case
    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    fh.write("pid 99999 on another-host\n")
    fh.flush()
    e.cleanup(fh.close)  # unlocked when the case ends


def _fake_finished_sft_run(e) -> Path:
    """An output_dir as a finished run leaves it: adapter, merged/, eval_val.json, preds_val.jsonl, sft_result.json."""
    out = e.tmp / "run"
    (out / "merged").mkdir(parents=True)
    (out / "merged" / "model.safetensors").write_bytes(b"old merged model")
    for name in ("adapter_model.safetensors", "eval_val.json", "preds_val.jsonl", "sft_result.json"):
        (out / name).write_text("from the earlier run")
    (out / "notes.txt").write_text("mine")
    return out


# --- the cases -------------------------------------------------------------------------


@dataclass
class Case:
    """``setup(env) -> argv``; the run must exit with ``code`` and print ``message`` (a regex: stderr when the
    command fails, stdout + stderr otherwise); ``check(env, out, err)`` looks at the files afterwards."""

    setup: Callable[[SimpleNamespace], list[str]]
    code: int
    message: str
    check: Callable[[SimpleNamespace, str, str], None] | None = None


def _no_change(path_of: Callable[[SimpleNamespace], Path]) -> Callable:
    def check(e, out, err):
        assert path_of(e).read_bytes() == e.before, "a refused run must leave the file as it was"
    return check


def _remember(e, path: Path) -> Path:
    e.before = path.read_bytes()
    return path


# predict ---------------------------------------------------------------------------------


def predict_out_is_jsonl(e):
    jsonl = _remember(e, Path(shutil.copyfile(_test_records(e), e.tmp / "records.jsonl")))
    return _predict_args(jsonl, jsonl)


def predict_foreign_out(e, *extra):
    out = e.tmp / "preds.jsonl"  # another tool's captions of the same images: image and text only
    write_jsonl(out, [{"image": r["image"], "text": "Sidewalk: left."} for r in read_jsonl(_test_records(e))])
    _remember(e, out)
    return _predict_args(_test_records(e), out, *extra)


def check_foreign_kept_apart(e, out, err):
    preds = e.tmp / "preds.jsonl"
    assert (e.tmp / "preds.jsonl.previous").read_bytes() == e.before
    lines = read_jsonl(preds)
    assert len(lines) == 8 and all(line["run_id"] and line["model"] == MODEL for line in lines)


def predict_changed_prompt(e):
    out = e.tmp / "preds.jsonl"
    assert cli.main(_predict_args(_test_records(e), out)) == 0
    records = [{**r, "prompt": r["prompt"].replace("blind pedestrian", "pedestrian")}
               for r in read_jsonl(_test_records(e))]
    changed = e.tmp / "changed.jsonl"
    write_jsonl(changed, records)
    _remember(e, out)
    return _predict_args(changed, out)


def predict_second_writer(e):
    out = e.tmp / "preds.jsonl"
    _hold_lock(e, out)
    return _predict_args(_test_records(e), out)


def predict_bomb(e, *extra):
    jsonl, root = _bomb_records(e)
    return _predict_args(jsonl, e.tmp / "preds.jsonl", *extra, image_root=root)


def check_bomb_skipped(e, out, err):
    lines = read_jsonl(e.tmp / "preds.jsonl")
    assert len(lines) == 8 and "bomb.png" not in {line["image"] for line in lines}
    assert json.loads(out.strip().splitlines()[-1])["generated"] == 8


def predict_tiny_pixel_limit(e):
    return _predict_args(_test_records(e), e.tmp / "preds.jsonl", "--max_image_pixels", "1000")


def predict_line_not_object(e):
    lines = _test_records(e).read_text().splitlines()
    lines[1] = "[1, 2]"
    jsonl = e.tmp / "records.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    return _predict_args(jsonl, e.tmp / "preds.jsonl")


def predict_missing_jsonl(e):
    return _predict_args(e.tmp / "no_such_records.jsonl", e.tmp / "preds.jsonl")


def predict_unknown_model(e):
    args = _predict_args(_test_records(e), e.tmp / "preds.jsonl")
    args[args.index(MODEL)] = "no-such-model"
    return args


def predict_unwritable_out(e):
    (e.tmp / "a_file").write_text("not a folder")
    return _predict_args(_test_records(e), e.tmp / "a_file" / "preds.jsonl")


def predict_disk_full(e):
    from bvip_helpers import predict

    def full(path, records):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    e.monkeypatch.setattr(predict, "append_jsonl", full)
    return _predict_args(_test_records(e), e.tmp / "preds.jsonl")


def predict_latin1_jsonl(e):
    return _predict_args(_latin1_copy(e, _test_records(e), "records.jsonl"), e.tmp / "preds.jsonl")


def predict_limit_0(e):
    return _predict_args(_test_records(e), e.tmp / "preds.jsonl", "--limit", "0")


def predict_missing_image_root(e):
    return _predict_args(_test_records(e), e.tmp / "preds.jsonl", image_root=e.tmp / "no_such_root")


def predict_foreign_torn_out(e):
    out = e.tmp / "preds.jsonl"  # another tool's file with a torn end: refused, and left byte for byte
    out.write_bytes(b'{"image": "a.jpg", "text": "caf\xc3\xa9"}\n{"image": "b.jpg", "te')
    _remember(e, out)
    return _predict_args(_test_records(e), out)


def predict_kept_apart_twice(e):
    args = predict_foreign_out(e, "--restart_if_changed")
    (e.tmp / "preds.jsonl.previous").write_text("kept apart by an earlier restart\n")
    return args


def check_both_kept_apart(e, out, err):
    assert (e.tmp / "preds.jsonl.previous").read_text() == "kept apart by an earlier restart\n"
    assert (e.tmp / "preds.jsonl.previous.1").read_bytes() == e.before


def predict_other_dtype(e):
    out = e.tmp / "preds.jsonl"  # written in float32; the rerun asks for bfloat16 (simulated in the file)
    assert cli.main(_predict_args(_test_records(e), out)) == 0
    write_jsonl(out, [{**line, "dtype": "bfloat16"} for line in read_jsonl(out)])
    _remember(e, out)
    return _predict_args(_test_records(e), out)


def predict_model_not_loadable(e):
    args = _predict_args(_test_records(e), e.tmp / "preds.jsonl")
    args[args.index(MODEL)] = "Qwen/Qwen2-VL-2B-Instruct"  # a real hub id, not cached here (HF_HUB_OFFLINE)
    return args


# dpo and pairs -----------------------------------------------------------------------------


def _one_pair(e) -> Path:
    record = read_jsonl(e.data / "bvpi_chat_train.jsonl")[0]
    from bvip_helpers.families import record_image_path, record_prompt, record_response

    path = e.tmp / "pairs.jsonl"
    write_jsonl(path, [{"image": record_image_path(record), "prompt": record_prompt(record),
                        "chosen": record_response(record), "rejected": "Sidewalk: unknown."}])
    return path


def dpo_args(e, *extra: str) -> list[str]:
    adapter = e.tmp / "adapter"
    adapter.mkdir(exist_ok=True)
    (adapter / "adapter_config.json").write_text("{}")
    return ["dpo", "--model", MODEL, "--adapter", str(adapter), "--train_pairs", str(_one_pair(e)),
            "--image_root", str(SAMPLE), "--output_dir", str(e.tmp / "dpo"), *extra]


def dpo_unknown_model(e):
    args = dpo_args(e)
    args[args.index(MODEL)] = "no-such-model"
    return args


def pairs_ranked_unknown_model(e):
    return ["pairs", "--source", "ranked", "--model", "no-such-model", "--data_dir", str(e.data),
            "--image_root", str(SAMPLE), "--limit", "2", "--out", str(e.tmp / "ranked.jsonl")]


# evaluate --------------------------------------------------------------------------------


def evaluate_val_as_test(e):
    return _evaluate_args(_write_preds(e, _split_predictions(e, "val")), "--split", "test")


def evaluate_most_outside_split(e):
    return _evaluate_args(_write_preds(e, _split_predictions(e, "test")[:2] + _split_predictions(e, "val")[:6]))


def evaluate_upper_case_suffix(e):
    return _evaluate_args(_write_preds(e, _split_predictions(e, "test", suffix=".JPG")))


def evaluate_unwritable_json(e):
    (e.tmp / "a_file").write_text("not a folder")
    return _evaluate_args(_write_preds(e, _split_predictions(e)), "--json", str(e.tmp / "a_file" / "report.json"))


def evaluate_pred_jsonl_is_a_folder(e):
    (e.tmp / "preds").mkdir()
    return _evaluate_args(e.tmp / "preds")


def evaluate_non_string_image(e, *extra):
    preds = _split_predictions(e)
    preds[1]["image"] = 5
    return _evaluate_args(_write_preds(e, preds), *extra)


def evaluate_latin1_jsonl(e):
    preds = _write_preds(e, _split_predictions(e))
    return _evaluate_args(_latin1_copy(e, preds, "latin1.jsonl"))


def evaluate_non_string_texts(e):
    preds = _split_predictions(e)
    for pred, value in zip(preds, (5, ["Sidewalk: left."], None), strict=False):
        pred["text"] = value
    return _evaluate_args(_write_preds(e, preds), "--json", str(e.tmp / "report.json"))


def check_non_string_scored_empty(e, out, err):
    report = json.loads((e.tmp / "report.json").read_text())
    assert report["inputs"]["non_string_texts"] == 3
    assert report["presence"]["sidewalk_pos"] == 5 / 8  # the three are empty captions, not "5" or "['Sidewalk...']"


def evaluate_lookalike_characters(e):
    preds = _split_predictions(e)
    for pred in preds:
        pred["text"] = (pred["text"].replace("Sidewalk: ", "Sidewalk:\u00a0").replace("Road: ", "Road\uff1a ")
                        .replace("RoadVsSidewalk", "RoadVs\u200bSidewalk"))
    return _evaluate_args(_write_preds(e, preds), "--json", str(e.tmp / "report.json"))


def check_lookalikes_normalised(e, out, err):
    report = json.loads((e.tmp / "report.json").read_text())
    assert report["presence"] == {"sidewalk_pos": 1.0, "road_pos": 1.0, "road_vs_sidewalk": 1.0}
    assert report["accuracy"] == report["presence"] and report["inputs"]["normalised_texts"] == 8


def evaluate_unknown_side(e):
    """A close person whose position word is unknown; the predictions are the builder's captions ('side unknown')."""
    from bvip_helpers.dataset import load_ground_truth

    annotations = _annotations_with(e, "m_person", "Leftish", image="000015.jpg")  # the first test scene
    truth = load_ground_truth(CAPTIONS, annotations)
    rows = truth[truth["split"] == "test"]
    preds = [{"image": image, "text": text} for image, text in zip(rows["image_path"], rows["response"], strict=True)]
    return _evaluate_args(_write_preds(e, preds), "--json", str(e.tmp / "report.json"), annotations=annotations)


def check_unknown_side_found_but_misplaced(e, out, err):
    preds = read_jsonl(e.tmp / "preds.jsonl")
    assert "a person close, side unknown" in preds[0]["text"]
    structured = json.loads((e.tmp / "report.json").read_text())["structured"]
    person = structured["near_objects"]["per_object"]["person"]
    assert person["fn"] == 0 and person["fp"] == 0 and person["tp"] >= 1  # found, not a hallucination
    assert structured["hallucinated_objects"] == 0
    assert structured["position_accuracy"] < 1.0  # its side cannot be right


def evaluate_random_bytes_csv(e):
    return _evaluate_args(_write_preds(e, _split_predictions(e)), captions=_random_bytes(e, "captions.csv"))


def evaluate_shared_file_name(e):
    return _evaluate_args(_write_preds(e, _split_predictions(e)), captions=_captions_sharing_a_file_name(e))


def evaluate_latin1_csv(e):
    return _evaluate_args(_write_preds(e, _split_predictions(e)), captions=_latin1_copy(e, CAPTIONS, "captions.csv"))


# build-dataset -------------------------------------------------------------------------------


def build_unknown_object_position(e):
    return _build_args(e, annotations=_annotations_with(e, "m_person", "Leftish", image="000015.jpg"))


def check_person_kept_with_unknown_side(e, out, err):
    record = read_jsonl(e.tmp / "out" / "bvpi_sft_test.jsonl")[0]
    assert "a person close, side unknown" in record["response"]
    assert json.loads((e.tmp / "out" / "build_report.json").read_text())["objects_with_unknown_side"]["m_person"] == 1


def build_empty_road_column(e):
    return _build_args(e, annotations=_annotations_with(e, "road_pos", ""))


def build_shared_file_name(e):
    return _build_args(e, captions=_captions_sharing_a_file_name(e))


def build_latin1_csv(e):
    return _build_args(e, captions=_latin1_copy(e, CAPTIONS, "captions.csv"))


def build_random_bytes_csv(e):
    return _build_args(e, annotations=_random_bytes(e, "annotations.csv"))


def build_unwritable_out_dir(e):
    (e.tmp / "a_file").write_text("not a folder")
    args = _build_args(e)
    args[args.index("--out_dir") + 1] = str(e.tmp / "a_file" / "out")
    return args


def build_missing_image_root(e):
    return _build_args(e, "--image_root", str(e.tmp / "no_such_root"))


# sft -------------------------------------------------------------------------------------


def _repo_figures() -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (REPO / "figures").glob("*")}


def sft_into_finished_run(e, *extra):
    out = _fake_finished_sft_run(e)
    e.figures_before = _repo_figures()
    return ["sft", *_sft_args(e.data, out), *extra]


def check_finished_run_untouched(e, out, err):
    run = e.tmp / "run"
    assert (run / "adapter_model.safetensors").read_text() == "from the earlier run"
    assert (run / "merged" / "model.safetensors").is_file() and (run / "eval_val.json").is_file()


def check_overwrite_cleared_the_earlier_run(e, out, err):
    run = e.tmp / "run"
    assert not (run / "merged").exists() and not (run / "eval_val.json").exists()
    assert not (run / "preds_val.jsonl").exists()
    assert (run / "adapter_model.safetensors").stat().st_size > 1000  # the new adapter
    assert json.loads((run / "sft_result.json").read_text())["global_step"] == 1
    assert (run / "notes.txt").read_text() == "mine"  # not a run file: kept
    assert (run / "loss_curve.png").is_file()  # smaller: the loss figure goes with the run, not into <repo>/figures
    assert _repo_figures() == e.figures_before


def sft_corrupt_latest_checkpoint(e):
    out = e.finished_sft(e.tmp / "run")
    (out / "checkpoint-2" / "trainer_state.json").write_text('{"global_st')  # killed while saving it
    return ["sft", *_sft_args(e.data, out), "--max_steps", "2", "--save_steps", "1", "--resume", "auto"]


def check_resumed_from_checkpoint_1(e, out, err):
    result = json.loads((e.tmp / "run" / "sft_result.json").read_text())
    assert result["global_step"] == 2 and [step for step, _ in result["losses"]] == [1, 2]


def sft_max_steps_0(e):
    return ["sft", *_sft_args(e.data, e.tmp / "run"), "--max_steps", "0"]


def sft_eval_ture(e):
    return ["sft", *_sft_args(e.data, e.tmp / "run"), "--eval", "Ture"]


def sft_missing_image_root(e):
    args = ["sft", *_sft_args(e.data, e.tmp / "run")]
    args[args.index("--image_root") + 1] = str(e.tmp / "no_such_root")
    return args


# export, synth ---------------------------------------------------------------------------------


def export_missing_image_root(e):
    return ["export", "--format", "moondream", "--sft_dir", str(e.data), "--image_root", str(e.tmp / "no_such_root"),
            "--out", str(e.tmp / "export")]


def export_bomb(e):
    from PIL import Image

    sft_dir, root = e.tmp / "sft", e.tmp / "images"
    sft_dir.mkdir()
    records = read_jsonl(e.data / "bvpi_sft_train.jsonl")[:2]
    for record in records:
        (root / record["image"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SAMPLE / record["image"], root / record["image"])
    Image.new("1", (14_000, 14_000)).save(root / "bomb.png")
    write_jsonl(sft_dir / "bvpi_sft_train.jsonl", [*records, {**records[0], "image": "bomb.png"}])
    return ["export", "--format", "moondream", "--sft_dir", str(sft_dir), "--image_root", str(root),
            "--out", str(e.tmp / "export"), "--skip_missing"]


def synth_n_0(e):
    return ["synth", "--n", "0", "--out_dir", str(e.tmp / "synthetic"), "--quiet"]


CASES = {
    # issue 21, item 1: foreign lines in --out are not finished captions
    "predict-out-is-the-jsonl": Case(predict_out_is_jsonl, 2, r"--out .* is the --jsonl records file itself",
                                     _no_change(lambda e: e.tmp / "records.jsonl")),
    "predict-foreign-out-refused": Case(predict_foreign_out, 2, r"not written by `bvip predict`",
                                        _no_change(lambda e: e.tmp / "preds.jsonl")),
    "predict-foreign-out-kept-apart": Case(lambda e: predict_foreign_out(e, "--restart_if_changed"), 0,
                                           r"moved it to .*preds\.jsonl\.previous", check_foreign_kept_apart),
    # item 2: a changed prompt belongs to the run's identity
    "predict-changed-prompt": Case(predict_changed_prompt, 2, r"another prompt",
                                   _no_change(lambda e: e.tmp / "preds.jsonl")),
    # item 5: one writer per --out
    "predict-second-writer": Case(predict_second_writer, 2, r"being written by another process \(pid 99999"),
    # item 8: a decompression bomb is a bad image, with a limit that can be set
    "predict-decompression-bomb-skipped": Case(lambda e: predict_bomb(e, "--skip_bad_images"), 0,
                                               r"skipped 1 bad image.*too large", check_bomb_skipped),
    "predict-decompression-bomb-refused": Case(predict_bomb, 2, r"bomb\.png has more than .* pixels, over the limit"),
    "predict-max-image-pixels-is-settable": Case(predict_tiny_pixel_limit, 2, r"over the limit of 1,000 pixels"),
    # item 9: one-line messages, and no advice about a flag the command lacks
    "predict-line-not-an-object": Case(predict_line_not_object, 2, r"records\.jsonl: line 2 is not a JSON object"
                                       r"(?!.*--skip_bad_lines)"),
    "predict-missing-jsonl": Case(predict_missing_jsonl, 2, r"--jsonl .*no_such_records\.jsonl: no such file"),
    "predict-unknown-model": Case(predict_unknown_model, 2, r"unknown model 'no-such-model'"),
    "predict-unwritable-out": Case(predict_unwritable_out, 2, r"cannot write .*a_file"),
    "predict-disk-full": Case(predict_disk_full, 2, r"No space left on device.*rerun the same command to resume"),
    # a refused run never touches the file; a second restart keeps the first one's copy
    "predict-foreign-torn-out-untouched": Case(predict_foreign_torn_out, 2, r"not written by `bvip predict`",
                                               _no_change(lambda e: e.tmp / "preds.jsonl")),
    "predict-kept-apart-twice": Case(predict_kept_apart_twice, 0, r"moved it to .*preds\.jsonl\.previous\.1",
                                     check_both_kept_apart),
    # item 2: the numerics (device, dtype) change the text, so they belong to the run's identity
    "predict-other-dtype": Case(predict_other_dtype, 2, r"dtype: file has 'bfloat16', this run 'float32'",
                                _no_change(lambda e: e.tmp / "preds.jsonl")),
    # item 9: a model that cannot load is not an unwritable --out
    "predict-model-not-loadable": Case(predict_model_not_loadable, 2,
                                       r"^bvip predict: error: cannot load qwen2-vl-2b .*local model folder$"),
    "dpo-missing-pairs": Case(lambda e: dpo_args(e, "--train_pairs", str(e.tmp / "none.jsonl")), 2,
                              r"none\.jsonl: no such pairs file; make the pairs with `bvip pairs`"),
    "dpo-unknown-model": Case(dpo_unknown_model, 2, r"^bvip dpo: error: unknown model 'no-such-model'"),
    "pairs-ranked-unknown-model": Case(pairs_ranked_unknown_model, 2, r"^bvip pairs: error: unknown model 'no-such-model'"),
    # item 10
    "predict-latin1-jsonl": Case(predict_latin1_jsonl, 2, r"records\.jsonl: line 2 is not UTF-8 text \(byte 0xe9\)"),
    # smaller: --limit 0
    "predict-limit-0": Case(predict_limit_0, 2, r"--limit 0: caption at least 1 image"),
    # issue 16: an --image_root that does not exist
    "predict-missing-image-root": Case(predict_missing_image_root, 2, r"--image_root .*no_such_root does not exist"),
    # item 6 (and issue 16): predictions that do not match --split
    "evaluate-val-predictions-as-test": Case(evaluate_val_as_test, 2,
                                             r"only 0 of 8 predicted images are in the 'test' split.*they are in val "
                                             r"\(8\).*closest"),
    "evaluate-most-outside-split": Case(evaluate_most_outside_split, 2, r"only 2 of 8 predicted images"),
    "evaluate-JPG-against-jpg": Case(evaluate_upper_case_suffix, 2, r"closest to '000015\.JPG' are '000015\.jpg'"),
    # item 9
    "evaluate-unwritable-json": Case(evaluate_unwritable_json, 2, r"cannot write the report to .*a_file"),
    # item 10 (evaluate has --skip_bad_lines, so it may suggest it)
    "evaluate-pred-jsonl-is-a-folder": Case(evaluate_pred_jsonl_is_a_folder, 2,
                                            r"^bvip evaluate: error: (cannot read .*preds|.*preds.*(folder|directory))"),
    "evaluate-image-not-a-path": Case(evaluate_non_string_image, 2, r"line 2 has 'image' 5, not an image path"),
    "evaluate-image-not-a-path-skipped": Case(lambda e: evaluate_non_string_image(e, "--skip_bad_lines"), 0,
                                              r"bad_lines=1"),
    "evaluate-latin1-jsonl": Case(evaluate_latin1_jsonl, 2, r"latin1\.jsonl: line 2 is not UTF-8 text"),
    # smaller: non-string captions are counted, look-alike characters normalised
    "evaluate-non-string-texts": Case(evaluate_non_string_texts, 0, r"non_string_texts=3",
                                      check_non_string_scored_empty),
    "evaluate-nbsp-fullwidth-colon-zero-width": Case(evaluate_lookalike_characters, 0, r"normalised_texts=8",
                                                     check_lookalikes_normalised),
    # item 4, in the evaluator: found for recall, its position wrong
    "evaluate-close-object-side-unknown": Case(evaluate_unknown_side, 0, r"BVIP evaluation",
                                               check_unknown_side_found_but_misplaced),
    # issue 16: a CSV that is not text; item 7: one file name in two folders; item 10
    "evaluate-random-bytes-csv": Case(evaluate_random_bytes_csv, 2, r"captions\.csv: line \d+ (holds a NUL byte|is not"
                                      r" UTF-8)"),
    "evaluate-file-name-in-two-folders": Case(evaluate_shared_file_name, 2, r"line 2: testing/images/000015\.jpg, "
                                              r"line 3: training/images/000015\.jpg"),
    "evaluate-latin1-csv": Case(evaluate_latin1_csv, 2, r"captions\.csv: line 2 is not UTF-8 text \(byte 0xe9\)"),
    # item 4: a close object with an unknown position stays, and is counted; an empty mandatory column is reported
    "build-close-object-position-unknown": Case(build_unknown_object_position, 0, r"'side unknown': m_person=1",
                                                check_person_kept_with_unknown_side),
    "build-empty-road-column": Case(build_empty_road_column, 0, r"WARNING: .*the road_pos column is empty in all 60 "
                                    r"annotation rows, so every caption says 'Road: unknown'"),
    # item 7
    "build-file-name-in-two-folders": Case(build_shared_file_name, 2, r"'000015\.jpg' \(line 2: testing/images/"
                                           r"000015\.jpg, line 3: training/images/000015\.jpg\)"),
    # item 10, issue 16
    "build-latin1-csv": Case(build_latin1_csv, 2, r"captions\.csv: line 2 is not UTF-8 text \(byte 0xe9\)"),
    "build-random-bytes-csv": Case(build_random_bytes_csv, 2, r"annotations\.csv: line \d+ (holds a NUL byte|is not "
                                   r"UTF-8)"),
    # item 9, issue 16
    "build-unwritable-out-dir": Case(build_unwritable_out_dir, 2, r"cannot write into --out_dir .*a_file"),
    "build-missing-image-root": Case(build_missing_image_root, 2, r"--image_root .*no_such_root does not exist"),
    # item 3: a finished output_dir is refused unless resumed or overwritten; an overwrite clears it
    "sft-into-a-finished-output-dir": Case(sft_into_finished_run, 2, r"already holds an earlier SFT run.*--resume auto.*"
                                           r"--overwrite true", check_finished_run_untouched),
    "sft-overwrite-clears-the-earlier-run": pytest.param(
        Case(lambda e: sft_into_finished_run(e, "--overwrite", "true"), 0, r"--overwrite: the earlier run .*deleted",
             check_overwrite_cleared_the_earlier_run), marks=pytest.mark.slow),
    # item 9: a corrupt latest checkpoint on resume
    "sft-corrupt-latest-checkpoint": pytest.param(
        Case(sft_corrupt_latest_checkpoint, 0, r"checkpoint-2 is incomplete .*falling back to checkpoint-1",
             check_resumed_from_checkpoint_1), marks=pytest.mark.slow),
    # smaller: --max_steps 0, a boolean flag that is not a boolean (done by the lead: sft.parse_bool)
    "sft-max-steps-0": Case(sft_max_steps_0, 2, r"--max_steps 0: train at least 1 step"),
    "sft-eval-Ture": Case(sft_eval_ture, 2, r"argument --eval: 'Ture' is not a boolean"),
    # issue 16: an --image_root that does not exist
    "sft-missing-image-root": Case(sft_missing_image_root, 2, r"--image_root .*no_such_root does not exist"),
    "export-missing-image-root": Case(export_missing_image_root, 2, r"--image_root .*no_such_root does not exist"),
    # item 8, in the exporter
    "export-decompression-bomb-skipped": Case(export_bomb, 0, r"left out 1 samples .*bomb\.png .*too large"),
    # issue 16: bvip synth --n 0
    "synth-n-0": Case(synth_n_0, 2, r"--n must be at least 1, got 0"),
}


def _params() -> list:
    params = []
    for name, case in CASES.items():
        values, marks = ((case,), ()) if isinstance(case, Case) else (case.values, case.marks)
        params.append(pytest.param(*values, marks=marks, id=name))
    return params


@pytest.mark.parametrize("case", _params())
def test_bad_input_gets_one_clear_line(case, env, capsys):
    argv = case.setup(env)
    capsys.readouterr()  # only what the command itself prints
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse's own errors (a bad flag value) end this way, with one line
        code = exit_.code
    out, err = capsys.readouterr()
    shown = err if code else out + err
    assert code == case.code, f"exit {code}, expected {case.code}\nstdout: {out[-2000:]}\nstderr: {err[-2000:]}"
    assert "Traceback" not in out + err
    # the whole message on one line (progress bars and notes may come before it)
    assert any(re.search(case.message, line) for line in shown.splitlines()), \
        f"{case.message!r} not on one line of:\n{shown[-3000:]}"
    if case.check:
        case.check(env, out, err)

