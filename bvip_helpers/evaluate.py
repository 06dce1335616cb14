"""Score a predictions JSONL against the ground truth: mandatory fields, near objects, baselines.

Two families of metrics, side by side:

* **Seed-compatible** (``presence``, ``accuracy``, ``legacy_objects``): exactly the figures of the
  original ``near_object_and_position_eval.py``, so numbers compare with published ones.

  - *presence*: a field is present when ``Field: value`` appears anywhere in the text,
    case-insensitive (the patterns of :mod:`bvip_helpers.schema`; ``front`` is accepted for
    Sidewalk as well as Road).
  - *accuracy*: the predicted value equals the normalised ground truth. The denominator is
    every image of the split; a missing prediction or a missing field is absent and wrong.
  - *legacy_objects*: keyword proxy. An object is mentioned when any of its keywords
    (:data:`LEGACY_KEYWORDS`) is a substring of the whole lowercased text, so ``sign``
    matches inside ``design``. The ground truth has it when its ``m_*`` cell is not empty,
    NaN, ``none`` or ``not present``.

* **Structured** (``structured``): :func:`bvip_helpers.schema.parse_caption` reads the
  ``Nearby:`` and ``Far:`` sections with word boundaries and synonyms. Definitions, all per
  (image, object class) pair unless said otherwise:

  - *near_objects* / *far_objects*: a pair is a true positive when the ground-truth cell has at
    least one position and the section names the class; recall, precision and F1 per class
    and micro over all classes.
  - *position_accuracy*: over pairs present in both, the fraction whose positions are the
    same multiset (exact match, e.g. ``[left, right]`` vs ``[left, right]``; a position the
    parser could not read counts as ``unknown`` and so as wrong). A close object whose side the
    annotation does not know (``a person close, side unknown`` in the builder's caption) counts as
    found for recall, but its position never counts as right.
    *count_accuracy*: over the same pairs, the fraction with equal object counts.
  - *near_recall_by_crowding*: near recall split by how many close classes the ground-truth
    scene has (``1``, ``2``, ``3+``), with the pairs and the found pairs of each group: does the
    model lose objects in crowded scenes?
  - *hallucinated_objects*: pairs named in ``Nearby:`` that are absent from the ground-truth
    near cells (a class that is only far in the ground truth still counts);
    *hallucination_rate*: the fraction of images with at least one.
  - *critical_misses*: close person, car or bicycle pairs of the ground truth that ``Nearby:``
    does not name; *critical_miss_rate*: misses divided by all such ground-truth pairs.
  - *section_order_ok*: the fraction of images whose parsed section order is mandatory fields,
    Nearby, then optionally Far, then optionally Context (a missing prediction fails).
  - *relation_consistency*: among predictions carrying all three fields, the fraction whose
    RoadVsSidewalk equals :func:`~bvip_helpers.schema.derive_relation` of their Sidewalk and Road.
  - *confusion* / *macro_f1*: rows are ground truth, columns predictions; the labels are the
    field's enum, any other value predicted (``front`` for Sidewalk), then ``missing``.
    Macro-F1 averages the per-label F1 over the labels seen in the ground truth or the
    predictions, ``missing`` excluded as a class (it still counts as a wrong prediction).
  - *baselines*: the majority value per field (computed on the ``train`` rows of the ground
    truth when present, else on the evaluated split; ``computed_on`` says which) and the
    original caption (``target``) used as the prediction. For the original caption,
    ``near_objects`` reads the whole caption as if it were the ``Nearby:`` section (it has no
    sections) and ``legacy_objects`` gives the keyword proxy, both micro over all classes.

Inputs: duplicate predictions for one image keep the **last** line (a resumed run appends
regenerated captions); ``inputs.duplicates`` counts the dropped lines. ``outside_split`` counts
distinct predicted images that are not in the split, ``matched_predictions`` those that are.
:func:`evaluate_files` (``bvip evaluate``) refuses to score when fewer than ``min_matched`` (half) of
the predicted images are in the split: predictions of another split, or names that differ (``.JPG``
against ``.jpg``), would otherwise score 0.000 everywhere without a word. A caption that is not a string
(a number, a list, null) is scored as an empty caption and counted in ``non_string_texts``. Captions are
read through :func:`bvip_helpers.schema.normalize_text` (no-break and other Unicode spaces, fullwidth
colons, zero-width characters), and ``normalised_texts`` counts the captions it changed. Undefined
ratios (0/0) are ``null``.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import schema
from .io import numbered_jsonl, write_json

FIELDS = tuple(schema.FIELD_LABELS)
#: The schema's field patterns (public alias requested from the lead; falls back to the private name).
FIELD_PATTERNS: dict[str, re.Pattern[str]] = schema.FIELD_PATTERNS

#: The seed's keyword proxy: annotation column -> keywords matched as plain substrings.
LEGACY_KEYWORDS: dict[str, tuple[str, ...]] = {
    "m_person": ("person", "pedestrian", "man", "woman", "people"),
    "m_car": ("car", "vehicle", "auto"),
    "m_bicycle": ("bicycle", "bike", "cyclist"),
    "m_obstacle": ("obstacle", "barrier", "cone", "bollard", "block"),
    "m_traffic_sign": ("traffic sign", "sign"),
    "traffic_light": ("traffic light", "trafficlight", "signal"),
}
#: Cells the seed treats as "object absent" (after strip + lowercase), besides NaN.
LEGACY_EMPTY_CELLS = ("", "nan", "none", "not present")
MISSING = "missing"
ALLOWED_SECTION_ORDERS = (
    ["fields", "nearby"],
    ["fields", "nearby", "far"],
    ["fields", "nearby", "context"],
    ["fields", "nearby", "far", "context"],
)
#: Groups of ``near_recall_by_crowding``: scenes with 1, 2, and 3 or more close classes.
CROWDING_GROUPS = ("1", "2", "3+")


# --- small helpers -----------------------------------------------------------


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den else None


def _f1(precision: float | None, recall: float | None) -> float | None:
    if precision is None or recall is None:
        return None
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def _prf(gt: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    """Counts and ratios for boolean arrays of ground-truth presence and predicted mention."""
    tp = int(np.sum(gt & pred))
    fn = int(np.sum(gt & ~pred))
    fp = int(np.sum(~gt & pred))
    recall, precision = _ratio(tp, tp + fn), _ratio(tp, tp + fp)
    return {"gt_present": int(np.sum(gt)), "tp": tp, "fn": fn, "fp": fp,
            "recall": recall, "precision": precision, "f1": _f1(precision, recall)}


def basename(paths: pd.Series) -> pd.Series:
    """Image basenames, for POSIX and Windows separators alike."""
    return paths.astype(str).str.replace(r"^.*[/\\]", "", regex=True)


def extract_fields(texts: pd.Series) -> pd.DataFrame:
    """Predicted field values (lowercased, ``centre`` -> ``center``), ``None`` where absent; vectorised."""
    out = {}
    for key, pattern in FIELD_PATTERNS.items():
        values = texts.str.extract(pattern, expand=False).str.lower().replace({"centre": "center"})
        out[key] = values.astype(object).where(values.notna(), None)
    return pd.DataFrame(out, index=texts.index)


def legacy_mentions(texts: pd.Series) -> dict[str, np.ndarray]:
    """Seed keyword proxy: column -> boolean array 'some keyword is a substring of the lowercased text'."""
    lowered = texts.str.lower()
    return {column: lowered.str.contains("|".join(map(re.escape, keywords)), regex=True).to_numpy(bool)
            for column, keywords in LEGACY_KEYWORDS.items()}


def legacy_gt_present(ground_truth: pd.DataFrame, column: str) -> np.ndarray:
    """Seed rule: the cell is present unless empty, NaN, ``none`` or ``not present``."""
    if column not in ground_truth:
        return np.zeros(len(ground_truth), bool)
    cells = ground_truth[column]
    cleaned = cells.astype("string").str.strip().str.lower()
    return (cells.notna() & ~cleaned.isin(LEGACY_EMPTY_CELLS)).to_numpy(bool)


def cell_positions(ground_truth: pd.DataFrame, column: str) -> list[tuple[str, ...]]:
    """Positions per row from a raw object cell; parsed once per distinct value."""
    if column not in ground_truth:
        return [()] * len(ground_truth)
    cells = ground_truth[column].astype(object).where(ground_truth[column].notna(), "")
    lookup = {value: tuple(schema.parse_object_cell(value)[0]) for value in cells.unique()}
    return [lookup[value] for value in cells]


# --- inputs ---------------------------------------------------------------------


def predictions_frame(predictions: Iterable[Mapping[str, Any]] | pd.DataFrame) -> pd.DataFrame:
    """Predictions as a frame with ``image`` (basename) and ``text``: ``text`` if set, else ``response``.

    A caption that is not a string (a number, a list, null) becomes ``""`` and is flagged in the
    ``non_string`` column; ``normalised`` flags the captions :func:`schema.normalize_text` changed.
    """
    if isinstance(predictions, pd.DataFrame):
        frame = predictions
    else:  # column by column: records may mix 'text' and 'response'; _ABSENT marks a key a record lacks
        records = list(predictions)
        frame = pd.DataFrame({key: [record.get(key, _ABSENT) for record in records]
                              for key in ("image", "text", "response")
                              if not records or any(key in record for record in records)}, dtype=object)
    if "image" not in frame:
        raise ValueError("predictions need an 'image' column/key (the image path or basename)")
    if "text" not in frame and "response" not in frame:
        raise ValueError("predictions need a 'text' or 'response' column/key with the generated caption")
    absent = pd.Series(_ABSENT, index=frame.index, dtype=object)
    text, response = frame.get("text", absent), frame.get("response", absent)
    use_text = text.map(lambda v: isinstance(v, str) and v != "")  # the seed's `text or response`
    chosen = text.where(use_text, response.where(response.map(lambda v: v is not _ABSENT), text))
    given = chosen.map(lambda v: v is not _ABSENT and not (isinstance(v, float) and np.isnan(v)))
    is_string = chosen.map(lambda v: isinstance(v, str))
    raw = chosen.where(is_string, "")
    normalised = raw.map(schema.normalize_text)
    flags = {"non_string": given & ~is_string, "normalised": normalised != raw}
    for name in flags:  # a frame this function made before keeps what it counted then
        if name in frame:
            flags[name] = flags[name] | frame[name].astype(bool)
    return pd.DataFrame({"image": basename(frame["image"]), "text": normalised.astype(str),
                         **{name: flag.to_numpy(bool) for name, flag in flags.items()}}, index=frame.index)


#: marks a key that a prediction record does not have (an explicit null is a caption that is not a string)
_ABSENT = object()


def match_predictions(preds: pd.DataFrame, images: pd.Series) -> tuple[pd.Series, dict[str, int]]:
    """Texts aligned with ``images`` ('' where missing; the last line of an image wins) and the input counts."""
    duplicates = int(preds["image"].duplicated(keep="last").sum())
    latest = preds.drop_duplicates("image", keep="last").set_index("image")
    matched = images.map(latest["text"])
    predicted, split_images = set(latest.index.tolist()), set(images.tolist())  # sets: Index.isin is slow on str
    inputs = {
        "missing_predictions": int(matched.isna().sum()),
        "matched_predictions": len(predicted & split_images),
        "outside_split": len(predicted - split_images),
        "duplicates": duplicates,
        "bad_lines": 0,
        "prediction_records": int(len(preds)),
        "non_string_texts": int(latest["non_string"].sum()) if "non_string" in latest else 0,
        "normalised_texts": int(latest["normalised"].sum()) if "normalised" in latest else 0,
    }
    return matched.fillna("").astype(str), inputs


def split_rows(ground_truth: pd.DataFrame, split: str) -> pd.DataFrame:
    """The ground-truth rows of ``split`` (index reset, ``image`` basenames added); ``ValueError`` when none."""
    if "image" not in ground_truth:
        ground_truth = ground_truth.assign(image=basename(ground_truth["image_path"]))
    rows = ground_truth[ground_truth["split"] == split] if "split" in ground_truth else ground_truth
    if rows.empty:
        found = sorted(ground_truth["split"].dropna().unique()) if "split" in ground_truth else []
        raise ValueError(f"no ground-truth rows for split {split!r}; splits present: {found}")
    return rows.reset_index(drop=True)


def parse_texts(texts: pd.Series) -> list[schema.ParsedCaption]:
    """:func:`schema.parse_caption` of every text, parsed once per distinct text."""
    cache = {text: schema.parse_caption(text) for text in texts.unique()}
    return [cache[text] for text in texts]


def crowding_group(close_classes: int) -> str | None:
    """The ``near_recall_by_crowding`` group of a scene with that many close classes (``None`` for none)."""
    return CROWDING_GROUPS[min(close_classes, len(CROWDING_GROUPS)) - 1] if close_classes else None


@dataclass(frozen=True, slots=True)
class ObjectPair:
    """One (image, object class) pair of a section: what the ground truth has and what the caption says."""

    name: str
    truth: tuple[str, ...]  # positions in the ground truth; () when it lacks the class
    said: tuple[str, ...]  # positions the caption gives; () when it does not name the class

    @property
    def found(self) -> bool:
        return bool(self.truth) and bool(self.said)

    @property
    def missed(self) -> bool:
        return bool(self.truth) and not self.said

    @property
    def invented(self) -> bool:
        return bool(self.said) and not self.truth

    @property
    def same_count(self) -> bool:
        return self.found and len(self.truth) == len(self.said)

    @property
    def same_positions(self) -> bool:
        # a side the annotation does not know cannot be right, whatever the caption says
        return self.found and schema.UNKNOWN not in self.truth and Counter(self.truth) == Counter(self.said)


def compare_objects(truth: Mapping[str, Sequence[str]], said: Mapping[str, Sequence[str]]) -> list[ObjectPair]:
    """Every class the ground truth or the caption has, in caption order. "0 cars" names no car.

    The evaluator counts its near and far figures from these pairs, and :mod:`bvip_helpers.errors` types each
    one, so the error records add up to the evaluator's figures.
    """
    return [ObjectPair(o.name, tuple(truth.get(o.name) or ()), tuple(said.get(o.name) or ()))
            for o in schema.OBJECT_CLASSES if truth.get(o.name) or said.get(o.name)]


def truth_objects(columns: Mapping[str, Sequence[tuple[str, ...]]], row: int) -> dict[str, tuple[str, ...]]:
    """Row ``row`` of the :func:`cell_positions` lists of each class: the classes it has, with their positions."""
    return {name: positions[row] for name, positions in columns.items() if positions[row]}


class UnmatchedPredictionsError(ValueError):
    """Too few predicted images are in the evaluated split: another split, or names that differ."""


def check_matched(predictions: pd.DataFrame, ground_truth: pd.DataFrame, split: str, min_matched: float,
                  pred_file: str = "") -> None:
    """Refuse to score when fewer than ``min_matched`` of the distinct predicted images are in ``split``.

    The message says which split the predictions do match, if any, and the three split image names
    closest to the first unmatched prediction (``a.JPG`` -> ``a.jpg``).
    """
    if "image" not in ground_truth:
        ground_truth = ground_truth.assign(image=basename(ground_truth["image_path"]))
    predicted = list(dict.fromkeys(predictions["image"].tolist()))
    in_split = ground_truth["split"] == split if "split" in ground_truth else pd.Series(True, ground_truth.index)
    split_images = set(ground_truth.loc[in_split, "image"].tolist())
    matched = sum(image in split_images for image in predicted)
    if predicted and matched >= max(min_matched * len(predicted), 1e-9) or min_matched <= 0:
        return
    source = f"{pred_file}: " if pred_file else ""
    if not predicted:
        raise UnmatchedPredictionsError(f"{source}no predictions to score; caption the {split} split first")
    message = (f"{source}only {matched} of {len(predicted)} predicted images are in the {split!r} split "
               f"({len(split_images)} images), below --min_matched {min_matched:g}")
    if "split" in ground_truth:
        others = ground_truth.loc[~in_split].groupby("split")["image"].agg(lambda names: len(set(names) & set(predicted)))
        others = others[others > 0]
        if len(others):
            message += "; they are in " + ", ".join(f"{name} ({n})" for name, n in others.items())
    unmatched = next(image for image in predicted if image not in split_images)
    closest = difflib.get_close_matches(unmatched, sorted(split_images), n=3, cutoff=0.0)
    if closest:
        message += f"; the {split} images closest to {unmatched!r} are " + ", ".join(map(repr, closest))
    raise UnmatchedPredictionsError(message + ". Pass the --split the predictions were made for, fix the image "
                                    "names, or pass --min_matched 0 to score anyway (missing images score 0).")


# --- metric groups -----------------------------------------------------------


def seed_metrics(texts: pd.Series, ground_truth: pd.DataFrame) -> dict[str, Any]:
    """Presence, accuracy and legacy keyword-proxy figures, vectorised over the whole split."""
    predicted = extract_fields(texts)
    n = len(texts)
    presence = {key: _ratio(predicted[key].notna().sum(), n) for key in FIELDS}
    accuracy = {key: _ratio((predicted[key].to_numpy(object) == ground_truth[key].to_numpy(object)).sum(), n)
                for key in FIELDS}
    mentioned = legacy_mentions(texts)
    legacy = {}
    for column, hits in mentioned.items():
        stats = _prf(legacy_gt_present(ground_truth, column), hits)
        stats.pop("f1")
        legacy[column] = stats
    return {"presence": presence, "accuracy": accuracy, "legacy_objects": legacy, "_fields": predicted}


def _object_metrics(gt: dict[str, list[tuple[str, ...]]], pred: list[dict[str, list[str]]]) -> dict[str, Any]:
    per_object = {}
    total = np.zeros(3, int)
    for name, gt_positions in gt.items():
        stats = _prf(np.fromiter((bool(p) for p in gt_positions), bool, len(gt_positions)),
                     np.fromiter((bool(p.get(name)) for p in pred), bool, len(pred)))
        per_object[name] = stats
        total += (stats["tp"], stats["fn"], stats["fp"])
    tp, fn, fp = map(int, total)
    recall, precision = _ratio(tp, tp + fn), _ratio(tp, tp + fp)
    return {"recall": recall, "precision": precision, "f1": _f1(precision, recall),
            "tp": tp, "fn": fn, "fp": fp, "per_object": per_object}


def confusion(gt: pd.Series, pred: pd.Series, enum: tuple[str, ...]) -> tuple[dict[str, Any], float | None]:
    """Confusion matrix (rows ground truth, columns prediction) and macro-F1 of one field."""
    gt = gt.fillna(schema.UNKNOWN).astype(str)
    pred = pred.fillna(MISSING).astype(str)
    extra = sorted((set(gt) | set(pred)) - set(enum) - {MISSING})
    labels = [*enum, *extra, MISSING]
    index = {label: i for i, label in enumerate(labels)}
    matrix = np.zeros((len(labels), len(labels)), int)
    np.add.at(matrix, (gt.map(index).to_numpy(int), pred.map(index).to_numpy(int)), 1)
    scores = []
    for label in labels[:-1]:
        i = index[label]
        tp, gt_count, pred_count = matrix[i, i], matrix[i, :].sum(), matrix[:, i].sum()
        if gt_count or pred_count:
            scores.append(_f1(_ratio(tp, pred_count) or 0.0, _ratio(tp, gt_count) or 0.0) or 0.0)
    return {"labels": labels, "matrix": matrix.tolist()}, (float(np.mean(scores)) if scores else None)


def structured_metrics(texts: pd.Series, ground_truth: pd.DataFrame, fields: pd.DataFrame) -> dict[str, Any]:
    """Metrics from :func:`schema.parse_caption` (see the module docstring for definitions)."""
    parsed = parse_texts(texts)
    gt_near = {o.name: cell_positions(ground_truth, o.near_column) for o in schema.OBJECT_CLASSES}
    gt_far = {o.name: cell_positions(ground_truth, o.far_column) for o in schema.OBJECT_CLASSES}
    near = _object_metrics(gt_near, [p.near for p in parsed])
    far = _object_metrics(gt_far, [p.far for p in parsed])

    matched = same_positions = same_count = 0
    hallucinated_images = critical_gt = critical_missed = 0
    critical = {o.name for o in schema.OBJECT_CLASSES if o.critical}
    crowding = {group: {"pairs": 0, "found": 0} for group in CROWDING_GROUPS}
    for row, caption in enumerate(parsed):
        pairs = compare_objects(truth_objects(gt_near, row), caption.near)
        hallucinated_images += any(pair.invented for pair in pairs)
        close = [pair for pair in pairs if pair.truth]
        if close:
            group = crowding[crowding_group(len(close))]
            group["pairs"] += len(close)
            group["found"] += sum(pair.found for pair in close)
        for pair in close:
            if pair.name in critical:
                critical_gt += 1
                critical_missed += pair.missed
            matched += pair.found
            same_count += pair.same_count
            same_positions += pair.same_positions

    order_ok = sum(p.section_order in ALLOWED_SECTION_ORDERS for p in parsed)
    complete = fields.notna().all(axis=1)
    consistent = sum(schema.derive_relation(sw, road) == rel for sw, road, rel in
                     fields.loc[complete, list(FIELDS)].itertuples(index=False))
    matrices, macro = {}, {}
    for key in FIELDS:
        matrices[key], macro[key] = confusion(ground_truth[key], fields[key], schema.FIELD_ENUMS[key])
    n = len(texts)
    return {
        "near_objects": near,
        "far_objects": far,
        "position_accuracy": _ratio(same_positions, matched),
        "count_accuracy": _ratio(same_count, matched),
        "near_recall_by_crowding": {group: {**c, "recall": _ratio(c["found"], c["pairs"])}
                                    for group, c in crowding.items()},
        "matched_near_pairs": matched,
        "hallucinated_objects": near["fp"],
        "hallucination_rate": _ratio(hallucinated_images, n),
        "critical_misses": critical_missed,
        "critical_miss_rate": _ratio(critical_missed, critical_gt),
        "section_order_ok": _ratio(order_ok, n),
        "relation_consistency": _ratio(consistent, int(complete.sum())),
        "macro_f1": macro,
        "confusion": matrices,
    }


def baselines(ground_truth: pd.DataFrame, split_rows: pd.DataFrame, split: str) -> dict[str, Any]:
    """Majority value per field and the original caption (``target``) used as the prediction."""
    train = ground_truth[ground_truth["split"] == "train"] if "split" in ground_truth else ground_truth.iloc[:0]
    source, computed_on = (train, "train") if len(train) else (split_rows, split)
    n = len(split_rows)
    majority_value = {key: str(source[key].fillna(schema.UNKNOWN).value_counts().idxmax()) for key in FIELDS}
    majority_accuracy = {key: _ratio((split_rows[key] == majority_value[key]).sum(), n) for key in FIELDS}

    targets = split_rows["target"].fillna("").astype(str) if "target" in split_rows else pd.Series("", split_rows.index)
    seed = seed_metrics(targets, split_rows)
    cache = {text: schema.parse_caption("Nearby: " + text).near for text in targets.unique()}
    as_nearby = [cache[text] for text in targets]
    near = _object_metrics({o.name: cell_positions(split_rows, o.near_column) for o in schema.OBJECT_CLASSES},
                           as_nearby)
    legacy_tp = sum(v["tp"] for v in seed["legacy_objects"].values())
    legacy_fn = sum(v["fn"] for v in seed["legacy_objects"].values())
    legacy_fp = sum(v["fp"] for v in seed["legacy_objects"].values())
    return {
        "majority": {"value": majority_value, "accuracy": majority_accuracy, "computed_on": computed_on},
        "original_caption": {
            "presence": seed["presence"],
            "accuracy": seed["accuracy"],
            "near_objects": {"recall": near["recall"], "precision": near["precision"]},
            "legacy_objects": {"recall": _ratio(legacy_tp, legacy_tp + legacy_fn),
                               "precision": _ratio(legacy_tp, legacy_tp + legacy_fp)},
        },
    }


# --- entry points ----------------------------------------------------------------


def evaluate_predictions(predictions: Iterable[Mapping[str, Any]] | pd.DataFrame, ground_truth: pd.DataFrame,
                         split: str = "test", *, structured: bool = True, pred_file: str = "") -> dict[str, Any]:
    """Score predictions against ``dataset.load_ground_truth`` output; returns the report dict.

    ``predictions``: records or a frame with ``image`` and ``text`` or ``response``.
    ``structured=False`` computes the seed-compatible figures only (fast path for benchmarks).
    """
    rows = split_rows(ground_truth, split)
    texts, inputs = match_predictions(predictions_frame(predictions), rows["image"])
    seed = seed_metrics(texts, rows)
    report: dict[str, Any] = {
        "n": len(rows), "split": split, "pred_file": pred_file,
        "presence": seed["presence"], "accuracy": seed["accuracy"], "legacy_objects": seed["legacy_objects"],
        "inputs": inputs,
    }
    if structured:
        report["structured"] = structured_metrics(texts, rows, seed["_fields"])
        report["structured"]["baselines"] = baselines(ground_truth, rows, split)
    return report


def read_predictions(pred_jsonl: str | Path, *, skip_bad_lines: bool = False) -> tuple[pd.DataFrame, int]:
    """Predictions JSONL -> (frame with ``image`` and ``text``, number of bad lines skipped).

    A line that is not a JSON object (or not UTF-8) raises :class:`~bvip_helpers.io.JsonlError` naming
    its line number. A record without an ``image`` path (a number or null is none) or without both
    ``text`` and ``response`` raises a ``ValueError`` naming its line. With ``skip_bad_lines`` both are
    counted instead.
    """
    bad_lines: list[int] = []
    records, bad_records = [], 0
    for number, record in numbered_jsonl(pred_jsonl, skip_bad_lines=skip_bad_lines, bad_lines=bad_lines,
                                         skip_flag="--skip_bad_lines"):
        image = record.get("image")
        if isinstance(image, str) and image.strip() and ("text" in record or "response" in record):
            records.append(record)
        elif skip_bad_lines:
            bad_records += 1
        elif "image" in record and not (isinstance(image, str) and image.strip()):
            raise ValueError(f"{pred_jsonl}: line {number} has 'image' {image!r}, not an image path; fix it, or "
                             "pass --skip_bad_lines to count and skip it")
        else:
            raise ValueError(f"{pred_jsonl}: line {number} lacks 'image' or "
                             "'text'/'response'; fix it, or pass --skip_bad_lines to count and skip it")
    return predictions_frame(records), len(bad_lines) + bad_records


#: ``bvip evaluate`` refuses to score when fewer than this fraction of the predicted images are in the split.
MIN_MATCHED = 0.5


def evaluate_files(pred_jsonl: str | Path, captions_csv: str | Path, annotations_csv: str | Path,
                   split: str = "test", *, skip_bad_lines: bool = False, json_out: str | Path | None = None,
                   structured: bool = True, min_matched: float = MIN_MATCHED) -> dict[str, Any]:
    """Read the predictions JSONL and both CSVs, evaluate, optionally write the report JSON atomically.

    Raises :class:`UnmatchedPredictionsError` when fewer than ``min_matched`` of the predicted images
    are in ``split`` (see :func:`check_matched`).
    """
    from .dataset import load_ground_truth  # the builder owns the ground-truth rules

    predictions, bad = read_predictions(pred_jsonl, skip_bad_lines=skip_bad_lines)
    ground_truth = load_ground_truth(captions_csv, annotations_csv)
    check_matched(predictions, ground_truth, split, min_matched, pred_file=str(pred_jsonl))
    report = evaluate_predictions(predictions, ground_truth, split, structured=structured, pred_file=str(pred_jsonl))
    report["inputs"]["bad_lines"] = bad
    if json_out:
        write_json(json_out, report)
    return report


def flatten_report(report: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves as ``{"presence.sidewalk_pos": 0.9, ...}``; nulls, strings and matrices left out."""
    flat: dict[str, float] = {}
    for key, value in report.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_report(value, name + "."))
        elif isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def _pct(value: float | None) -> str:
    return "   n/a" if value is None else f"{value:6.3f}"


