"""Atomic writes, JSONL errors with line numbers, image-root containment, image checks."""

import json
import os

import pytest
from PIL import Image

from bvip_helpers import io


def test_write_jsonl_is_atomic_on_failure(tmp_path):
    target = tmp_path / "out.jsonl"
    io.write_jsonl(target, [{"a": 1}])

    def broken():
        yield {"a": 2}
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        io.write_jsonl(target, broken())
    assert io.read_jsonl(target) == [{"a": 1}], "the old file must survive a failed write"
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"], "no temp files left behind"


def test_atomic_dir_swaps_in_a_whole_folder_or_keeps_the_old_one(tmp_path):
    target = tmp_path / "model"
    with io.atomic_dir(target) as staging:
        (staging / "weights").write_text("v1")
    assert (target / "weights").read_text() == "v1"

    with pytest.raises(RuntimeError), io.atomic_dir(target) as staging:
        (staging / "weights").write_text("half")
        raise RuntimeError("crash mid-save")
    assert (target / "weights").read_text() == "v1", "the old folder must survive a failed save"

    def refuse(path):
        raise FileExistsError(f"{path} is not ours")

    with pytest.raises(FileExistsError), io.atomic_dir(target, clear=refuse) as staging:
        (staging / "weights").write_text("v2")
    assert (target / "weights").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["model"], "no staging folders left behind"


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "preds.jsonl"
    path.write_text('{"image": "a.jpg"}\n\n{"image": \n[1, 2]\n', encoding="utf-8")
    with pytest.raises(io.JsonlError, match=r"preds.jsonl: line 3"):
        io.read_jsonl(path)
    bad: list[int] = []
    assert io.read_jsonl(path, skip_bad_lines=True, bad_lines=bad) == [{"image": "a.jpg"}]
    assert bad == [3, 4]


def test_append_jsonl_appends_whole_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    io.append_jsonl(path, [{"i": 0}, {"i": 1}])
    io.append_jsonl(path, [{"i": 2}])
    assert [json.loads(line)["i"] for line in path.read_text().splitlines()] == [0, 1, 2]


@pytest.mark.parametrize("rel", ["../secret.jpg", "/etc/passwd", "a/../../b.jpg"])
def test_paths_escaping_the_image_root_are_refused(tmp_path, rel):
    with pytest.raises(io.ImagePathError, match="escapes the image root"):
        io.safe_image_path(tmp_path, rel)


def test_safe_image_path_inside_root(tmp_path):
    assert io.safe_image_path(tmp_path, "training/images/a.jpg") == (tmp_path / "training/images/a.jpg").resolve()


def test_missing_and_corrupt_images_are_reported(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (4, 4), "red").save(good)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    assert io.check_image(good) is None
    assert "not found" in io.check_image(tmp_path / "missing.jpg")
    assert "corrupt" in io.check_image(corrupt)
    assert io.load_image(good).mode == "RGB"


def test_save_fig_writes_png(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.setenv("BVIP_ROOT", str(tmp_path))
    monkeypatch.delenv("BVIP_FIGURES_DIR", raising=False)
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = io.save_fig("unit_test_plot", fig)
    plt.close(fig)
    assert path == tmp_path / "figures" / "unit_test_plot.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setenv("BVIP_FIGURES_DIR", str(tmp_path / "elsewhere"))
    assert io.save_fig("unit_test_plot", fig) == tmp_path / "elsewhere" / "unit_test_plot.png"


def test_output_lock_refuses_a_second_writer_and_names_the_first(tmp_path):
    target = tmp_path / "preds.jsonl"
    with io.output_lock(target) as lock:
        assert f"pid {os.getpid()}" in lock.read_text()
        with pytest.raises(io.OutputLockedError, match=rf"being written by another process \(pid {os.getpid()}"), \
                io.output_lock(target):
            pass
    assert not lock.exists()  # removed by its holder
    with io.output_lock(target):  # and free again
        pass


def test_output_lock_fails_at_once_in_an_unwritable_place(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(OSError), io.output_lock(tmp_path / "a_file" / "preds.jsonl"):
        pass


def test_image_pixel_limit_is_checked_on_the_header(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("1", (5000, 3000)).save(path)
    assert io.image_size(path) == (5000, 3000)
    with pytest.raises(io.ImagePathError, match=r"5000 x 3000 = 15,000,000 pixels, over the limit of 1,000,000"):
        io.load_image(path, max_pixels=1_000_000)


def test_jsonl_errors_suggest_only_the_flag_the_caller_has(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b": "caf\xe9"}\n')
    with pytest.raises(io.JsonlError, match=r"r.jsonl: line 2 is not UTF-8 text \(byte 0xe9\)"):
        io.read_jsonl(path)
    assert io.read_jsonl(path, skip_bad_lines=True) == [{"a": 1}]
    path.write_text('{"a": 1}\n[2]\n', encoding="utf-8")
    with pytest.raises(io.JsonlError) as plain:
        io.read_jsonl(path)
    assert "--skip_bad_lines" not in str(plain.value)
    with pytest.raises(io.JsonlError, match="pass --skip_bad_lines"):
        io.read_jsonl(path, skip_flag="--skip_bad_lines")
