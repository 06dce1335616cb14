"""Preference pairs: controlled negatives differ by exactly their one error, ranked pairs keep a score gap."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter

import pytest

from bvip_helpers import pairs, schema
from bvip_helpers.io import read_jsonl

SIDES = {"left", "center", "right"}


@pytest.fixture(scope="module")
def records(sample_data):
    return read_jsonl(sample_data / "bvpi_chat_train.jsonl"), sample_data


def _difference(chosen: str, rejected: str) -> dict:
    a, b = schema.parse_caption(chosen), schema.parse_caption(rejected)
    return {"fields": {k for k in schema.FIELD_LABELS if a.fields[k] != b.fields[k]},
            "near_gone": set(a.near) - set(b.near), "near_new": set(b.near) - set(a.near),
            "near_moved": {k for k in set(a.near) & set(b.near) if a.near[k] != b.near[k]},
            "far_changed": {k for k in set(a.far) | set(b.far) if a.far.get(k) != b.far.get(k)},
            "context_same": a.sections.get("context") == b.sections.get("context"), "a": a, "b": b}


def _check_one_error(kind: str, chosen: str, rejected: str) -> None:
    d = _difference(chosen, rejected)
    a, b = d["a"], d["b"]
    assert d["context_same"], (kind, rejected)
    objects = (d["near_gone"], d["near_new"], d["near_moved"], d["far_changed"])
    if kind in ("sidewalk_flipped", "road_flipped", "relation_wrong", "field_omitted"):
        key = {"sidewalk_flipped": "sidewalk_pos", "road_flipped": "road_pos",
               "relation_wrong": "road_vs_sidewalk"}.get(kind)
        assert len(d["fields"]) == 1 and not any(objects), (kind, chosen, rejected)
        changed = next(iter(d["fields"]))
        if kind == "field_omitted":
            assert b.fields[changed] is None and a.fields[changed] is not None
        else:
            assert changed == key and b.fields[key] is not None
            if kind != "relation_wrong" and a.fields[key] in ("left", "right"):
                assert b.fields[key] == {"left": "right", "right": "left"}[a.fields[key]]
        return
    assert not d["fields"], (kind, rejected)
    if kind == "close_object_dropped":
        assert len(d["near_gone"]) == 1 and not (d["near_new"] or d["near_moved"] or d["far_changed"])
    elif kind == "object_side_flipped":
        assert len(d["near_moved"]) == 1 and not (d["near_gone"] or d["near_new"] or d["far_changed"])
        name = next(iter(d["near_moved"]))
        assert len(a.near[name]) == len(b.near[name])
    elif kind == "hazard_invented":
        assert len(d["near_new"]) == 1 and not (d["near_gone"] or d["near_moved"] or d["far_changed"])
        name = next(iter(d["near_new"]))
        assert name in pairs.CRITICAL and name not in a.far
    elif kind == "moved_to_far":
        assert len(d["near_gone"]) == 1 and d["far_changed"] == d["near_gone"]
        name = next(iter(d["near_gone"]))
        assert Counter(b.far[name]) == Counter(a.far.get(name, [])) + Counter(a.near[name])
    else:  # pragma: no cover - every type is listed above
        raise AssertionError(kind)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_controlled_pair_differs_by_exactly_its_error(records, seed):
    made, counts = pairs.controlled_pairs(records[0], per_record=3, seed=seed)
    assert made and counts["not_composed"] == 0
    for pair in made:
        _check_one_error(pair["error_type"], pair["chosen"], pair["rejected"])
    assert Counter(p["error_type"] for p in made) == Counter(counts["error_types"])  # the counts say what was made
    assert all(counts["error_types"][kind] > 0 for kind in pairs.ERROR_TYPES), counts["error_types"]


def test_each_error_type_on_a_caption_that_allows_all_of_them():
    labels = schema.SceneLabels("left", "right", near={"person": ["center"], "obstacle": ["left", "right"]},
                                far={"traffic light": ["left"]})
    caption = schema.compose_caption(labels, "A sidewalk with a person ahead.")
    for kind in pairs.ERROR_TYPES:
        for seed in range(5):
            rejected = pairs.inject_error(caption, kind, random.Random(seed))
            assert rejected is not None and rejected != caption, kind
            _check_one_error(kind, caption, rejected)


def test_errors_that_do_not_apply_give_none():
    empty = schema.compose_caption(schema.SceneLabels("unknown", "front"), "Nothing here.")
    rng = random.Random(0)
    assert pairs.inject_error(empty, "close_object_dropped", rng) is None
    assert pairs.inject_error(empty, "object_side_flipped", rng) is None
    assert pairs.inject_error(empty, "sidewalk_flipped", rng) is None
    assert pairs.inject_error("a plain caption, no fields", "road_flipped", rng) is None
    with pytest.raises(ValueError, match="unknown error type"):
        pairs.inject_error(empty, "typo", rng)


def test_error_type_mix_is_parsed_and_checked():
    assert pairs.parse_error_types("object_side_flipped:2,field_omitted") == {"object_side_flipped": 2.0,
                                                                             "field_omitted": 1.0}
    assert pairs.parse_error_types("all") == pairs.ERROR_TYPES
    for bad, message in (("flipped", "unknown error type"), ("field_omitted:x", "not a number"),
                         ("field_omitted:0", "every weight is zero")):
        with pytest.raises(ValueError, match=message):
            pairs.parse_error_types(bad)
    made, counts = pairs.controlled_pairs([{"image": "a.jpg", "prompt": "p", "response": schema.compose_caption(
        schema.SceneLabels("left", "right", near={"person": ["left"]}), "ctx")}] * 20,
        error_types={"hazard_invented": 1.0}, seed=0)
    assert {p["error_type"] for p in made} == {"hazard_invented"} and len(made) == 20


def test_seed_pairs_and_their_format_gap(records):
    seed = pairs.seed_pairs(records[1], "train")
    stats = pairs.pair_statistics(seed)
    assert seed and all(p["source"] == "seed" for p in seed)
    assert stats["chosen_with_all_fields"] == 1.0 and stats["rejected_with_all_fields"] == 0.0
    assert stats["chosen_words_median"] != stats["rejected_words_median"]


def _truth(near: dict) -> dict:
    return {"fields": {"sidewalk_pos": "left", "road_pos": "right", "road_vs_sidewalk": "right_of"}, "near": near,
            "far": {}}


def test_caption_score_is_minus_the_error_records_severity():
    from bvip_helpers.errors import SEVERITY

    truth = _truth({"person": ["center"]})
    right = schema.compose_caption(schema.SceneLabels("left", "right", near={"person": ["center"]}), "")
    assert pairs.caption_score(right, truth) == 0
    missed = schema.compose_caption(schema.SceneLabels("left", "right"), "")
    assert pairs.caption_score(missed, truth) == -SEVERITY["critical_miss"]
    invented = schema.compose_caption(schema.SceneLabels("left", "right", near={"person": ["center"],
                                                                                 "car": ["left"]}), "")
    assert pairs.caption_score(invented, truth) == -SEVERITY["hallucinated_close"]
    flipped = schema.compose_caption(schema.SceneLabels("right", "right", near={"person": ["center"]}), "")
    assert pairs.caption_score(flipped, truth) < pairs.caption_score(invented, truth)
    row = {"sidewalk_pos": "left", "road_pos": "right", "road_vs_sidewalk": "right_of", "m_person": "Center",
           "m_car_outside": "Left-Right"}
    assert pairs.truth_of(row) == {**_truth({"person": ["center"]}), "far": {"car": ["left", "right"]}}


def test_rank_candidates_keeps_the_gap_and_drops_ties_and_duplicates():
    truth = _truth({"person": ["center"]})
    good = schema.compose_caption(schema.SceneLabels("left", "right", near={"person": ["center"]}), "")
    bad = schema.compose_caption(schema.SceneLabels("right", "left"), "")
    ranked = pairs.rank_candidates([bad, good, good, bad], truth, min_gap=40)
    assert ranked["chosen"] == good and ranked["rejected"] == bad
    assert ranked["scores"]["chosen"] - ranked["scores"]["rejected"] >= 40
    assert len(ranked["candidates"]) == 2  # duplicates scored once
    assert pairs.rank_candidates([good, good], truth, min_gap=1) is None
    invented = schema.compose_caption(schema.SceneLabels("left", "right", near={"person": ["center"],
                                                                                 "car": ["left"]}), "")
    assert pairs.rank_candidates([good, invented], truth, min_gap=40) is None  # 25 apart: too close


@pytest.mark.slow
def test_ranked_pairs_are_deterministic_and_judged_against_the_annotations(records, sample_dir):
    from bvip_helpers.dataset import load_ground_truth
    from bvip_helpers.predict import load

    truth = load_ground_truth(sample_dir / "complete_captions_sensation.csv",
                              sample_dir / "annotations_with_obj_pos.csv")
    policy = load("tiny-qwen2-vl-base")
    sampling = pairs.SamplingParams(n=3, temperature=1.5, max_new_tokens=40, batch_size=4, seed=3)
    runs = [pairs.ranked_pairs(policy, records[0][:6], sample_dir, truth, sampling=sampling, min_gap=10,
                               progress=False) for _ in range(2)]
    assert runs[0] == runs[1]
    made, counts = runs[0]
    assert counts["candidates"] == 18 and counts["pairs"] + counts["tied_or_close"] + counts["duplicates"] == 6
    for pair in made:
        assert pair["scores"]["chosen"] - pair["scores"]["rejected"] >= 10 and pair["chosen"] != pair["rejected"]
        texts = [c["text"] for c in pair["candidates"]]
        assert len(texts) == len(set(texts)) and pair["chosen"] == texts[0] and pair["rejected"] == texts[-1]


def test_a_model_judge_scores_against_its_own_greedy_caption_every_time(records, sample_dir):
    from bvip_helpers.families import generate_captions, load_record_image, record_prompt
    from bvip_helpers.predict import load

    judge = load("tiny-qwen2-vl-base")
    batch = records[0][:3]
    references = [pairs.model_judge(judge, sample_dir, max_new_tokens=40, batch_size=2)(batch) for _ in range(2)]
    assert references[0] == references[1] and len(references[0]) == 3
    texts = generate_captions(judge.model, judge.processor, judge.spec, [load_record_image(sample_dir, r) for r in batch],
                              [record_prompt(r) for r in batch], max_new_tokens=40)
    for reference, text in zip(references[0], texts, strict=True):
        parsed = schema.parse_caption(text)
        assert reference["near"] == {k: v for k, v in parsed.near.items() if v}
        assert reference["fields"] == {k: parsed.fields.get(k) or schema.UNKNOWN for k in schema.FIELD_LABELS}


def test_pairs_cli_writes_pairs_and_a_summary(records, tmp_path):
    out = tmp_path / "controlled.jsonl"
    result = subprocess.run([sys.executable, "-m", "bvip_helpers", "pairs", "--source", "controlled", "--data_dir",
                             str(records[1]), "--out", str(out), "--error_types", "object_side_flipped,field_omitted"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["pairs"] == len(read_jsonl(out)) > 0
    assert set(summary["per_error_type"]) <= {"object_side_flipped", "field_omitted"}
    bad = subprocess.run([sys.executable, "-m", "bvip_helpers", "pairs", "--source", "ranked", "--data_dir",
                          str(records[1]), "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "needs --model" in bad.stderr and "Traceback" not in bad.stderr


def test_error_type_weights_are_shares_of_the_pairs(records):
    """An invented hazard applies to almost every caption, a dropped object only to scenes with one: equal
    weights must still give about as many pairs of each (a per-record draw gave about three invented per drop)."""
    made, counts = pairs.controlled_pairs(records[0], error_types={"close_object_dropped": 1, "hazard_invented": 1},
                                          seed=0)
    dropped, invented = counts["error_types"]["close_object_dropped"], counts["error_types"]["hazard_invented"]
    assert dropped + invented == len(made) == len(records[0])
    with_close = sum(bool(schema.parse_caption(r["messages"][1]["content"][0]["text"]).near) for r in records[0])
    assert dropped == pytest.approx(min(with_close, len(made) / 2), abs=2)
    again, _ = pairs.controlled_pairs(records[0], error_types={"close_object_dropped": 1, "hazard_invented": 1}, seed=0)
    assert again == made
