"""``bvip report`` without a browser: the page's data, its escaping and policy, labels and the CLI."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path

import pandas as pd
import pytest

from bvip_helpers import errors, report
from bvip_helpers.cli import main as bvip_main

PAYLOAD = "</script><script>alert(1)</script><img src=x onerror=alert(2)> & <!-- __BVIP_JS__"


def _write_predictions(path, images, text):
    path.write_text("".join(json.dumps({"image": p, "text": text(i, p)}) + "\n" for i, p in enumerate(images)))
    return path


@pytest.fixture
def sample_files(tmp_path, sample_dir):
    captions, annotations = sample_dir / "complete_captions_sensation.csv", sample_dir / "annotations_with_obj_pos.csv"
    truth = pd.read_csv(captions).query("split == 'test'")
    images = truth["image_path"].tolist()
    files = {
        "A": _write_predictions(tmp_path / "a.jsonl", images, lambda i, p: PAYLOAD if i == 0 else "Sidewalk: left."),
        "B": _write_predictions(tmp_path / "b.jsonl", images, lambda i, p: "Sidewalk: left."),
    }
    return files, captions, annotations, sample_dir, images


def _page_data(page: str) -> dict:
    block = re.search(r'<script type="application/json" id="bvip-data">(.*?)</script>', page, re.S).group(1)
    return json.loads(block)


def test_the_page_holds_its_data_escaped_and_allows_only_its_own_code(tmp_path, sample_files):
    files, captions, annotations, root, images = sample_files
    page_path = report.build_report(files, captions, annotations, root, tmp_path / "out")
    page = page_path.read_text(encoding="utf-8")
    # the caption cannot close the data block or open a comment: its < > & are \u escapes in the JSON
    assert "<img src=x" not in page and "alert(1)</script>" not in page and "<!-- __BVIP" not in page
    assert page.count("</script>") == 2  # the data block and the script block, nothing else
    data = _page_data(page)
    record = next(r for r in data["records"] if r["prediction"]["text"] == PAYLOAD)  # the text survives intact
    assert data["models"][record["model"]] == "A"
    assert len(data["images"]) == len(images) and len(data["records"]) == 2 * len(images)
    assert all(image["thumb"].startswith("data:image/jpeg;base64,") for image in data["images"])
    # the CSP names the hash of the inline script and style: no other script runs, nothing is fetched
    policy = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page).group(1)
    script = re.search(r"<script>(.*?)</script>", page, re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in policy.replace("&#x27;", "'")
    assert "default-src 'none'" in policy.replace("&#x27;", "'")
    assert not re.search(r"(src|href)=\"https?:", page)
    assert (tmp_path / "out" / "errors.jsonl").is_file() and (tmp_path / "out" / "errors.parquet").is_file()


def test_inline_json_round_trips():
    value = {"text": PAYLOAD, "unicode": "Straße ✓"}
    encoded = report.inline_json(value)
    assert "<" not in encoded and ">" not in encoded and "&" not in encoded
    assert json.loads(encoded) == value


def test_disagreement_and_label_flags_reach_the_page(sample_files, tmp_path):
    files, captions, annotations, root, images = sample_files
    records = errors.build_records_from_files(files, captions, annotations, root)
    data = report.report_data(records, root)
    by_name = {image["name"]: image for image in data["images"]}
    first = images[0].rsplit("/", 1)[-1]
    assert by_name[first]["disagree"]  # A wrote the payload, B "Sidewalk: left."
    assert not any(image["disagree"] for name, image in by_name.items() if name != first)
    wrong_left = [r for r in records if r["model"] == "A" and r["image"] != first
                  and r["truth"]["fields"]["sidewalk_pos"] != "left"]
    assert wrong_left and all(by_name[r["image"]]["suspect"] for r in wrong_left)  # both say left, the label not
    assert data["summary"][0]["model"] == "A" and data["truthSpoken"]["scenes with hazards"] >= 1


def test_cards_html_escapes_everything(sample_files):
    files, captions, annotations, root, _ = sample_files
    records = errors.build_records_from_files(files, captions, annotations, root)
    payload = next(r for r in records if r["prediction"]["text"] == PAYLOAD)
    snippet = report.cards_html([payload], root)
    assert "<img src=x" not in snippet and "<script>" not in snippet
    assert "&lt;img src=x onerror=alert(2)&gt;" in snippet and snippet.count("<img ") == 1


def test_prediction_labels(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    labels = report.prediction_labels(["runs/m/zero_shot/preds_test.jsonl", "runs/m/sft/eval/preds_test.jsonl"])
    assert list(labels) == ["zero_shot", "sft/eval"]
    assert labels["zero_shot"] == tmp_path / "runs/m/zero_shot/preds_test.jsonl"
    assert list(report.prediction_labels(["SFT=x/preds.jsonl", "zero-shot=y/preds.jsonl"])) == ["SFT", "zero-shot"]
    assert list(report.prediction_labels(["runs/m/zero_shot/preds_test.jsonl"])) == ["zero_shot"]
    with pytest.raises(ValueError, match="both labelled 'A'"):
        report.prediction_labels(["A=x.jsonl", "A=y.jsonl"])


def test_cli_writes_the_report(tmp_path, sample_files, monkeypatch, capsys):
    files, captions, annotations, root, _ = sample_files
    monkeypatch.chdir(tmp_path)
    code = bvip_main(["report", "--predictions", f"A={files['A']}", "b.jsonl", "--captions_csv", str(captions),
                      "--annotations_csv", str(annotations), "--image_root", str(root), "--out", "out"])
    assert code == 0
    assert "report written to" in capsys.readouterr().out
    assert _page_data((tmp_path / "out" / "index.html").read_text())["models"] == ["A", "b"]


@pytest.mark.parametrize("change, message", [
    ({"image_root": "nowhere"}, r"image not found: testing/images/\d+\.jpg under .*nowhere"),
    ({"predictions": "missing.jsonl"}, r"predictions file of '[^']+' not found: .*missing.jsonl"),
    ({"split": "nosuch"}, r"no ground-truth rows for split 'nosuch'"),
    ({"captions_csv": "none.csv"}, r"captions file not found: .*none.csv"),
    ({"bad_line": True}, r"b.jsonl: line 2 is not a JSON object"),
])
def test_cli_errors_are_one_line(tmp_path, sample_files, monkeypatch, capsys, change, message):
    files, captions, annotations, root, _ = sample_files
    monkeypatch.chdir(tmp_path)
    if change.get("bad_line"):
        files["B"].write_text(files["B"].read_text().replace("\n", "\n{oops\n", 1))
    argv = ["report", "--predictions", change.get("predictions", str(files["B"])),
            "--captions_csv", change.get("captions_csv", str(captions)), "--annotations_csv", str(annotations),
            "--image_root", change.get("image_root", str(root)), "--out", "out", "--split", change.get("split", "test")]
    assert bvip_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("bvip report: error: ") and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err
    assert not (tmp_path / "out" / "index.html").exists()


def test_an_unreadable_image_stops_the_report_or_its_cards_say_so(tmp_path, sample_files, monkeypatch, capsys):
    import shutil

    files, captions, annotations, root, images = sample_files
    copy = Path(shutil.copytree(root, tmp_path / "root"))
    (copy / images[1]).write_bytes(b"not a JPEG")  # a corrupt file
    (copy / images[2]).unlink()  # a missing one
    monkeypatch.chdir(tmp_path)
    argv = ["report", "--predictions", str(files["A"]), "--captions_csv", str(captions), "--annotations_csv",
            str(annotations), "--image_root", str(copy), "--out", "out"]
    assert bvip_main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--skip_bad_images" in err and not (tmp_path / "out").exists()
    assert bvip_main([*argv, "--skip_bad_images"]) == 0
    assert "2 image(s) missing or unreadable" in capsys.readouterr().err
    data = _page_data((tmp_path / "out" / "index.html").read_text())
    by_path = {image["path"]: image for image in data["images"]}
    assert data["unreadableImages"] == 2 and by_path[images[1]]["thumb"] is None and by_path[images[2]]["thumb"] is None
    assert "corrupt" in by_path[images[1]]["unreadable"] and "not found" in by_path[images[2]]["unreadable"]
    assert by_path[images[0]]["thumb"].startswith("data:image/jpeg;base64,")  # the others keep their pictures


# --- notebook 06, headless --------------------------------------------------------------


def _run_notebook_06(root, monkeypatch, tmp_path):
    """Notebook 06 in smoke mode through papermill, with ``root`` as the repository root (``BVIP_ROOT``)."""
    papermill = pytest.importorskip("papermill")
    from bvip_helpers.io import repo_root

    notebook = repo_root() / "notebooks" / "06_error_gallery.ipynb"
    (root / "data").symlink_to(repo_root() / "data", target_is_directory=True)
    figures = tmp_path / "figures"
    for name, value in {"BVIP_SMOKE": "1", "BVIP_ROOT": str(root), "BVIP_FIGURES_DIR": str(figures)}.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "06_out.ipynb"
    papermill.execute_notebook(str(notebook), str(out), cwd=str(notebook.parent), kernel_name="python3",
                               progress_bar=False)
    executed = json.loads(out.read_text())
    text = "".join("".join(o.get("text", "")) for c in executed["cells"] for o in c.get("outputs", []))
    return executed, text, figures


@pytest.mark.slow
def test_notebook_06_smoke_run_writes_the_figures_and_the_report(tmp_path, monkeypatch, sample_dir):
    root = tmp_path / "root"
    test_rows = pd.read_csv(sample_dir / "complete_captions_sensation.csv").query("split == 'test'")
    runs = root / "runs" / "smoke" / "tiny-qwen2-vl-base"
    for folder, text in (("zero_shot", "The sidewalk is ahead."),
                         ("sft/eval", "Sidewalk: left. Road: right. RoadVsSidewalk: right_of.\nNearby: a person close "
                                      "on the left.")):
        (runs / folder).mkdir(parents=True)
        _write_predictions(runs / folder / "preds_test.jsonl", test_rows["image_path"], lambda i, p, t=text: t)
    executed, text, figures = _run_notebook_06(root, monkeypatch, tmp_path)
    assert "skipped zero-shot + constrained" in text  # its file is absent: a note, not an error
    assert {p.name for p in figures.glob("06_*.png")} == {"06_errors_by_type.png", "06_failing_images.png",
                                                         "06_errors_by_scene.png", "06_spoken_order.png"}
    gallery = root / "runs" / "smoke" / "error_gallery"
    assert _page_data((gallery / "index.html").read_text())["models"] == ["zero-shot", "SFT"]
    assert len((gallery / "errors.jsonl").read_text().splitlines()) == 2 * len(test_rows)
    widgets = json.dumps(executed["metadata"].get("widgets", {}))
    assert len(widgets) < 100_000, f"the widget state stored in the notebook is {len(widgets)} bytes"


@pytest.mark.slow
def test_notebook_06_without_predictions_shows_stand_ins(tmp_path, monkeypatch):
    root = tmp_path / "root"
    root.mkdir()
    _, text, figures = _run_notebook_06(root, monkeypatch, tmp_path)
    assert "No prediction file found: run notebook 05 first" in text
    page = root / "runs" / "smoke" / "error_gallery" / "index.html"
    assert _page_data(page.read_text())["models"] == ["original caption", "majority class"]
    assert (figures / "06_spoken_order.png").is_file()
