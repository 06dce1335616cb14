"""Evaluation runs: what each model variant captions, what it is scored against, and where its files go.

Notebooks 03 and 05 (and ``bvip batch``) share these rules, so a figure in one notebook and a row of
the leaderboard always describe the same images:

- :func:`split_records` -- the records of a split to caption (the SFT file of notebook 02, or the
  split's images with the default prompt);
- :func:`scored_truth` -- the ground truth cut down to the captioned images of that split, so an image
  left out on purpose (a limit, a sample) is not counted as a miss;
- :func:`eval_variants` and :func:`run_dir` -- one variant per base model, adapter and decoding, and
  the folder under ``runs/`` where its predictions and ``eval_<split>.json`` live (the leaderboard
  reads them from there);
- :func:`zero_shot_dir` and :func:`chain_dir` -- the same for notebook 00's zero-shot backends and chains.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from bvip_helpers import schema
from bvip_helpers.io import read_jsonl, resolve


def split_records(data_dir: str | os.PathLike[str], split: str, truth: pd.DataFrame,
                  limit: int | None = None) -> list[dict[str, Any]]:
    """The records to caption for ``split``: ``<data_dir>/bvpi_sft_<split>.jsonl`` (image and prompt), or, when
    that file is missing, every image of the split in ``truth`` with :data:`schema.DEFAULT_PROMPT`.

    ``limit`` keeps the first N records (``None`` or 0: all).
    """
    path = resolve(data_dir) / f"bvpi_sft_{split}.jsonl"
    if path.is_file():
        records = read_jsonl(path)
    else:
        print(f"{path} not found: captioning the {split} images of the ground truth with the default prompt")
        rows = truth[truth["split"] == split]
        records = [{"image": p, "prompt": schema.DEFAULT_PROMPT} for p in rows["image_path"]]
    return records[:limit] if limit else records


def scored_truth(truth: pd.DataFrame, split: str, records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """``truth`` with ``split`` cut down to the images of ``records``; the other splits stay (the baselines
    learn their majority values from the train split)."""
    wanted = {Path(str(r["image"])).name for r in records}
    names = truth["image_path"].map(lambda p: Path(str(p)).name)
    return truth[names.isin(wanted) | (truth["split"] != split)]


def adapter_base(adapter: str | os.PathLike[str], default: str) -> str:
    """The base model an adapter folder was trained from (its ``adapter_config.json``), else ``default``."""
    config = resolve(adapter) / "adapter_config.json"
    if not config.is_file():
        return default
    base = json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    return str(base) if base else default


def adapter_labels(adapters: Sequence[str]) -> list[str]:
    """``SFT``, ``DPO``, ...: an adapter is named by its folder (``runs/<model>/sft``), or by its path when two
    folders share a name."""
    names = [Path(str(a).rstrip("/")).name.upper() for a in adapters]
    if len(adapters) == 1 and names[0] not in ("SFT", "DPO"):
        return ["SFT"]
    return [name if names.count(name) == 1 else f"{name} {a}" for a, name in zip(adapters, names, strict=True)]


def eval_variants(models: Sequence[str], adapters: Sequence[str], *, also_constrained: bool) -> list[dict[str, Any]]:
    """One variant per zero-shot model and per adapter, each greedy and (``also_constrained``) constrained.

    A variant is ``{"label", "model", "adapter", "constrained"}``; a zero-shot label names the model only when
    there are several, an adapter's label is :func:`adapter_labels`.
    """
    runs = [{"label": "zero-shot" if len(models) == 1 else f"zero-shot {m}", "model": m, "adapter": None}
            for m in models]
    runs += [{"label": label, "model": adapter_base(a, models[0] if models else ""), "adapter": a}
             for a, label in zip(adapters, adapter_labels(adapters), strict=True)]
    variants = []
    for run in runs:
        for constrained in ([False, True] if also_constrained else [False]):
            variants.append({**run, "constrained": constrained,
                             "label": run["label"] + (" + constrained" if constrained else "")})
    return variants


def run_dir(variant: Mapping[str, Any], runs_dir: str | os.PathLike[str]) -> Path:
    """Where a variant's ``preds_<split>.jsonl`` and ``eval_<split>.json`` go.

    Zero-shot: ``<runs_dir>/<model>/zero_shot[_constrained]``. An adapter: ``<adapter>/eval`` (or
    ``<adapter>/constrained``); an adapter under ``runs/`` but outside ``runs_dir`` is mapped into ``runs_dir``
    (a smoke run never writes into the real runs).
    """
    runs_dir = resolve(runs_dir)
    constrained = bool(variant.get("constrained"))
    if variant.get("adapter"):
        base = resolve(variant["adapter"])
        if base.is_relative_to(resolve("runs")) and not base.is_relative_to(runs_dir):
            base = runs_dir / base.relative_to(resolve("runs"))
        return base / ("constrained" if constrained else "eval")
    slug = Path(str(variant["model"]).rstrip("/")).name
    return runs_dir / slug / ("zero_shot_constrained" if constrained else "zero_shot")


def model_slug(model: str) -> str:
    """A folder name for a model: the last part of its id or path, other characters than letters, digits,
    ``._+-`` made ``-`` (``Qwen/Qwen2-VL-7B-Instruct`` -> ``Qwen2-VL-7B-Instruct``, ``llava:7b`` -> ``llava-7b``)."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", Path(str(model).rstrip("/")).name).strip("-") or "model"


def zero_shot_dir(runs_dir: str | os.PathLike[str], backend: str, model: str, prompt: str) -> Path:
    """Where notebook 00 puts one zero-shot run: ``<runs_dir>/<model>/zero_shot_<backend>_<prompt>`` (beside
    notebook 05's ``zero_shot``, so the leaderboard lists them under the same model)."""
    return resolve(runs_dir) / model_slug(model) / f"zero_shot_{backend}_{prompt}"


def chain_dir(runs_dir: str | os.PathLike[str], models: Sequence[str], prompt: str) -> Path:
    """Where a chain's predictions go: ``<runs_dir>/chain_<model>+<model>.../<prompt>``; each step's report goes
    into ``step_<n>/`` below it, a leaderboard row per expert."""
    return resolve(runs_dir) / ("chain_" + "+".join(model_slug(m) for m in models)) / prompt
