"""Figures and tables for notebooks 01 (explore) and 02 (build dataset).

Everything here reads the merged ground-truth frame of :func:`bvip_helpers.dataset.load_ground_truth`
(one row per caption, normalised fields, raw object cells) and returns a table or a figure.
"""

from __future__ import annotations

import textwrap
from collections import Counter
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from bvip_helpers.io import load_image, safe_image_path
from bvip_helpers.schema import FIELD_ENUMS, FIELD_LABELS, OBJECT_CLASSES, parse_object_cell

SPLITS = ("train", "val", "test")


def field_distribution(gt: pd.DataFrame, field: str) -> pd.DataFrame:
    """Counts of each enum value of ``field`` per split (rows: values in enum order)."""
    table = pd.crosstab(gt[field], gt["split"]).reindex(index=list(FIELD_ENUMS[field]), fill_value=0)
    return table.reindex(columns=[s for s in SPLITS if s in table.columns], fill_value=0)


def plot_field_distributions(gt: pd.DataFrame) -> plt.Figure:
    """One bar chart per mandatory field, bars stacked by split, shares in the labels."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for ax, field in zip(axes, FIELD_ENUMS, strict=True):
        table = field_distribution(gt, field)
        bottom = np.zeros(len(table))
        for split in table.columns:
            ax.bar(table.index, table[split], bottom=bottom, label=split)
            bottom += table[split].to_numpy()
        for x, total in enumerate(bottom):
            ax.text(x, total, f"{total / max(bottom.sum(), 1):.0%}", ha="center", va="bottom", fontsize=8)
        ax.set_title(FIELD_LABELS[field])
        ax.tick_params(axis="x", rotation=30)
    axes[0].set_ylabel("images")
    axes[-1].legend(title="split")
    return fig


def object_counts(gt: pd.DataFrame) -> pd.DataFrame:
    """Images with at least one object, and objects in total, per class, near and far."""
    rows = []
    for obj in OBJECT_CLASSES:
        for distance, column in (("near", obj.near_column), ("far", obj.far_column)):
            per_image = gt[column].map(lambda cell: len(parse_object_cell(cell)[0]))
            rows.append({"object": obj.name, "distance": distance,
                         "images": int((per_image > 0).sum()), "objects": int(per_image.sum()),
                         "multi_object_cells": int((per_image > 1).sum())})
    return pd.DataFrame(rows)


def plot_object_counts(gt: pd.DataFrame) -> plt.Figure:
    """Grouped bars: images showing each class, close versus far."""
    table = object_counts(gt).pivot(index="object", columns="distance", values="images")
    table = table.reindex([o.name for o in OBJECT_CLASSES])
    ax = table[["near", "far"]].plot.bar(figsize=(8, 3.6), rot=20)
    ax.set_ylabel("images with the object")
    ax.set_title("Objects per class: close (Nearby) versus far (Far)")
    return ax.figure


def multi_object_cells(annotations: pd.DataFrame, top: int = 15) -> pd.DataFrame:
    """The most frequent cells holding several objects (``Left-Left-Center``) across object columns."""
    counter: Counter[tuple[str, str]] = Counter()
    columns = [c for o in OBJECT_CLASSES for c in (o.near_column, o.far_column) if c in annotations.columns]
    for column in columns:
        for cell, n in annotations[column].value_counts().items():
            if len(parse_object_cell(cell)[0]) > 1:
                counter[(column, str(cell))] += int(n)
    rows = [{"column": c, "cell": cell, "rows": n, "objects": len(parse_object_cell(cell)[0])}
            for (c, cell), n in counter.most_common(top)]
    return pd.DataFrame(rows, columns=["column", "cell", "rows", "objects"])


def _overlay_text(row: pd.Series) -> str:
    near = []
    for obj in OBJECT_CLASSES:
        positions = parse_object_cell(row.get(obj.near_column))[0]
        if positions:
            near.append(f"{len(positions)} {obj.name}")
    return (f"SW {row['sidewalk_pos']} | Road {row['road_pos']}\n{row['road_vs_sidewalk']}\n"
            f"near: {', '.join(near) or 'nothing'}")


def plot_image_grid(gt: pd.DataFrame, image_root: str | Path, n: int = 12, seed: int = 0,
                    cols: int = 4, caption_column: str | None = None) -> plt.Figure:
    """Random images with their ground truth overlaid (and optionally a caption underneath).

    Missing or unreadable images raise: a grid that silently skips images would hide a
    broken dataset.
    """
    sample = gt.sample(n=min(n, len(gt)), random_state=seed)
    rows = int(np.ceil(len(sample) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, (3.4 if caption_column else 2.8) * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (_, row) in zip(axes.flat, sample.iterrows(), strict=False):
        ax.imshow(load_image(safe_image_path(image_root, row["image_path"])))
        ax.text(3, 3, _overlay_text(row), va="top", fontsize=7, family="monospace",
                bbox={"facecolor": "white", "alpha": 0.8, "pad": 2})
        title = Path(row["image_path"]).name
        if caption_column:
            title += "\n" + textwrap.fill(textwrap.shorten(str(row[caption_column]), 150, placeholder=" …"), 48)
        ax.set_title(title, fontsize=7, loc="left")
    return fig


def caption_length_table(records_by_split: dict[str, list[dict]]) -> pd.DataFrame:
    """Words per original caption and per priority caption, by split (from SFT records + merged frame)."""
    rows = []
    for split, records in records_by_split.items():
        lengths = pd.Series([len(r["response"].split()) for r in records], dtype=float)
        rows.append({"split": split, "rows": len(records), "median_words": lengths.median(),
                     "p95_words": lengths.quantile(0.95), "max_words": lengths.max()})
    return pd.DataFrame(rows)


def side_by_side(gt: pd.DataFrame, n: int = 4, seed: int = 0) -> pd.DataFrame:
    """Original caption next to the priority caption for a few random images."""
    sample = gt.sample(n=min(n, len(gt)), random_state=seed)
    return sample[["image_path", "split", "target", "response"]].rename(
        columns={"target": "original caption", "response": "priority caption"})