def format_report(report: Mapping[str, Any]) -> str:
    """A readable text report."""
    inputs = report["inputs"]
    lines = [f"BVIP evaluation: split={report['split']} n={report['n']} file={report.get('pred_file') or '-'}",
             "inputs: " + ", ".join(f"{k}={v}" for k, v in inputs.items()), ""]
    structured = report.get("structured")
    base = structured["baselines"] if structured else None
    lines.append(f"{'field':<18}{'presence':>9}{'accuracy':>9}{'macroF1':>9}{'majority':>9}{'orig.cap':>9}")
    for key in FIELDS:
        lines.append(f"{key:<18}{_pct(report['presence'][key]):>9}{_pct(report['accuracy'][key]):>9}"
                     f"{_pct(structured['macro_f1'][key]) if structured else '':>9}"
                     f"{_pct(base['majority']['accuracy'][key]) if base else '':>9}"
                     f"{_pct(base['original_caption']['accuracy'][key]) if base else '':>9}")
    if base:
        lines.append(f"(majority values from {base['majority']['computed_on']}: "
                     + ", ".join(f"{k}={v}" for k, v in base['majority']['value'].items()) + ")")
    lines += ["", "legacy keyword proxy (whole text, substrings):",
              f"{'object':<18}{'gt':>6}{'tp':>6}{'fn':>6}{'fp':>6}{'recall':>9}{'precision':>10}"]
    for column, s in report["legacy_objects"].items():
        lines.append(f"{column:<18}{s['gt_present']:>6}{s['tp']:>6}{s['fn']:>6}{s['fp']:>6}"
                     f"{_pct(s['recall']):>9}{_pct(s['precision']):>10}")
    if structured:
        lines += ["", "structured (Nearby/Far sections, word boundaries):",
                  f"{'object':<18}{'near R':>8}{'near P':>8}{'far R':>8}{'far P':>8}"]
        for name in structured["near_objects"]["per_object"]:
            n_s, f_s = structured["near_objects"]["per_object"][name], structured["far_objects"]["per_object"][name]
            lines.append(f"{name:<18}{_pct(n_s['recall']):>8}{_pct(n_s['precision']):>8}"
                         f"{_pct(f_s['recall']):>8}{_pct(f_s['precision']):>8}")
        for label, key in (("near (micro)", "near_objects"), ("far (micro)", "far_objects")):
            s = structured[key]
            lines.append(f"{label:<18}{_pct(s['recall']):>8}{_pct(s['precision']):>8}  f1={_pct(s['f1']).strip()}")
        orig = base["original_caption"]["near_objects"]
        lines += [f"original caption near: recall={_pct(orig['recall']).strip()} "
                  f"precision={_pct(orig['precision']).strip()}",
                  f"position accuracy {_pct(structured['position_accuracy']).strip()}, "
                  f"count accuracy {_pct(structured['count_accuracy']).strip()} "
                  f"(over {structured['matched_near_pairs']} matched near pairs)",
                  "near recall by close classes in the scene: " + ", ".join(
                      f"{group}: {_pct(c['recall']).strip()} ({c['found']}/{c['pairs']})"
                      for group, c in structured["near_recall_by_crowding"].items()),
                  f"hallucinated near objects {structured['hallucinated_objects']} "
                  f"(images affected {_pct(structured['hallucination_rate']).strip()})",
                  f"critical misses {structured['critical_misses']} "
                  f"(rate {_pct(structured['critical_miss_rate']).strip()})",
                  f"section order ok {_pct(structured['section_order_ok']).strip()}, "
                  f"relation consistency {_pct(structured['relation_consistency']).strip()}"]
    return "\n".join(lines)


