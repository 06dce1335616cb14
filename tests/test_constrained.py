"""Constrained decoding: the trie, the logits processor, and an untrained twin reaching presence 1.000."""

from __future__ import annotations

import pytest

from bvip_helpers import constrained, schema


@pytest.fixture(scope="module")
def twin_dir(tiny_twin):
    return tiny_twin("qwen2-vl")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from bvip_helpers.dataset import load_ground_truth
    from bvip_helpers.demo.synth import generate_dataset

    paths = generate_dataset(tmp_path_factory.mktemp("synth"), n=24, seed=3, image_size=(128, 96), show_progress=False)
    truth = load_ground_truth(paths["captions_csv"], paths["annotations_csv"])
    return paths, truth


def test_mandatory_lines_cover_every_enum_combination():
    lines = constrained.mandatory_lines()
    assert len(lines) == len(set(lines)) == 4 * 5 * 4
    for line in lines:
        fields = schema.parse_caption(line).fields
        assert all(fields[key] in schema.FIELD_ENUMS[key] for key in constrained.FIELD_ORDER), line
        assert line.endswith(".\n")


def test_token_trie_allows_children_then_frees():
    trie = constrained.TokenTrie([[1, 2, 3], [1, 4], [5]])
    assert trie.allowed([]) == [1, 5]
    assert trie.allowed([1]) == [2, 4]
    assert trie.allowed([1, 2]) == [3]
    assert trie.allowed([1, 2, 3]) is None  # complete: free from here on
    assert trie.allowed([1, 2, 3, 9, 9]) is None
    assert trie.allowed([7]) is None  # left the trie (cannot happen under the mask): no constraint


def test_processor_lets_the_scores_choose_the_value(twin_dir):
    """The mask forces format only: boosting one line's tokens makes greedy decoding spell exactly that line."""
    import torch
    from transformers import AutoProcessor

    tok = AutoProcessor.from_pretrained(twin_dir).tokenizer
    trie = constrained.mandatory_trie(tok)
    for target in ("Sidewalk: left. Road: front. RoadVsSidewalk: crossing_front.\n",
                   "Sidewalk: unknown. Road: right. RoadVsSidewalk: left_of.\n"):
        wanted = tok.encode(target, add_special_tokens=False)
        proc = constrained.MandatoryFieldsProcessor(trie)
        prompt = torch.tensor([[0, 0, 0]])
        ids = prompt
        generator = torch.Generator().manual_seed(0)
        for step in range(len(wanted)):
            scores = torch.randn(1, len(tok), generator=generator)
            scores[0, wanted[step]] += 10.0  # the "model" prefers the target line...
            scores[0, tok.eos_token_id] += 50.0  # ...but would rather stop, which the schema forbids
            scores = proc(ids, scores)
            ids = torch.cat([ids, scores.argmax(-1, keepdim=True)], dim=1)
        assert tok.decode(ids[0, 3:]) == target
        # once the line is complete the model is free again
        free = proc(ids, torch.zeros(1, len(tok)))
        assert torch.isfinite(free).all()


@pytest.mark.slow
@pytest.mark.parametrize("num_beams", [1, 3])
def test_untrained_twin_constrained_reaches_full_presence(twin_dir, scenes, tmp_path, num_beams):
    from bvip_helpers.evaluate import evaluate_predictions
    from bvip_helpers.io import read_jsonl
    from bvip_helpers.predict import load, predict

    paths, truth = scenes
    test_rows = truth[truth["split"] == "test"]
    # Two prompt lengths so left padding is exercised inside every batch.
    records = [{"image": p, "prompt": schema.DEFAULT_PROMPT if i % 2 else "Describe the scene."}
               for i, p in enumerate(test_rows["image_path"])]
    loaded = load(twin_dir)
    reports = {}
    for use_constraint in (False, True):
        out = tmp_path / f"preds_{use_constraint}.jsonl"
        predict(loaded, records, paths["image_root"], out, batch_size=4, max_new_tokens=30, num_beams=num_beams,
                constrained=use_constraint, progress=False)
        preds = read_jsonl(out)
        assert len(preds) == len(records)
        reports[use_constraint] = evaluate_predictions(preds, truth, "test", structured=False)
    for key in constrained.FIELD_ORDER:
        assert reports[True]["presence"][key] == 1.0
    # Without the constraint the random twin does not emit the schema: the constraint is what did it.
    assert min(reports[False]["presence"].values()) < 1.0


