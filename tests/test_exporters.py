"""Exporters on a synthetic SFT split: formats, image checks, shards readable back."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from PIL import Image

from bvip_helpers import exporters
from bvip_helpers.io import ImagePathError, write_jsonl

PROMPT = "Describe this street scene for a blind pedestrian."


def _record(i, image):
    return {"image": image, "prompt": PROMPT, "response": f"Sidewalk: left. Road: right. RoadVsSidewalk: right_of. #{i}",
            "sidewalk_pos": "left", "road_pos": "right", "road_vs_sidewalk": "right_of"}


@pytest.fixture()
def sft(tmp_path):
    """3 train (one PNG, two JPEG) + 1 val record with real small images."""
    root = tmp_path / "images"
    (root / "training" / "images").mkdir(parents=True)
    (root / "validation" / "images").mkdir(parents=True)
    names = ["training/images/000000.png", "training/images/000001.jpg", "training/images/000002.jpg"]
    for i, name in enumerate(names):
        Image.new("RGB", (32 + i, 24), (10 * i, 100, 200)).save(root / name)
    Image.new("RGB", (20, 20)).save(root / "validation/images/000003.jpg")
    sft_dir = tmp_path / "sft"
    write_jsonl(sft_dir / "bvpi_sft_train.jsonl", [_record(i, n) for i, n in enumerate(names)])
    write_jsonl(sft_dir / "bvpi_sft_val.jsonl", [_record(3, "validation/images/000003.jpg")])
    return sft_dir, root


def test_internvl_conversations_and_meta(sft, tmp_path):
    sft_dir, root = sft
    report = exporters.export("internvl", sft_dir, root, tmp_path / "out")
    assert report.written == {"train": 3, "val": 1}
    lines = [json.loads(x) for x in (tmp_path / "out" / "bvip_train.jsonl").read_text().splitlines()]
    assert lines[0]["image"] == "training/images/000000.png"
    assert (lines[1]["width"], lines[1]["height"]) == (33, 24)
    human, gpt = lines[0]["conversations"]
    assert human == {"from": "human", "value": f"<image>\n{PROMPT}"}
    assert gpt["from"] == "gpt" and gpt["value"].startswith("Sidewalk: left.")
    meta = json.loads((tmp_path / "out" / "bvip_meta.json").read_text())
    assert meta == {"bvip_train": {"root": f"{root.resolve()}/", "data_augment": False, "repeat_time": 1,
                                   "length": 3, "annotation": str((tmp_path / "out" / "bvip_train.jsonl").resolve())}}
    assert "internvl_chat" in report.command and "bvip_meta.json" in report.command


def test_openflamingo_shards_share_basenames(sft, tmp_path):
    sft_dir, root = sft
    report = exporters.export("openflamingo", sft_dir, root, tmp_path / "wds", samples_per_shard=2)
    shards = sorted((tmp_path / "wds" / "train").glob("shard-*.tar"))
    assert [s.name for s in shards] == ["shard-000000.tar", "shard-000001.tar"]
    with tarfile.open(shards[0]) as tar:
        names = tar.getnames()
        assert names == ["train_0000000.jpg", "train_0000000.txt", "train_0000000.json",
                         "train_0000001.jpg", "train_0000001.txt", "train_0000001.json"]
        image = Image.open(io.BytesIO(tar.extractfile("train_0000000.jpg").read()))
        assert image.format == "JPEG" and image.size == (32, 24)  # the PNG was re-encoded
        assert tar.extractfile("train_0000000.txt").read().decode().startswith("Sidewalk: left.")
        assert json.loads(tar.extractfile("train_0000001.json").read())["prompt"] == PROMPT
    assert "shard-{000000..000001}.tar" in report.command


def test_openflamingo_shard_reads_back_with_webdataset(sft, tmp_path):
    wds = pytest.importorskip("webdataset")
    sft_dir, root = sft
    exporters.export("openflamingo", sft_dir, root, tmp_path / "wds", splits=("train",))
    shard = str(tmp_path / "wds" / "train" / "shard-000000.tar")
    samples = list(wds.WebDataset(shard, shardshuffle=False).decode("pil").to_tuple("jpg;png;jpeg", "txt"))
    assert len(samples) == 3
    assert samples[2][0].size == (34, 24) and samples[2][1].endswith("#2")


def test_mobilevlm_llava_json(sft, tmp_path):
    sft_dir, root = sft
    report = exporters.export("mobilevlm", sft_dir, root, tmp_path / "m")
    data = json.loads((tmp_path / "m" / "bvip_train.json").read_text())
    assert isinstance(data, list) and len(data) == 3
    assert set(data[0]) == {"id", "image", "conversations"}
    assert data[0]["conversations"][0]["value"] == f"<image>\n{PROMPT}"
    assert "--data_path" in report.command and str(root.resolve()) in report.command


def test_moondream_qa_jsonl(sft, tmp_path):
    sft_dir, root = sft
    exporters.export("moondream", sft_dir, root, tmp_path / "md")
    line = json.loads((tmp_path / "md" / "bvip_val.jsonl").read_text().splitlines()[0])
    assert line["image"] == "validation/images/000003.jpg"
    assert line["qa"]["question"] == f"\n\nQuestion: {PROMPT}\n\nAnswer:"
    assert line["qa"]["answer"].endswith("#3")


def test_escaping_image_path_is_refused(sft, tmp_path):
    sft_dir, root = sft
    write_jsonl(sft_dir / "bvpi_sft_train.jsonl", [_record(0, "../secret.png")])
    with pytest.raises(ImagePathError, match="line 1.*escapes"):
        exporters.export("internvl", sft_dir, root, tmp_path / "out")
    assert not (tmp_path / "out" / "bvip_train.jsonl").exists()


def test_missing_images_stop_the_export_unless_skipped(sft, tmp_path):
    sft_dir, root = sft
    (root / "training/images/000001.jpg").unlink()
    (root / "training/images/000002.jpg").write_bytes(b"not an image")
    with pytest.raises(exporters.MissingImagesError, match="2 images missing or unreadable"):
        exporters.export("mobilevlm", sft_dir, root, tmp_path / "m")
    report = exporters.export("mobilevlm", sft_dir, root, tmp_path / "m", skip_missing=True)
    assert report.written["train"] == 1 and len(report.missing) == 2
    assert "bvpi_sft_train.jsonl:2 training/images/000001.jpg" in report.missing[0]
    assert "left out 2" in report.summary()


def test_cli_export_and_clear_errors(sft, tmp_path, capsys):
    from bvip_helpers.cli import main

    sft_dir, root = sft
    out = tmp_path / "cli"
    assert main(["export", "--format", "moondream", "--sft_dir", str(sft_dir), "--image_root", str(root),
                 "--out", str(out), "--splits", "train"]) == 0
    assert (out / "bvip_train.jsonl").is_file() and not (out / "bvip_val.jsonl").exists()
    assert "python -m moondream.finetune.finetune_text" in capsys.readouterr().out
    assert main(["export", "--format", "internvl", "--sft_dir", str(tmp_path / "nope"), "--image_root",
                 str(root), "--out", str(out)]) == 2
    assert "bvip build-dataset" in capsys.readouterr().err  # errors go to stderr, as in every bvip command


def test_record_without_response_names_the_line(sft, tmp_path):
    sft_dir, root = sft
    bad = _record(0, "training/images/000000.png")
    del bad["response"]
    write_jsonl(sft_dir / "bvpi_sft_val.jsonl", [bad])
    with pytest.raises(ValueError, match="bvpi_sft_val.jsonl: line 1 has no 'response'"):
        exporters.export("internvl", sft_dir, root, tmp_path / "out")