# --- CLI ---------------------------------------------------------------------------


def configure_cli(parser: argparse.ArgumentParser) -> None:
    from bvip_helpers.io import resolve_cli_path

    parser.add_argument("--pred_jsonl", type=resolve_cli_path, required=True, help="predictions: one JSON object per line with "
                        "'image' and 'text' or 'response'. Captions are read with no-break and other Unicode spaces, "
                        "fullwidth colons and zero-width characters mapped away (counted as normalised_texts); "
                        "a caption that is not a string scores as empty (counted as non_string_texts)")
    parser.add_argument("--captions_csv", type=resolve_cli_path, required=True,
                        help="the SENSATION captions CSV (image_path, target, split)")
    parser.add_argument("--annotations_csv", type=resolve_cli_path, required=True,
                        help="the SENSATION annotations CSV (image, sidewalk_pos, road_pos, object columns)")
    parser.add_argument("--split", default="test", help="the split the predictions caption (default: test)")
    parser.add_argument("--json", type=resolve_cli_path, dest="json_out", default=None, help="write the report here (atomically)")
    parser.add_argument("--skip_bad_lines", action="store_true", help="count and skip malformed lines")
    parser.add_argument("--min_matched", type=float, default=MIN_MATCHED,
                        help="refuse to score (exit 2) when fewer than this fraction of the predicted images are in "
                             f"--split: another split, or names that differ such as .JPG and .jpg (default: {MIN_MATCHED}; "
                             "0 scores anyway)")


def run_cli(args: argparse.Namespace) -> int:
    try:
        report = evaluate_files(args.pred_jsonl, args.captions_csv, args.annotations_csv, args.split,
                                skip_bad_lines=args.skip_bad_lines, json_out=args.json_out,
                                min_matched=args.min_matched)
    except (ValueError, FileNotFoundError) as err:  # JsonlError and DatasetError are ValueErrors
        print(f"bvip evaluate: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        from bvip_helpers.io import concerns, os_error_line

        if not concerns(err, args.json_out):  # an input that cannot be read (a folder given as a file, say)
            print(f"bvip evaluate: error: cannot read {os_error_line(err)}", file=sys.stderr)
            return 2
        print(f"bvip evaluate: error: cannot write the report to {os_error_line(err)}; pass a --json path in a "
              "writable folder", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json_out:
        print(f"\nreport written to {args.json_out}")
    return 0