def test_relation_consistency_and_repair():
    good = "Sidewalk: right. Road: left. RoadVsSidewalk: left_of.\nNearby: nothing close."
    bad = "Sidewalk: right. Road: left. RoadVsSidewalk: right_of.\nNearby: a car close on the left."
    partial = "Sidewalk: right. RoadVsSidewalk: right_of."
    stats = constrained.relation_consistency([good, bad, partial])
    assert stats == {"n": 3, "checked": 2, "contradictions": 1, "rate": 0.5}
    fixed, changed = constrained.repair_relation(bad)
    assert changed and fixed == bad.replace("right_of", "left_of")
    assert constrained.repair_relation(good) == (good, False)
    assert constrained.repair_relation(partial) == (partial, False)  # Road missing: nothing to derive from
    crossing, changed = constrained.repair_relation("Sidewalk: left. Road: front. RoadVsSidewalk: unknown.")
    assert changed and crossing.endswith("RoadVsSidewalk: crossing_front.")


@pytest.mark.slow
def test_repair_relation_is_recorded_never_silent(twin_dir, scenes, tmp_path):
    from bvip_helpers.io import read_jsonl
    from bvip_helpers.predict import load, predict

    paths, truth = scenes
    records = [{"image": p, "prompt": schema.DEFAULT_PROMPT} for p in truth["image_path"][:12]]
    out = tmp_path / "preds.jsonl"
    stats = predict(load(twin_dir), records, paths["image_root"], out, batch_size=6, max_new_tokens=24,
                    constrained=True, repair_relation_field=True, progress=False)
    lines = read_jsonl(out)
    assert all({"text_raw", "repaired"} <= set(line) and line["repair_relation"] for line in lines)
    for line in lines:
        assert line["repaired"] == (line["text"] != line["text_raw"])
        assert not constrained.check_relation(line["text"]).contradicts
    # the contradictions are counted on the raw output, and each one was repaired
    assert stats.relation["contradictions"] == stats.repaired == sum(line["repaired"] for line in lines)
    assert stats.relation["checked"] == len(lines)  # constrained: every caption has all three fields


def test_predict_repairs_and_counts_a_contradiction(twin_dir, scenes, tmp_path, monkeypatch):
    """Deterministic plumbing check: a contradicting caption is repaired, kept raw and counted."""
    from bvip_helpers import predict as predict_module
    from bvip_helpers.io import read_jsonl

    bad = "Sidewalk: left. Road: right. RoadVsSidewalk: left_of.\nNearby: nothing close."
    good = "Sidewalk: left. Road: front. RoadVsSidewalk: crossing_front.\nNearby: nothing close."
    monkeypatch.setattr(predict_module, "_generate_batch", lambda loaded, images, prompts, **kw: [bad, good][: len(images)])
    paths, truth = scenes
    records = [{"image": p, "prompt": "p"} for p in truth["image_path"][:2]]
    out = tmp_path / "preds.jsonl"
    stats = predict_module.predict(predict_module.load(twin_dir), records, paths["image_root"], out, batch_size=2,
                                   repair_relation_field=True, progress=False)
    lines = {line["text_raw"]: line for line in read_jsonl(out)}
    assert lines[bad]["repaired"] and lines[bad]["text"] == bad.replace("left_of", "right_of")
    assert not lines[good]["repaired"] and lines[good]["text"] == good
    assert stats.repaired == 1 and stats.relation == {"n": 2, "checked": 2, "contradictions": 1, "rate": 0.5}
