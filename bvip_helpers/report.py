"""``bvip report``: the error gallery as one self-contained HTML file that opens from disk.

    bvip report --predictions zero-shot=a.jsonl SFT=b.jsonl --captions_csv C --annotations_csv A \\
        --image_root R --out report/

``report/index.html`` holds everything: the error records (:mod:`bvip_helpers.errors`) as JSON in a
``<script type="application/json">`` block (``<``, ``>`` and ``&`` written as ``\\u003c`` escapes, so no
caption can close the block), one thumbnail per image as a data URI, and the CSS and plain JavaScript of
``bvip_helpers/report_assets/``. A Content-Security-Policy allows nothing but that inline code and
``data:`` images, so the page makes no network request at all. The script builds every element with
``textContent``, never from markup, so a caption cannot inject HTML or script.

The page shows the per-model summary, then the cards sorted by severity (worst first) with facet
filters (model, error type, object class, field, crowding, flags) kept in the URL hash, in pages; and a
side-by-side view with one row per image and a column per model. ``report/errors.jsonl`` (and
``errors.parquet``) hold the same records for other tools.

:func:`cards_html` renders a few cards as plain HTML for notebook 06's widgets.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import html
import io as _bytes_io
import json
import math
import os
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from bvip_helpers import errors, schema
from bvip_helpers.io import ImagePathError, JsonlError, load_image, safe_image_path, write_text_atomic

#: Longest side of the inline thumbnails in pixels, and their JPEG quality: small enough for 5,000 images.
THUMB_SIZE = 240
THUMB_QUALITY = 70
#: Cards per page in the HTML report (the reader can change it; ``size=`` in the URL hash).
PAGE_SIZE = 24
_ASSETS = "report_assets"
#: Short labels of the error types, as the chips and the facets show them.
TYPE_LABELS = {
    "critical_miss": "critical miss", "field_flipped": "flipped field", "missed_close": "missed close object",
    "field_missing": "missing field", "wrong_side": "wrong side", "field_wrong": "wrong field",
    "hallucinated_close": "invented close object", "wrong_count": "wrong count",
    "relation_inconsistent": "RoadVsSidewalk inconsistent", "section_order": "section order",
    "far_missed": "missed far object", "far_hallucinated": "invented far object", "no_prediction": "no prediction",
}


def thumbnail_uri(image_root: str | os.PathLike[str], image_path: str, size: int = THUMB_SIZE,
                  quality: int = THUMB_QUALITY) -> str:
    """The image as a JPEG data URI, its longest side at most ``size`` pixels (missing image: ImagePathError)."""
    image = load_image(safe_image_path(image_root, image_path))
    image.thumbnail((size, size))
    buffer = _bytes_io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _plain(value: Any) -> Any:
    """NaN as ``None``, numpy scalars as Python numbers: what JSON can hold."""
    if hasattr(value, "item"):
        value = value.item()
    return None if isinstance(value, float) and math.isnan(value) else value


def _claims(record: Mapping[str, Any]) -> str:
    """What a prediction claims (fields and close objects), to tell whether models disagree."""
    prediction = record["prediction"]
    return json.dumps([prediction["fields"], {k: sorted(v) for k, v in prediction["near"].items()}], sort_keys=True)


def _thumbnail_or_why(image_root: str | os.PathLike[str], image_path: str, thumb_size: int,
                      skip_bad_images: bool) -> tuple[str | None, str | None]:
    """``(data URI, None)``, or with ``skip_bad_images`` ``(None, why)`` for a missing or unreadable image."""
    try:
        return thumbnail_uri(image_root, image_path, thumb_size), None
    except ImagePathError as err:
        if not skip_bad_images:
            raise ImagePathError(f"{err}; fix it or --image_root, or pass --skip_bad_images to show its cards "
                                 "without a picture") from err
        return None, str(err)


def report_data(records: Sequence[Mapping[str, Any]], image_root: str | os.PathLike[str], *, title: str = "",
                thumb_size: int = THUMB_SIZE, skip_bad_images: bool = False) -> dict[str, Any]:
    """Everything the page shows, as one JSON-ready dict: models, summary, images (truth, thumbnail), records.

    A missing or unreadable image stops it (:class:`ImagePathError`), unless ``skip_bad_images``: then its
    cards say why there is no picture (never another picture in its place), and ``unreadableImages`` counts them.
    """
    models = list(dict.fromkeys(r["model"] for r in records))
    images: dict[str, dict[str, Any]] = {}
    claims: dict[str, set[str]] = {}
    for record in records:
        claims.setdefault(record["image"], set()).add(_claims(record))
        if record["image"] not in images:
            thumb, why = _thumbnail_or_why(image_root, record["image_path"], thumb_size, skip_bad_images)
            images[record["image"]] = {"name": record["image"], "path": record["image_path"], "thumb": thumb,
                                       "unreadable": why, "truth": record["truth"],
                                       "suspect": record["label_suspect"], "crowding": record["crowding"]}
    for name, image in images.items():
        image["disagree"] = len(claims[name]) > 1
    index = {name: i for i, name in enumerate(images)}
    summary = errors.summarize(records)
    truth_spoken = errors.truth_spoken_summary(records)
    return {
        "title": title or "BVIP error gallery",
        "split": records[0]["split"] if records else "",
        "models": models,
        "types": [{"key": t, "label": TYPE_LABELS[t], "severity": errors.SEVERITY[t]} for t in errors.ERROR_TYPES],
        "fields": dict(schema.FIELD_LABELS),
        "classes": [o.name for o in schema.OBJECT_CLASSES],
        "wordsPerMinute": errors.WORDS_PER_MINUTE,
        "pageSize": PAGE_SIZE,
        "summary": [{k: _plain(v) for k, v in row.items()} for row in summary.to_dict("records")],
        "truthSpoken": {k: _plain(v) for k, v in truth_spoken.items()},  # the reference column of the summary
        "images": list(images.values()),
        "unreadableImages": sum(image["thumb"] is None for image in images.values()),
        "records": [{"model": models.index(r["model"]), "image": index[r["image"]], "severity": r["severity"],
                     "errors": r["errors"], "prediction": r["prediction"], "spoken": r["spoken"]} for r in records],
    }


def inline_json(data: Any) -> str:
    """JSON that is safe inside ``<script type="application/json">``: no ``<``, ``>`` or ``&`` left as such."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _asset(name: str) -> str:
    return resources.files("bvip_helpers").joinpath(_ASSETS, name).read_text(encoding="utf-8")


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def render_html(data: Mapping[str, Any]) -> str:
    """The page: the template with the CSS, the data and the script inlined, under a CSP that allows only them."""
    css, script = _asset("report.css"), _asset("report.js")
    policy = (f"default-src 'none'; img-src data:; style-src {_sha256(css)}; script-src {_sha256(script)}; "
              "base-uri 'none'; form-action 'none'")
    values = {"CSP": html.escape(policy), "TITLE": html.escape(data["title"]), "CSS": css,
              "DATA": inline_json(data), "JS": script}
    # One pass: text put in is never searched for markers again (a caption may well contain "__BVIP_JS__").
    return re.sub(r"__BVIP_([A-Z]+)__", lambda m: values[m.group(1)], _asset("report.html"))


