"""Per-sample error records: what each model got wrong on each image, ranked by danger to a pedestrian.

One record per (model, image) of the scored split holds the ground truth (fields, close and far objects
with their sides), the prediction and its parsed sections, the typed errors, the record's severity and
its **spoken order**. The records use the evaluator's own parsing and pairing
(:func:`bvip_helpers.evaluate.compare_objects`, the same field patterns), so they add up to its figures:

- ``critical_miss`` records = ``structured.critical_misses``; ``hallucinated_close`` =
  ``structured.hallucinated_objects``; ``far_missed`` / ``far_hallucinated`` = ``far_objects.fn`` / ``fp``;
- per field, ``n`` minus its ``field_missing``, ``field_flipped`` and ``field_wrong`` records = the correct
  predictions behind ``accuracy``;
- ``wrong_count`` records = matched near pairs with another count; ``wrong_side`` plus ``wrong_count`` =
  matched near pairs with other positions (``count_accuracy``, ``position_accuracy``);
- ``section_order`` and ``relation_inconsistent`` records = the images failing ``section_order_ok`` and
  ``relation_consistency``.

**Severity** (:data:`SEVERITY`, the one place it is defined) ranks errors by what they do to a blind
pedestrian who acts on the caption: a close person, car or bicycle that is not named, and a sidewalk or
road on the wrong side, come first; a missed far sign comes last. A record's severity is the sum over
its errors, so a caption with a critical miss outranks one with a wrong count.

**Spoken order**: a priority caption exists so that the hazard is heard first. For every image with
close objects, :func:`spoken_order` counts the words a listener hears before the first close object of
the ground truth that the caption names in ``Nearby:``, and before the last of them (``None`` while one
is never named); at :data:`WORDS_PER_MINUTE` words a minute that is seconds. The ground-truth priority
caption gets the same figures, as the reference.

Records are written as JSONL (:func:`save_records`), and as Parquet when pyarrow is importable.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from bvip_helpers import evaluate, runs, schema
from bvip_helpers.io import ImagePathError, atomic_path, safe_image_path, write_jsonl

#: Danger to a pedestrian acting on the caption, per error type; a record's severity sums its errors.
SEVERITY: dict[str, int] = {
    "critical_miss": 100,  # a close person, car or bicycle not named: nothing warns of it
    "field_flipped": 90,  # Sidewalk, Road or RoadVsSidewalk on the opposite side: walks toward the road
    "missed_close": 60,  # a close obstacle, traffic sign or traffic light not named
    "field_missing": 50,  # no direction at all for that field
    "wrong_side": 40,  # a close object named, on another side
    "field_wrong": 40,  # another wrong value (center for left, front for right, unknown...)
    "hallucinated_close": 25,  # a close object that is not there: a false alarm, trust erodes
    "wrong_count": 20,  # a close class named with another number of objects
    "relation_inconsistent": 15,  # RoadVsSidewalk contradicts the caption's own Sidewalk and Road
    "section_order": 10,  # sections out of order: the hazards come later than the format promises
    "far_missed": 5,  # a far object not named
    "far_hallucinated": 3,  # a far object that is not there
    "no_prediction": 0,  # no caption for the image: counted through the errors it causes
}
#: Error types in order of danger (the order the report and the figures list them in).
ERROR_TYPES: tuple[str, ...] = tuple(sorted(SEVERITY, key=lambda t: -SEVERITY[t]))
#: A caption read aloud at this pace (words a minute) turns words into seconds.
WORDS_PER_MINUTE = 150
_OPPOSITES = ({"left", "right"}, {"left_of", "right_of"})
_WHY_LIMIT = 90  # characters of a section quoted in an error's one-line why


def _positions(positions: Sequence[str]) -> str:
    return ", ".join(positions) if positions else "nothing"


def _count(obj: schema.ObjectClass, positions: Sequence[str]) -> str:
    return f"{len(positions)} {obj.name if len(positions) == 1 else obj.plural}"


def _quote(section: str | None, name: str) -> str:
    """``Nearby: <text>`` shortened, or ``no Nearby section``."""
    if section is None:
        return f"no {name} section"
    text = " ".join(section.split())
    text = text if len(text) <= _WHY_LIMIT else text[: _WHY_LIMIT - 1] + "…"
    return f"{name}: {text or '(empty)'}"


def _error(kind: str, *, field: str | None = None, obj: str | None = None, expected: Any = None,
           predicted: Any = None, why: str) -> dict[str, Any]:
    return {"type": kind, "severity": SEVERITY[kind], "field": field, "object": obj,
            "expected": expected, "predicted": predicted, "why": why}


def field_errors(truth: Mapping[str, str], predicted: Mapping[str, str | None]) -> list[dict[str, Any]]:
    """Missing, flipped (left for right) or otherwise wrong mandatory fields, as the evaluator's accuracy counts them."""
    errors = []
    for key, label in schema.FIELD_LABELS.items():
        expected, said = truth[key], predicted.get(key)
        if said == expected:
            continue
        if said is None:
            errors.append(_error("field_missing", field=key, expected=expected,
                                 why=f"truth: {label} {expected}; caption: no {label} field"))
        else:
            kind = "field_flipped" if {expected, said} in _OPPOSITES else "field_wrong"
            errors.append(_error(kind, field=key, expected=expected, predicted=said,
                                 why=f"truth: {label} {expected}; caption: {label} {said}"))
    return errors


