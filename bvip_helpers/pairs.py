"""Preference pairs for DPO, from three sources: ``bvip pairs``.

Every pair is one JSONL line: ``id``, ``image``, ``prompt``, ``chosen``, ``rejected`` (caption texts), ``source``
(``seed``, ``controlled`` or ``ranked``), ``error_type`` (controlled pairs) and ``scores`` (ranked pairs).
A summary per source and error type goes beside the pairs (``<out>.summary.json``).

1. **Seed pairs** (:func:`seed_pairs`): the builder's ``bvpi_dpo_<split>.jsonl``, the priority caption chosen
   over the original caption. They differ in format and length as much as in facts, and DPO sums
   log-probabilities over the whole answer, so a model can learn the format alone: the summary says how far apart
   the two sides are (:func:`pair_statistics`).
2. **Controlled single-error negatives** (:func:`controlled_pairs`, after POVID and HA-DPO): the rejected caption is
   the chosen one with exactly one safety error of a named type (:data:`ERROR_TYPES`), written by the same
   composer, so style and length stay the same otherwise. The annotations give a side, never a distance, so
   "the nearest close object dropped" drops one close object, a critical one (person, car, bicycle) first.
3. **Model-ranked pairs** (:func:`ranked_pairs`, after RLAIF-V and the weak-to-strong DPO pipeline): the policy
   samples N captions per image, a judge scores each, and the best and the worst become a pair when their scores
   are far enough apart. The default judge is the BVIP evaluator against the annotations: the severity of
   each caption's errors (:func:`caption_score`, deterministic); a second, smaller model can judge instead
   (:func:`model_judge`: its greedy caption becomes the reference). Candidates and scores are saved.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import statistics
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bvip_helpers import schema
from bvip_helpers.io import read_jsonl, resolve, write_json, write_jsonl

SOURCES = ("seed", "controlled", "ranked")
#: The single safety errors of controlled pairs, and the default share of each in the mix.
ERROR_TYPES: dict[str, float] = {
    "sidewalk_flipped": 1.0,      # Sidewalk left <-> right (center becomes left or right)
    "road_flipped": 1.0,          # Road left <-> right, or front/center changed to a side
    "relation_wrong": 1.0,        # RoadVsSidewalk replaced by another value
    "close_object_dropped": 2.0,  # a close object class left out of Nearby (a critical one first)
    "object_side_flipped": 2.0,   # one close object on the other side
    "hazard_invented": 2.0,       # a close person, bicycle or car the annotations do not have
    "moved_to_far": 1.0,          # a close object class moved to Far
    "field_omitted": 1.0,         # one mandatory field left out
}
CRITICAL = tuple(o.name for o in schema.OBJECT_CLASSES if o.critical)
_FLIP = {"left": "right", "right": "left"}


# --- Controlled single-error negatives -------------------------------------------------


@dataclass
class CaptionParts:
    """A composed priority caption taken apart, so one part can change and the rest be written back the same."""

    fields: dict[str, str]
    near: dict[str, list[str]]
    far: dict[str, list[str]]
    context: str

    @classmethod
    def of(cls, caption: str) -> CaptionParts | None:
        """The parts of a caption the builder composed, or ``None`` when composing them back differs."""
        parsed = schema.parse_caption(caption)
        if not all(parsed.fields.values()):
            return None
        parts = cls(dict(parsed.fields), {k: list(v) for k, v in parsed.near.items()},
                    {k: list(v) for k, v in parsed.far.items()}, parsed.sections.get("context", ""))
        return parts if parts.compose() == caption else None

    def compose(self) -> str:
        labels = schema.SceneLabels(self.fields["sidewalk_pos"], self.fields["road_pos"], self.near, self.far)
        text = schema.compose_caption(labels, self.context)
        derived = schema.derive_relation(self.fields["sidewalk_pos"], self.fields["road_pos"])
        if derived != self.fields["road_vs_sidewalk"]:  # keep the stated relation, even where it is wrong
            text = text.replace(f"RoadVsSidewalk: {derived}.", f"RoadVsSidewalk: {self.fields['road_vs_sidewalk']}.", 1)
        return text


def _other_side(position: str, rng: random.Random) -> str:
    return _FLIP.get(position) or rng.choice(("left", "right"))


def _flip_field(parts: CaptionParts, key: str, rng: random.Random) -> CaptionParts | None:
    value = parts.fields[key]
    if value == schema.UNKNOWN:
        return None
    new = _other_side(value, rng) if value in ("left", "center", "right") else rng.choice(("left", "right"))
    return CaptionParts({**parts.fields, key: new}, parts.near, parts.far, parts.context)


def _relation_wrong(parts: CaptionParts, rng: random.Random) -> CaptionParts | None:
    value = parts.fields["road_vs_sidewalk"]
    if value == schema.UNKNOWN:
        return None
    new = rng.choice([v for v in schema.RELATION_VALUES if v != value])
    return CaptionParts({**parts.fields, "road_vs_sidewalk": new}, parts.near, parts.far, parts.context)


def _pick_close(parts: CaptionParts, rng: random.Random, critical_first: bool = False) -> str | None:
    names = sorted(parts.near)
    if critical_first and any(n in CRITICAL for n in names):
        names = [n for n in names if n in CRITICAL]
    return rng.choice(names) if names else None


def _drop_close(parts: CaptionParts, rng: random.Random) -> CaptionParts | None:
    name = _pick_close(parts, rng, critical_first=True)
    if name is None:
        return None
    return CaptionParts(parts.fields, {k: v for k, v in parts.near.items() if k != name}, parts.far, parts.context)


def _flip_object_side(parts: CaptionParts, rng: random.Random) -> CaptionParts | None:
    """One close object (one instance, so ``2 obstacles on the left and right`` becomes ``... right and right``)
    on the other side; a centred one moves to a side."""
    names = sorted(n for n, where in parts.near.items() if any(p in schema.OBJECT_POSITIONS for p in where))
    if not names:
        return None
    name = rng.choice(names)
    where = list(parts.near[name])
    index = rng.choice([i for i, p in enumerate(where) if p in schema.OBJECT_POSITIONS])
    where[index] = _other_side(where[index], rng)
    where.sort(key=lambda p: schema.OBJECT_POSITIONS.index(p) if p in schema.OBJECT_POSITIONS else 3)
    return CaptionParts(parts.fields, {**parts.near, name: where}, parts.far, parts.context)


def _invent_hazard(parts: CaptionParts, rng: random.Random) -> CaptionParts | None:
    absent = [n for n in CRITICAL if n not in parts.near and n not in parts.far]
    if not absent:
        return None
    near = {**parts.near, rng.choice(absent): [rng.choice(schema.OBJECT_POSITIONS)]}
    return CaptionParts(parts.fields, near, parts.far, parts.context)


def _move_to_far(parts: CaptionParts, rng: random.Random) -> CaptionParts | None:
    name = _pick_close(parts, rng, critical_first=True)
    if name is None:
        return None
    far = {**parts.far, name: sorted(parts.far.get(name, []) + parts.near[name],
                                     key=lambda p: schema.OBJECT_POSITIONS.index(p) if p in schema.OBJECT_POSITIONS
                                     else 3)}
    return CaptionParts(parts.fields, {k: v for k, v in parts.near.items() if k != name}, far, parts.context)


_EDITS: dict[str, Callable[[CaptionParts, random.Random], CaptionParts | None]] = {
    "sidewalk_flipped": lambda p, r: _flip_field(p, "sidewalk_pos", r),
    "road_flipped": lambda p, r: _flip_field(p, "road_pos", r),
    "relation_wrong": _relation_wrong,
    "close_object_dropped": _drop_close,
    "object_side_flipped": _flip_object_side,
    "hazard_invented": _invent_hazard,
    "moved_to_far": _move_to_far,
}


def omit_field(caption: str, key: str) -> str:
    """``caption`` without the mandatory field ``key`` (``Sidewalk: left.`` and the space after it)."""
    match = schema.FIELD_PATTERNS[key].search(caption)
    if match is None:
        raise ValueError(f"caption has no {schema.FIELD_LABELS[key]} field to omit")
    end = match.end() + (1 if caption[match.end(): match.end() + 1] == "." else 0)
    end += 1 if caption[end: end + 1] == " " else 0
    return caption[: match.start()] + caption[end:]


def inject_error(caption: str, error_type: str, rng: random.Random) -> str | None:
    """``caption`` with exactly one safety error of ``error_type``; ``None`` when it does not apply to this caption
    (no close object to drop, an unknown field, a caption the composer did not write)."""
    if error_type not in ERROR_TYPES:
        raise ValueError(f"unknown error type {error_type!r}; choose from {', '.join(ERROR_TYPES)}")
    parts = CaptionParts.of(caption)
    if parts is None:
        return None
    if error_type == "field_omitted":
        return omit_field(caption, rng.choice(sorted(schema.FIELD_LABELS)))
    edited = _EDITS[error_type](parts, rng)
    text = edited.compose() if edited is not None else None
    return text if text and text != caption else None


def parse_error_types(text: str) -> dict[str, float]:
    """``--error_types``: ``all``, or a comma list of names with optional weights (``sidewalk_flipped:2,field_omitted``)."""
    if text.strip() in ("", "all"):
        return dict(ERROR_TYPES)
    mix: dict[str, float] = {}
    for item in (t.strip() for t in text.split(",") if t.strip()):
        name, _, weight = item.partition(":")
        if name not in ERROR_TYPES:
            raise ValueError(f"--error_types: unknown error type {name!r}; choose from {', '.join(ERROR_TYPES)}")
        try:
            mix[name] = float(weight) if weight else 1.0
        except ValueError as err:
            raise ValueError(f"--error_types: weight of {name!r} is not a number: {weight!r}") from err
        if mix[name] < 0:
            raise ValueError(f"--error_types: weight of {name!r} is negative")
    if not any(mix.values()):
        raise ValueError("--error_types: every weight is zero")
    return mix


def _pair_id(*parts: str) -> str:
    return hashlib.sha1("\x1f".join(parts).encode("utf-8")).hexdigest()[:12]


def controlled_pairs(records: Sequence[Mapping[str, Any]], *, error_types: Mapping[str, float] | None = None,
                     per_record: int = 1, seed: int = 0) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Single-error negatives of the records' priority captions -> (pairs, counts).

    ``error_types`` maps each type to its share of the pairs (weights, normalised). Not every error applies to
    every caption (a scene with nothing close has no object to drop, but any scene can get an invented hazard),
    so drawing a type per record would fill the pairs with the types that always apply. Instead each record,
    in a seeded random order, gets the applicable type furthest below its share so far, ``per_record`` times
    (without repeats). Counts say how many pairs each type gave, and how many records could not be used (a
    caption the composer would not write back identically, or one no error applies to).
    """
    from bvip_helpers.families import record_image_path, record_prompt, record_response

    mix = {k: v for k, v in (error_types or ERROR_TYPES).items() if v > 0}
    total = sum(mix.values())
    share = {k: v / total for k, v in mix.items()}
    rng = random.Random(seed)
    order = list(range(len(records)))
    rng.shuffle(order)
    made: dict[str, int] = dict.fromkeys(mix, 0)
    pairs: list[dict[str, Any]] = []
    counts: dict[str, Any] = {"records": len(records), "not_composed": 0, "no_error_applies": 0}
    for index in order:
        record = dict(records[index])
        chosen = record_response(record)
        if CaptionParts.of(chosen) is None:
            counts["not_composed"] += 1
            continue
        draws = random.Random(f"{seed}:{index}")  # the same record gets the same error whatever the mix
        options = {kind: text for kind in sorted(mix) if (text := inject_error(chosen, kind, draws)) is not None}
        if not options:
            counts["no_error_applies"] += 1
        for _ in range(min(per_record, len(options))):
            so_far = sum(made.values()) + 1
            deficit = {kind: share[kind] * so_far - made[kind] for kind in options}
            top = max(deficit.values())
            kind = rng.choice(sorted(k for k, d in deficit.items() if d == top))
            rejected = options.pop(kind)
            image, prompt = record_image_path(record), record_prompt(record)
            pairs.append({"id": _pair_id("controlled", image, kind, rejected), "image": image, "prompt": prompt,
                          "chosen": chosen, "rejected": rejected, "source": "controlled", "error_type": kind})
            made[kind] += 1
    pairs.sort(key=lambda p: p["id"])  # a stable order that does not depend on the draw order
    counts["error_types"] = made
    return pairs, counts