def write_report(records: Sequence[Mapping[str, Any]], image_root: str | os.PathLike[str],
                 out_dir: str | os.PathLike[str], *, title: str = "", thumb_size: int = THUMB_SIZE,
                 skip_bad_images: bool = False) -> Path:
    """Write ``<out_dir>/index.html`` (atomically) and the records as ``errors.jsonl`` (and ``.parquet``)."""
    out_dir = Path(out_dir)
    data = report_data(records, image_root, title=title, thumb_size=thumb_size, skip_bad_images=skip_bad_images)
    if data["unreadableImages"]:
        print(f"report: {data['unreadableImages']} image(s) missing or unreadable, their cards say so: "
              + "; ".join(i["unreadable"] for i in data["images"] if i["unreadable"])[:500], file=sys.stderr)
    page = render_html(data)
    errors.save_records(records, out_dir / "errors.jsonl")
    return write_text_atomic(out_dir / "index.html", page)


def build_report(prediction_files: Mapping[str, str | os.PathLike[str]], captions_csv: str | os.PathLike[str],
                 annotations_csv: str | os.PathLike[str], image_root: str | os.PathLike[str],
                 out_dir: str | os.PathLike[str], split: str = "test", *, title: str = "",
                 skip_bad_lines: bool = False, thumb_size: int = THUMB_SIZE, skip_bad_images: bool = False) -> Path:
    """:func:`errors.build_records_from_files`, then :func:`write_report`; returns the path of ``index.html``."""
    try:
        records = errors.build_records_from_files(prediction_files, captions_csv, annotations_csv, image_root, split,
                                                  skip_bad_lines=skip_bad_lines, require_images=not skip_bad_images)
    except ImagePathError as err:
        raise ImagePathError(f"{err}, or pass --skip_bad_images to show its cards without a picture") from err
    if not records:
        raise ValueError(f"no {split} image of {captions_csv} has a prediction in any of the files; "
                         "check --split and that the files caption that split")
    return write_report(records, image_root, out_dir, title=title, thumb_size=thumb_size,
                        skip_bad_images=skip_bad_images)