def object_errors(near: Sequence[evaluate.ObjectPair], far: Sequence[evaluate.ObjectPair],
                  caption: schema.ParsedCaption, truth_far: Mapping[str, Sequence[str]]) -> list[dict[str, Any]]:
    """Missed, invented, wrong-side and wrong-count close objects; missed and invented far ones."""
    nearby, far_text = _quote(caption.sections.get("nearby"), "Nearby"), _quote(caption.sections.get("far"), "Far")
    errors = []
    for pair in near:
        obj = schema.OBJECTS_BY_NAME[pair.name]
        truth = f"truth: {pair.name} close {_positions(pair.truth)}"
        if pair.missed:
            errors.append(_error("critical_miss" if obj.critical else "missed_close", obj=pair.name,
                                 expected=list(pair.truth), why=f"{truth}; {nearby}"))
        elif pair.invented:
            elsewhere = f" ({pair.name} far {_positions(truth_far[pair.name])})" if truth_far.get(pair.name) else ""
            errors.append(_error("hallucinated_close", obj=pair.name, predicted=list(pair.said),
                                 why=f"truth: no {pair.name} close{elsewhere}; {nearby}"))
        elif not pair.same_count:
            errors.append(_error("wrong_count", obj=pair.name, expected=list(pair.truth), predicted=list(pair.said),
                                 why=f"truth: {_count(obj, pair.truth)} close ({_positions(pair.truth)}); "
                                     f"caption: {_count(obj, pair.said)} ({_positions(pair.said)})"))
        elif not pair.same_positions:
            errors.append(_error("wrong_side", obj=pair.name, expected=list(pair.truth), predicted=list(pair.said),
                                 why=f"{truth}; caption: {pair.name} close {_positions(pair.said)}"))
    for pair in far:
        if pair.missed:
            errors.append(_error("far_missed", obj=pair.name, expected=list(pair.truth),
                                 why=f"truth: {pair.name} far {_positions(pair.truth)}; {far_text}"))
        elif pair.invented:
            errors.append(_error("far_hallucinated", obj=pair.name, predicted=list(pair.said),
                                 why=f"truth: no {pair.name} far; {far_text}"))
    return errors


def format_errors(caption: schema.ParsedCaption, fields: Mapping[str, str | None]) -> list[dict[str, Any]]:
    """Sections out of order, and a RoadVsSidewalk that contradicts the caption's own Sidewalk and Road."""
    errors = []
    if caption.section_order not in evaluate.ALLOWED_SECTION_ORDERS:
        order = ", ".join(caption.section_order) or "no sections"
        errors.append(_error("section_order", predicted=list(caption.section_order),
                             why=f"order: {order}; expected: fields, nearby[, far][, context]"))
    if all(fields.get(key) for key in schema.FIELD_LABELS):
        derived = schema.derive_relation(fields["sidewalk_pos"], fields["road_pos"])
        if derived != fields["road_vs_sidewalk"]:
            errors.append(_error("relation_inconsistent", field="road_vs_sidewalk", expected=derived,
                                 predicted=fields["road_vs_sidewalk"],
                                 why=f"Sidewalk {fields['sidewalk_pos']} and Road {fields['road_pos']} make "
                                     f"{derived}; caption: RoadVsSidewalk {fields['road_vs_sidewalk']}"))
    return errors