# --- Seed pairs -------------------------------------------------------------------------


def seed_pairs(data_dir: str | Path, split: str = "train") -> list[dict[str, Any]]:
    """The builder's ``bvpi_dpo_<split>.jsonl``: priority caption chosen, original caption rejected."""
    path = resolve(data_dir) / f"bvpi_dpo_{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no seed pairs; build them with `bvip build-dataset --out_dir {data_dir}`")
    return [{"id": _pair_id("seed", r["image"], r["rejected"]), "image": r["image"], "prompt": r["prompt"],
             "chosen": r["chosen"], "rejected": r["rejected"], "source": "seed"} for r in read_jsonl(path)]


def pair_statistics(pairs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """How far apart the two sides are besides the facts: words, and how often each side has the three fields."""
    if not pairs:
        return {"pairs": 0}

    def words(text: str) -> int:
        return len(text.split())

    def complete(text: str) -> bool:
        return all(schema.parse_caption(text).fields.values())

    chosen, rejected = [words(p["chosen"]) for p in pairs], [words(p["rejected"]) for p in pairs]
    return {"pairs": len(pairs), "chosen_words_median": statistics.median(chosen),
            "rejected_words_median": statistics.median(rejected),
            "length_ratio_median": statistics.median(c / max(r, 1) for c, r in zip(chosen, rejected, strict=True)),
            "chosen_with_all_fields": round(sum(map(complete, (p["chosen"] for p in pairs))) / len(pairs), 3),
            "rejected_with_all_fields": round(sum(map(complete, (p["rejected"] for p in pairs))) / len(pairs), 3)}


# --- Model-ranked pairs -------------------------------------------------------------------


def truth_of(row: Mapping[str, Any]) -> dict[str, Any]:
    """One image's ground truth (a row of :func:`bvip_helpers.dataset.load_ground_truth`) as the error records hold
    it: ``fields``, and the ``near`` and ``far`` classes with their positions."""
    def objects(column: str) -> dict[str, list[str]]:
        found = {o.name: schema.parse_object_cell(row.get(getattr(o, column)))[0] for o in schema.OBJECT_CLASSES}
        return {name: positions for name, positions in found.items() if positions}

    return {"fields": {key: str(row.get(key) or schema.UNKNOWN) for key in schema.FIELD_LABELS},
            "near": objects("near_column"), "far": objects("far_column")}


def caption_score(text: str, truth: Mapping[str, Any]) -> float:
    """How safe one caption is against its annotations: minus its severity in the error records
    (:func:`bvip_helpers.errors.severity_of`, :data:`bvip_helpers.errors.SEVERITY`), so a critical miss (-100)
    or a flipped side (-90) weighs most, and a safe caption scores 0."""
    from bvip_helpers.errors import severity_of

    return -float(severity_of(text, truth))


def model_judge(judge: Any, image_root: str | Path, *, max_new_tokens: int = 128,
                batch_size: int = 8) -> Callable[[Sequence[Mapping[str, Any]]], list[dict[str, Any]]]:
    """A weak-to-strong judge: a second (smaller) model's greedy caption of each image becomes the reference the
    candidates are scored against with :func:`caption_score`. ``judge`` is a loaded ``predict.LoadedModel``."""
    from bvip_helpers.families import generate_captions, load_record_image, record_prompt

    def references(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        labels = []
        for begin in range(0, len(records), batch_size):
            batch = records[begin: begin + batch_size]
            images = [load_record_image(resolve(image_root), dict(r)) for r in batch]
            texts = generate_captions(judge.model, judge.processor, judge.spec, images,
                                      [record_prompt(dict(r)) or schema.DEFAULT_PROMPT for r in batch],
                                      max_new_tokens=max_new_tokens)
            for text in texts:
                parsed = schema.parse_caption(text)
                labels.append({"fields": {k: parsed.fields.get(k) or schema.UNKNOWN for k in schema.FIELD_LABELS},
                               "near": {k: v for k, v in parsed.near.items() if v},
                               "far": {k: v for k, v in parsed.far.items() if v}})
        return labels

    return references


@dataclass
class SamplingParams:
    """How the policy samples its candidates."""

    n: int = 4
    temperature: float = 1.0
    top_p: float = 0.95
    max_new_tokens: int = 128
    batch_size: int = 8
    seed: int = 0


def sample_candidates(loaded: Any, records: Sequence[Mapping[str, Any]], image_root: str | Path,
                      sampling: SamplingParams, progress: bool = True) -> list[list[str]]:
    """``sampling.n`` sampled captions per record (a seeded generator per batch, so reruns agree)."""
    import torch
    from tqdm.auto import tqdm

    from bvip_helpers.families import decode_generated, generation_inputs, load_record_image, record_prompt

    out: list[list[str]] = []
    bar = tqdm(total=len(records), desc="sample candidates", unit="img", disable=not progress)
    for index, begin in enumerate(range(0, len(records), sampling.batch_size)):
        batch = records[begin: begin + sampling.batch_size]
        images = [load_record_image(resolve(image_root), dict(r)) for r in batch]
        inputs = generation_inputs(loaded.processor, loaded.spec, images,
                                   [record_prompt(dict(r)) or schema.DEFAULT_PROMPT for r in batch])
        inputs = inputs.to(loaded.model.device)
        torch.manual_seed(sampling.seed * 100_003 + index)
        with torch.no_grad():
            ids = loaded.model.generate(**inputs, do_sample=True, temperature=sampling.temperature,
                                        top_p=sampling.top_p, num_return_sequences=sampling.n,
                                        max_new_tokens=sampling.max_new_tokens)
        expanded = {"input_ids": inputs["input_ids"].repeat_interleave(sampling.n, dim=0)}
        texts = decode_generated(loaded.processor, loaded.spec, ids, expanded)
        out += [texts[i * sampling.n: (i + 1) * sampling.n] for i in range(len(batch))]
        bar.update(len(batch))
    bar.close()
    return out


def rank_candidates(candidates: Sequence[str], truth: Mapping[str, Any], min_gap: float) -> dict[str, Any] | None:
    """The best and the worst distinct candidate with their scores, or ``None`` (all tied, or closer than ``min_gap``)."""
    scored = sorted({text: caption_score(text, truth) for text in candidates if text.strip()}.items(),
                    key=lambda item: (-item[1], item[0]))
    if len(scored) < 2:
        return None
    (best, high), (worst, low) = scored[0], scored[-1]
    if high - low < min_gap:
        return None
    return {"chosen": best, "rejected": worst, "scores": {"chosen": high, "rejected": low},
            "candidates": [{"text": t, "score": s} for t, s in scored]}


def ranked_pairs(loaded: Any, records: Sequence[Mapping[str, Any]], image_root: str | Path, truth: Any, *,
                 sampling: SamplingParams | None = None, min_gap: float = 40.0, judge: Any = None,
                 progress: bool = True) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Policy samples ranked by the judge -> (pairs, counts). ``truth`` is the ground-truth frame (the default
    judge); ``judge`` a loaded model instead (:func:`model_judge`)."""
    from bvip_helpers.families import record_image_path, record_prompt

    sampling = sampling or SamplingParams()
    candidates = sample_candidates(loaded, records, image_root, sampling, progress=progress)
    if judge is not None:
        references = model_judge(judge, image_root, max_new_tokens=sampling.max_new_tokens)(records)
    else:
        rows = {Path(str(p)).name: row for p, row in zip(truth["image_path"], truth.to_dict("records"), strict=True)}
        references = []
        for record in records:
            name = Path(record_image_path(dict(record))).name
            if name not in rows:
                raise ValueError(f"{record_image_path(dict(record))}: no ground truth for this image; "
                                 "check the captions and annotations CSVs")
            references.append(truth_of(rows[name]))
    pairs, counts = [], {"records": len(records), "candidates": sum(map(len, candidates)), "tied_or_close": 0,
                         "duplicates": 0}
    seen: set[tuple[str, str, str]] = set()
    for record, texts, reference in zip(records, candidates, references, strict=True):
        ranked = rank_candidates(texts, reference, min_gap)
        if ranked is None:
            counts["tied_or_close"] += 1
            continue
        image = record_image_path(dict(record))
        key = (image, ranked["chosen"], ranked["rejected"])
        if key in seen:
            counts["duplicates"] += 1
            continue
        seen.add(key)
        pairs.append({"id": _pair_id("ranked", *key), "image": image, "prompt": record_prompt(dict(record)),
                      "source": "ranked", "judge": "model" if judge is not None else "evaluator", **ranked})
    counts["pairs"] = len(pairs)
    return pairs, counts


# --- Files ----------------------------------------------------------------------------------


def summarise(pairs: Sequence[Mapping[str, Any]], counts: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Pairs per source and error type, and the length and format statistics per source."""
    by_source = {s: [p for p in pairs if p.get("source") == s] for s in SOURCES}
    return {"pairs": len(pairs),
            "per_source": {s: len(v) for s, v in by_source.items() if v},
            "per_error_type": dict(Counter(p["error_type"] for p in pairs if p.get("error_type"))),
            "statistics": {s: pair_statistics(v) for s, v in by_source.items() if v},
            "counts": dict(counts or {})}


def write_pairs(path: str | Path, pairs: Sequence[Mapping[str, Any]], counts: Mapping[str, Any] | None = None) -> Path:
    """Write the pairs (atomically) and ``<path stem>.summary.json`` beside them; returns the summary path."""
    path = Path(path)
    write_jsonl(path, pairs)
    summary = path.with_suffix(".summary.json")
    write_json(summary, summarise(pairs, counts))
    return summary


# --- CLI --------------------------------------------------------------------------------------


def configure_cli(parser: argparse.ArgumentParser) -> None:
    from bvip_helpers.io import resolve_cli_path

    parser.add_argument("--source", required=True, choices=SOURCES, help="where the pairs come from")
    parser.add_argument("--out", type=resolve_cli_path, required=True, help="pairs JSONL (a .summary.json goes beside)")
    parser.add_argument("--data_dir", type=resolve_cli_path, default=resolve_cli_path("data/bvpi_out"),
                        help="`bvip build-dataset` output: bvpi_dpo_* (seed) or bvpi_chat_* (controlled, ranked)")
    parser.add_argument("--split", default="train", help="the split the pairs are made from (default: train)")
    parser.add_argument("--error_types", default="all",
                        help="controlled: 'all' or a comma list with optional weights, e.g. "
                             "'object_side_flipped:2,hazard_invented' (types: " + ", ".join(ERROR_TYPES) + ")")
    parser.add_argument("--per_record", type=int, default=1, help="controlled: pairs per record (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the error draws and of the sampling")
    parser.add_argument("--model", default=None, help="ranked: the policy's base model (registry name, hub id, folder)")
    parser.add_argument("--adapter", type=resolve_cli_path, default=None, help="ranked: the policy's SFT adapter")
    parser.add_argument("--image_root", type=resolve_cli_path, default=None, help="ranked: the images' folder")
    parser.add_argument("--captions_csv", type=resolve_cli_path, default=None, help="ranked: the ground truth captions")
    parser.add_argument("--annotations_csv", type=resolve_cli_path, default=None, help="ranked: the annotations")
    parser.add_argument("--judge_model", default=None,
                        help="ranked: a smaller model that judges instead of the annotations (greedy caption)")
    parser.add_argument("--judge_adapter", type=resolve_cli_path, default=None,
                        help="ranked: the judge's SFT adapter (a base model does not write the BVIP fields)")
    parser.add_argument("--n", type=int, default=4, help="ranked: candidates per image (default: 4)")
    parser.add_argument("--temperature", type=float, default=1.0, help="ranked: sampling temperature (default: 1.0)")
    parser.add_argument("--top_p", type=float, default=0.95, help="ranked: nucleus sampling (default: 0.95)")
    parser.add_argument("--min_gap", type=float, default=40.0,
                        help="ranked: smallest severity gap between chosen and rejected (default: 40, a wrong side)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N records (0: all)")


def run_cli(args: argparse.Namespace) -> int:
    from bvip_helpers.registry import UnknownModelError

    try:
        if args.source == "seed":
            pairs, counts = seed_pairs(args.data_dir, args.split), {}
        else:
            from bvip_helpers.families import record_image_path

            records_file = Path(args.data_dir) / f"bvpi_chat_{args.split}.jsonl"
            if not records_file.is_file():
                raise FileNotFoundError(f"{records_file}: no records; build them with `bvip build-dataset`")
            records = read_jsonl(records_file)[: args.limit or None]
            if args.source == "controlled":
                pairs, counts = controlled_pairs(records, error_types=parse_error_types(args.error_types),
                                                 per_record=args.per_record, seed=args.seed)
            else:
                missing = [flag for flag, value in (("--model", args.model), ("--image_root", args.image_root))
                           if not value]
                if missing:
                    raise ValueError(f"--source ranked needs {' and '.join(missing)}")
                from bvip_helpers.dataset import load_ground_truth
                from bvip_helpers.io import ANNOTATIONS_FILE, CAPTIONS_FILE
                from bvip_helpers.predict import load

                truth = None
                if not args.judge_model:
                    truth = load_ground_truth(args.captions_csv or args.image_root / CAPTIONS_FILE,
                                              args.annotations_csv or args.image_root / ANNOTATIONS_FILE)
                judge = load(args.judge_model, args.judge_adapter) if args.judge_model else None
                records = [r for r in records if record_image_path(r)]
                pairs, counts = ranked_pairs(load(args.model, args.adapter), records, args.image_root, truth,
                                             sampling=SamplingParams(n=args.n, temperature=args.temperature,
                                                                     top_p=args.top_p, seed=args.seed),
                                             min_gap=args.min_gap, judge=judge)
    except (FileNotFoundError, ValueError, UnknownModelError) as err:
        print(f"bvip pairs: error: {err}", file=sys.stderr)
        return 2
    summary = write_pairs(args.out, pairs, counts)
    print(f"pairs: {len(pairs)} {args.source} pairs -> {args.out} (summary {summary})")
    return 0