def chromium_path() -> str | None:
    """The system Chromium (``BVIP_CHROMIUM``, else ``chromium`` or ``chromium-browser`` on the PATH), or ``None``.

    The browser test and the benchmark drive it with Playwright through ``executable_path``: Playwright cannot
    download its own browser builds here, and ``scripts/setup_browser.sh`` installs Debian's package.
    """
    candidates = [os.environ.get("BVIP_CHROMIUM", ""), "chromium", "chromium-browser"]
    return next((found for name in candidates if name and (found := shutil.which(name))), None)


# --- a few cards as plain HTML (notebook widgets) -----------------------------------


def _objects(objects: Mapping[str, Sequence[str]]) -> str:
    return "; ".join(f"{name} {', '.join(where)}" for name, where in objects.items()) or "nothing"


def cards_html(records: Sequence[Mapping[str, Any]], image_root: str | os.PathLike[str], *, thumb_size: int = 112) -> str:
    """A compact, escaped HTML list of cards: thumbnail, fields truth vs prediction, error chips and whys.

    Small thumbnails on purpose: widget outputs are stored in the executed notebook.
    """
    parts = ['<div style="display:flex;flex-direction:column;gap:6px;font-size:12px">']
    for record in records:
        truth, prediction = record["truth"], record["prediction"]
        fields = " · ".join(f"{label}: {truth['fields'][key]} → {prediction['fields'][key] or 'missing'}"
                            for key, label in schema.FIELD_LABELS.items())
        chips = " ".join(f"<b>[{html.escape(TYPE_LABELS[e['type']])}"
                         f"{' · ' + html.escape(e['object'] or e['field'] or '') if e['object'] or e['field'] else ''}]</b>"
                         for e in record["errors"]) or "<b>[no errors]</b>"
        whys = "<br>".join(html.escape(e["why"]) for e in record["errors"][:4])
        text = prediction["text"] if prediction["text"] is not None else "(no prediction)"
        parts.append(
            '<div style="display:flex;gap:8px;border:1px solid #999;padding:4px">'
            f'<img src="{thumbnail_uri(image_root, record["image_path"], thumb_size, 60)}" '
            f'alt="{html.escape(truth["caption"])}" style="width:{thumb_size}px;height:auto">'
            f'<div><b>{html.escape(record["model"])}</b> · {html.escape(record["image"])} · '
            f'severity {record["severity"]}<br>{chips}<br>{html.escape(fields)}<br>'
            f'truth near: {html.escape(_objects(truth["near"]))} · said: {html.escape(_objects(prediction["near"]))}'
            f'<br><i>{html.escape(text)}</i><br><small>{whys}</small></div></div>')
    parts.append("</div>")
    return "".join(parts)