def caption_errors(caption: schema.ParsedCaption, said: Mapping[str, str | None],
                   truth: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The typed errors of one parsed caption (its fields ``said``) against one image's ``truth``
    (``fields``, ``near`` and ``far``, as the records hold them)."""
    near = evaluate.compare_objects(truth["near"], caption.near)
    far = evaluate.compare_objects(truth["far"], caption.far)
    return (field_errors(truth["fields"], said) + object_errors(near, far, caption, truth["far"])
            + format_errors(caption, said))


def severity_of(text: str, truth: Mapping[str, Any]) -> int:
    """The severity one caption gets against ``truth`` (see :func:`caption_errors`): 0 is a safe caption.
    The judge of model-ranked DPO pairs (:mod:`bvip_helpers.pairs`)."""
    said = evaluate.extract_fields(pd.Series([text], dtype=object)).iloc[0]
    fields = {key: (None if pd.isna(said[key]) else said[key]) for key in schema.FIELD_LABELS}
    return sum(e["severity"] for e in caption_errors(schema.parse_caption(text), fields, truth))


def spoken_order(text: str, caption: schema.ParsedCaption, hazards: Iterable[str]) -> dict[str, Any]:
    """Words (and seconds at :data:`WORDS_PER_MINUTE`) a listener hears before the first and the last close hazard.

    ``hazards`` are the close classes of the ground truth; a hazard is heard where ``Nearby:`` first names its
    class. ``words_to_last`` is ``None`` while a hazard is never named; both are ``None`` without hazards.
    """
    hazards = set(hazards)
    first_heard: dict[str, int] = {}
    start = caption.section_starts.get("nearby")
    if start is not None:
        for mention in schema.object_mentions(caption.sections["nearby"]):
            if mention.name in hazards:
                first_heard.setdefault(mention.name, start + mention.start)
    words = sorted(len(text[:offset].split()) for offset in first_heard.values())
    to_first = words[0] if words else None
    to_last = words[-1] if words and len(words) == len(hazards) else None
    return {"hazards": len(hazards), "heard": len(words), "words_to_first": to_first, "words_to_last": to_last,
            "seconds_to_first": seconds(to_first), "seconds_to_last": seconds(to_last)}


def seconds(words: float | None) -> float | None:
    """Reading time of ``words`` words at :data:`WORDS_PER_MINUTE`."""
    return None if words is None else round(words * 60 / WORDS_PER_MINUTE, 2)


def _as_lists(objects: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    return {name: list(positions) for name, positions in objects.items()}


def build_records(predictions: Mapping[str, Iterable[Mapping[str, Any]] | pd.DataFrame], ground_truth: pd.DataFrame,
                  split: str = "test") -> list[dict[str, Any]]:
    """One error record per (model, image): ``predictions`` maps a model label to its prediction records.

    The images are those of ``split`` that at least one model captioned (:func:`bvip_helpers.runs.scored_truth`,
    as notebook 05 scores them); an image another model left out is a ``no_prediction`` record of that model.
    Records come sorted by model, then by severity (worst first), then image. Images every model gets wrong
    the same way are flagged by :func:`flag_label_errors`.
    """
    frames = {label: evaluate.predictions_frame(preds) for label, preds in predictions.items()}
    captioned = [{"image": image} for frame in frames.values() for image in frame["image"]]
    rows = evaluate.split_rows(runs.scored_truth(ground_truth, split, captioned), split)
    gt_near = {o.name: evaluate.cell_positions(rows, o.near_column) for o in schema.OBJECT_CLASSES}
    gt_far = {o.name: evaluate.cell_positions(rows, o.far_column) for o in schema.OBJECT_CLASSES}
    truth = []
    responses = rows["response"].fillna("").astype(str) if "response" in rows else pd.Series("", index=rows.index)
    for row, (reference, response) in enumerate(zip(evaluate.parse_texts(responses), responses, strict=True)):
        near, far = evaluate.truth_objects(gt_near, row), evaluate.truth_objects(gt_far, row)
        truth.append({"fields": {key: str(rows.at[row, key]) for key in schema.FIELD_LABELS},
                      "near": _as_lists(near), "far": _as_lists(far), "caption": response,
                      "original": str(rows.at[row, "target"]) if "target" in rows else "",
                      "spoken": spoken_order(response, reference, near)})

    records = []
    for label, frame in frames.items():
        texts, _ = evaluate.match_predictions(frame, rows["image"])
        present = rows["image"].isin(set(frame["image"])).to_numpy()
        fields = evaluate.extract_fields(texts)
        for row, (text, caption) in enumerate(zip(texts, evaluate.parse_texts(texts), strict=True)):
            said = {key: fields.at[row, key] for key in schema.FIELD_LABELS}
            errors = [] if present[row] else [_error("no_prediction", why="no caption for this image")]
            errors += caption_errors(caption, said, truth[row])
            close = len(truth[row]["near"])
            records.append({
                "model": label, "image": rows.at[row, "image"], "image_path": str(rows.at[row, "image_path"]),
                "split": split, "truth": truth[row],
                "prediction": {"text": text if present[row] else None, "fields": said,
                               "near": _as_lists(caption.near), "far": _as_lists(caption.far),
                               "sections": dict(caption.sections), "section_order": list(caption.section_order)},
                "errors": errors, "n_errors": len(errors), "severity": sum(e["severity"] for e in errors),
                "crowding": evaluate.crowding_group(close) or "0", "close_classes": close,
                "spoken": spoken_order(text, caption, truth[row]["near"]),
                "label_suspect": [],
            })
    records.sort(key=lambda r: (list(frames).index(r["model"]), -r["severity"], r["image"]))
    flag_label_errors(records)
    return records


def _agreement(claims: list[Any]) -> Any:
    """The one claim every model makes (``None`` unless all agree on a non-empty claim)."""
    return claims[0] if claims and claims[0] and all(c == claims[0] for c in claims) else None


def flag_label_errors(records: list[dict[str, Any]]) -> None:
    """Set ``label_suspect`` on each record: what every model (two or more) says alike against the annotation.

    Only positive, specific claims count (the same wrong field value, the same invented close class, the
    same other sides of a found class); models that all omit something agree on nothing.
    """
    by_image: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_image.setdefault(record["image"], []).append(record)
    for group in by_image.values():
        for record in group:
            record["label_suspect"] = []
        if len(group) < 2 or any(r["prediction"]["text"] is None for r in group):
            continue
        truth, reasons = group[0]["truth"], []
        for key, label in schema.FIELD_LABELS.items():
            value = _agreement([r["prediction"]["fields"][key] for r in group])
            if value and value != truth["fields"][key]:
                reasons.append(f"all {len(group)} models say {label} {value} (annotation: {truth['fields'][key]})")
        for obj in schema.OBJECT_CLASSES:
            said = _agreement([sorted(r["prediction"]["near"].get(obj.name, [])) for r in group])
            expected = sorted(truth["near"].get(obj.name, []))
            if said and not expected:
                reasons.append(f"all {len(group)} models name a {obj.name} close (not annotated close)")
            elif said and expected and Counter(said) != Counter(expected):
                reasons.append(f"all {len(group)} models put the {obj.name} {_positions(said)} "
                               f"(annotation: {_positions(expected)})")
        for record in group:
            record["label_suspect"] = list(reasons)


def build_records_from_files(prediction_files: Mapping[str, str | os.PathLike[str]], captions_csv: str | os.PathLike[str],
                             annotations_csv: str | os.PathLike[str], image_root: str | os.PathLike[str],
                             split: str = "test", *, skip_bad_lines: bool = False,
                             require_images: bool = True) -> list[dict[str, Any]]:
    """:func:`build_records` from prediction JSONL files (label -> path) and the two CSVs.

    Every image of the records must lie under ``image_root``: a missing one raises
    :class:`~bvip_helpers.io.ImagePathError` naming it, rather than leaving a card without its picture
    (``require_images=False``: the report's ``--skip_bad_images`` says so on the card instead).
    """
    from bvip_helpers.dataset import load_ground_truth  # the builder owns the ground-truth rules

    predictions = {label: evaluate.read_predictions(path, skip_bad_lines=skip_bad_lines)[0]
                   for label, path in prediction_files.items()}
    records = build_records(predictions, load_ground_truth(captions_csv, annotations_csv), split)
    if require_images:
        check_images(records, image_root, captions_csv)
    return records


def check_images(records: Iterable[Mapping[str, Any]], image_root: str | os.PathLike[str],
                 captions_csv: str | os.PathLike[str] = "the captions CSV") -> None:
    """Raise :class:`~bvip_helpers.io.ImagePathError` naming the first image of ``records`` missing under ``image_root``."""
    for path in dict.fromkeys(r["image_path"] for r in records):
        if not safe_image_path(image_root, path).is_file():
            raise ImagePathError(f"image not found: {path} under {image_root} (named in {captions_csv}); "
                                 "pass the folder the captions CSV's image paths are relative to as the image root")


def filter_records(records: Iterable[Mapping[str, Any]], *, models: Iterable[str] = (), types: Iterable[str] = (),
                   classes: Iterable[str] = ()) -> list[Mapping[str, Any]]:
    """The records of ``models`` with an error of one of ``types`` about one of ``classes`` (empty: any), worst first.

    The report's facets filter the same way: values of one facet are alternatives, facets combine.
    """
    models, types, classes = set(models), set(types), set(classes)
    order: dict[str, int] = {}
    kept = []
    for record in records:
        order.setdefault(record["model"], len(order))
        if models and record["model"] not in models:
            continue
        if types and not any(e["type"] in types for e in record["errors"]):
            continue
        if classes and not any(e["object"] in classes for e in record["errors"]):
            continue
        kept.append(record)
    return sorted(kept, key=lambda r: (-r["severity"], r["image"], order[r["model"]]))


# --- tables and files -----------------------------------------------------------


def errors_frame(records: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per error: model, image, type, severity, object, field, and the scene's Sidewalk and crowding."""
    rows = [{"model": r["model"], "image": r["image"], "type": e["type"], "severity": e["severity"],
             "object": e["object"], "field": e["field"], "sidewalk": r["truth"]["fields"]["sidewalk_pos"],
             "close_classes": r["close_classes"], "crowding": r["crowding"]}
            for r in records for e in r["errors"]]
    columns = ["model", "image", "type", "severity", "object", "field", "sidewalk", "close_classes", "crowding"]
    return pd.DataFrame(rows, columns=columns)


def records_frame(records: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per record: model, image, severity, error count, the scene's fields and crowding, spoken order."""
    return pd.DataFrame([{"model": r["model"], "image": r["image"], "severity": r["severity"], "errors": r["n_errors"],
                          **{key: r["truth"]["fields"][key] for key in schema.FIELD_LABELS},
                          "close_classes": r["close_classes"], "crowding": r["crowding"],
                          "words_to_first": r["spoken"]["words_to_first"], "words_to_last": r["spoken"]["words_to_last"]}
                         for r in records])


def _mean(values: Iterable[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def summarize(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per model: images, errors by kind, field accuracy, mean severity and spoken order."""
    rows = []
    for model in dict.fromkeys(r["model"] for r in records):
        mine = [r for r in records if r["model"] == model]
        kinds = Counter(e["type"] for r in mine for e in r["errors"])
        fields_wrong = Counter(e["field"] for r in mine for e in r["errors"]
                               if e["type"] in ("field_missing", "field_flipped", "field_wrong"))
        row: dict[str, Any] = {"model": model, "images": len(mine),
                               "images with errors": sum(bool(r["errors"]) for r in mine),
                               "mean severity": _mean(r["severity"] for r in mine)}
        for key, label in schema.FIELD_LABELS.items():
            row[f"accuracy {label}"] = 1 - fields_wrong[key] / len(mine)
        row.update({"critical misses": kinds["critical_miss"], "flipped fields": kinds["field_flipped"],
                    "hallucinated close": kinds["hallucinated_close"], "wrong sides": kinds["wrong_side"]})
        row.update(spoken_summary(r["spoken"] for r in mine))
        rows.append(row)
    return pd.DataFrame(rows)


def spoken_summary(spoken: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean words and seconds before the first and the last close hazard, over the scenes that have hazards."""
    with_hazards = [s for s in spoken if s["hazards"]]
    to_first = _mean(s["words_to_first"] for s in with_hazards)
    to_last = _mean(s["words_to_last"] for s in with_hazards)
    return {"scenes with hazards": len(with_hazards),
            "no hazard heard": sum(s["words_to_first"] is None for s in with_hazards),
            "words to first hazard": to_first, "seconds to first hazard": seconds(to_first),
            "words to last hazard": to_last, "seconds to last hazard": seconds(to_last)}


def truth_spoken_summary(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """:func:`spoken_summary` of the ground-truth priority captions of the records' images (each image once)."""
    return spoken_summary({r["image"]: r["truth"]["spoken"] for r in records}.values())


def spoken_order_table(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Spoken order per model, with the ground-truth priority caption of the same images as the reference."""
    rows = [{"model": model, **spoken_summary(r["spoken"] for r in records if r["model"] == model)}
            for model in dict.fromkeys(r["model"] for r in records)]
    rows.append({"model": "priority caption (truth)", **truth_spoken_summary(records)})
    return pd.DataFrame(rows)


def save_records(records: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> list[Path]:
    """Write ``path`` (JSONL) and, when pyarrow is importable, the same records beside it as ``.parquet``.

    Parquet keeps the scalar columns as they are and the nested ones (truth, prediction, errors...) as JSON text.
    """
    path = Path(path)
    write_jsonl(path, records)
    written = [path]
    if importlib.util.find_spec("pyarrow") is not None:
        frame = pd.DataFrame(list(records))
        for column in frame.columns:
            if frame[column].map(lambda v: isinstance(v, (dict, list))).any():
                frame[column] = frame[column].map(lambda v: json.dumps(v, ensure_ascii=False))
        parquet = path.with_suffix(".parquet")
        with atomic_path(parquet) as tmp:
            frame.to_parquet(tmp, index=False)
        written.append(parquet)
    return written