# --- CLI ---------------------------------------------------------------------------


def prediction_labels(values: Sequence[str]) -> dict[str, Path]:
    """``[LABEL=]PATH`` arguments -> label -> path (paths from the current directory).

    Without a label, a file is named by the folders that tell it from the others (``zero_shot``,
    ``sft/eval``), or by its folder when it is alone.
    """
    from bvip_helpers.io import resolve_cli_path

    pairs: list[tuple[str | None, Path]] = []
    for value in values:
        label, sep, path = value.partition("=")
        if sep and label and "/" not in label and not Path(value).exists():
            pairs.append((label, resolve_cli_path(path)))
        else:
            pairs.append((None, resolve_cli_path(value)))
    parents = [path.parent for _, path in pairs]
    common = Path(os.path.commonpath(parents)) if len(parents) > 1 else None
    named: dict[str, Path] = {}
    for (label, path), parent in zip(pairs, parents, strict=True):
        label = label or (parent.relative_to(common).as_posix() if common and parent != common else "")
        label = label or (parent.name if len(pairs) == 1 else path.stem)
        if label in named:
            raise ValueError(f"two prediction files are both labelled {label!r} ({named[label]} and {path}); "
                             "name them as LABEL=PATH")
        named[label] = path
    return named


def configure_cli(parser: argparse.ArgumentParser) -> None:
    from bvip_helpers.io import resolve_cli_path

    parser.add_argument("--predictions", nargs="+", required=True, metavar="[LABEL=]PATH",
                        help="one predictions JSONL per model (notebook 05's preds_<split>.jsonl), each optionally "
                             "named, e.g. zero-shot=runs/m/zero_shot/preds_test.jsonl")
    parser.add_argument("--captions_csv", type=resolve_cli_path, required=True,
                        help="the SENSATION captions CSV (image_path, target, split)")
    parser.add_argument("--annotations_csv", type=resolve_cli_path, required=True,
                        help="the SENSATION annotations CSV (image, sidewalk_pos, road_pos, object columns)")
    parser.add_argument("--image_root", type=resolve_cli_path, required=True,
                        help="folder the captions CSV's image paths are relative to")
    parser.add_argument("--out", type=resolve_cli_path, required=True,
                        help="folder for index.html and errors.jsonl/.parquet (created; files replaced atomically)")
    parser.add_argument("--split", default="test", help="the split the predictions caption (default: test)")
    parser.add_argument("--title", default="", help="page title (default: BVIP error gallery)")
    parser.add_argument("--thumb_size", type=int, default=THUMB_SIZE,
                        help=f"longest side of the inline thumbnails in pixels (default: {THUMB_SIZE})")
    parser.add_argument("--skip_bad_lines", action="store_true", help="count and skip malformed prediction lines")
    parser.add_argument("--skip_bad_images", action="store_true",
                        help="a missing or unreadable image: its cards say so instead of stopping the report")


def run_cli(args: argparse.Namespace) -> int:
    try:
        files = prediction_labels(args.predictions)
        for label, path in files.items():
            if not path.is_file():
                raise FileNotFoundError(f"predictions file of {label!r} not found: {path}")
        page = build_report(files, args.captions_csv, args.annotations_csv, args.image_root, args.out, args.split,
                            title=args.title, skip_bad_lines=args.skip_bad_lines, thumb_size=args.thumb_size,
                            skip_bad_images=args.skip_bad_images)
    except (ValueError, FileNotFoundError, ImagePathError, JsonlError) as err:
        print(f"bvip report: error: {err}", file=sys.stderr)
        return 2
    size_mb = page.stat().st_size / 1e6
    print(f"report written to {page} ({size_mb:.1f} MB; open it in a browser, no server needed); "
          f"records in {page.parent / 'errors.jsonl'}; models: {', '.join(files)}")
    return 0
