"""Comparison figures for notebooks 03, 05 and 06: models side by side, baselines as reference lines.

Every function takes evaluator reports (:func:`bvip_helpers.evaluate.evaluate_predictions`)
keyed by a display name, or (notebook 06) the error records of :mod:`bvip_helpers.errors`, and
returns a matplotlib figure; the notebook saves them with :func:`bvip_helpers.io.save_fig`.
Missing values (a class absent from the split) are drawn as gaps, never as zeros.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from bvip_helpers import schema

FIELDS = tuple(schema.FIELD_LABELS)  # sidewalk_pos, road_pos, road_vs_sidewalk
Reports = Mapping[str, Mapping[str, Any]]


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and value is not None else math.nan


def comparison_table(reports: Reports) -> pd.DataFrame:
    """One row per model: presence and accuracy per field, near/far objects, safety rates."""
    rows = []
    for name, report in reports.items():
        structured = report.get("structured", {})
        row: dict[str, Any] = {"model": name, "n": report.get("n")}
        for key in FIELDS:
            label = schema.FIELD_LABELS[key]
            row[f"presence {label}"] = _num(report["presence"].get(key))
            row[f"accuracy {label}"] = _num(report["accuracy"].get(key))
        for section in ("near_objects", "far_objects"):
            part = structured.get(section, {})
            row[f"{section.split('_')[0]} recall"] = _num(part.get("recall"))
            row[f"{section.split('_')[0]} precision"] = _num(part.get("precision"))
        row["critical miss rate"] = _num(structured.get("critical_miss_rate"))
        row["hallucination rate"] = _num(structured.get("hallucination_rate"))
        row["relation consistency"] = _num(structured.get("relation_consistency"))
        rows.append(row)
    return pd.DataFrame(rows)


def _bars(ax: Any, groups: Sequence[str], series: Mapping[str, Sequence[float]], width: float = 0.8) -> np.ndarray:
    """Grouped bars: one group per entry of ``groups``, one bar per series; returns the group centres."""
    x = np.arange(len(groups))
    n = max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        offset = (i - (n - 1) / 2) * width / n
        ax.bar(x + offset, [0 if math.isnan(v) else v for v in values], width / n, label=name)
    ax.set_xticks(x, groups)
    return x


def plot_before_after(reports: Reports, title: str = "") -> Any:
    """Notebook 03's chart: presence and accuracy of each field, then near recall and precision, one bar per
    report (zero-shot, SFT, ...); dashed lines mark the majority-class accuracy of the last report's split."""
    import matplotlib.pyplot as plt

    groups = [("presence", k) for k in FIELDS] + [("accuracy", k) for k in FIELDS]
    labels = [f"{m}\n{schema.FIELD_LABELS[k]}" for m, k in groups] + ["near recall", "near precision"]
    series = {}
    for name, report in reports.items():
        near = report.get("structured", {}).get("near_objects", {})
        series[name] = [_num(report[m].get(k)) for m, k in groups] + [_num(near.get("recall")),
                                                                        _num(near.get("precision"))]
    fig, ax = plt.subplots(figsize=(10, 3.8))
    _bars(ax, labels, series)
    last = list(reports.values())[-1] if reports else {}
    majority = last.get("structured", {}).get("baselines", {}).get("majority", {}).get("accuracy", {})
    for i, (m, k) in enumerate(groups):
        if m == "accuracy" and majority.get(k) is not None:
            ax.hlines(majority[k], i - 0.4, i + 0.4, colors="k", linestyles="dashed")
    ax.tick_params(axis="x", labelsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_presence_accuracy(reports: Reports, baselines: Mapping[str, Any] | None = None) -> Any:
    """Presence and accuracy per mandatory field; majority and original-caption baselines as lines."""
    import matplotlib.pyplot as plt

    labels = [schema.FIELD_LABELS[k] for k in FIELDS]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for ax, metric in zip(axes, ("presence", "accuracy"), strict=True):
        series = {name: [_num(r[metric].get(k)) for k in FIELDS] for name, r in reports.items()}
        x = _bars(ax, labels, series)
        if baselines:
            original = baselines.get("original_caption", {}).get(metric, {})
            for i, key in enumerate(FIELDS):
                ax.hlines(_num(original.get(key)), x[i] - 0.45, x[i] + 0.45, colors="grey", linestyles=":",
                          label="original caption" if i == 0 else None)
                if metric == "accuracy":
                    majority = baselines.get("majority", {}).get("accuracy", {})
                    ax.hlines(_num(majority.get(key)), x[i] - 0.45, x[i] + 0.45, colors="black", linestyles="--",
                              label="majority class" if i == 0 else None)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"mandatory-field {metric}")
    axes[0].set_ylabel("fraction of test images")
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def plot_object_recall_precision(reports: Reports) -> Any:
    """Per-object recall and precision, close (Nearby) and far, one bar per model."""
    import matplotlib.pyplot as plt

    classes = [o.name for o in schema.OBJECT_CLASSES]
    fig, axes = plt.subplots(2, 2, figsize=(13, 7), sharey=True)
    for row, section in enumerate(("near_objects", "far_objects")):
        for col, metric in enumerate(("recall", "precision")):
            ax = axes[row, col]
            series = {}
            for name, report in reports.items():
                per = report.get("structured", {}).get(section, {}).get("per_object", {})
                series[name] = [_num(per.get(c, {}).get(metric)) for c in classes]
            _bars(ax, [c.replace(" ", "\n") for c in classes], series)
            ax.set_ylim(0, 1.05)
            ax.set_title(f"{section.split('_')[0]} objects: {metric}")
    axes[0, 1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.text(0.01, 0.01, "a missing bar means the class is absent (recall) or never named (precision)",
             fontsize=8, color="grey")
    return fig


def plot_near_recall_by_crowding(reports: Reports) -> Any:
    """Near-object recall in scenes with 1, 2, and 3 or more close classes, one bar per model; the
    ground-truth pairs of each group under its name (few pairs, wide error)."""
    import matplotlib.pyplot as plt

    from bvip_helpers.evaluate import CROWDING_GROUPS

    fig, ax = plt.subplots(figsize=(7, 3.8))
    series, pairs = {}, dict.fromkeys(CROWDING_GROUPS, 0)
    for name, report in reports.items():
        by_group = report.get("structured", {}).get("near_recall_by_crowding", {})
        series[name] = [_num(by_group.get(g, {}).get("recall")) for g in CROWDING_GROUPS]
        pairs = {g: max(pairs[g], by_group.get(g, {}).get("pairs", 0)) for g in CROWDING_GROUPS}
    _bars(ax, [f"{g} close class{'es' if g != '1' else ''}\n({pairs[g]} pairs)" for g in CROWDING_GROUPS], series)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("near-object recall")
    ax.set_title("are objects lost in crowded scenes?")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def plot_confusions(report: Mapping[str, Any], title: str = "") -> Any:
    """One confusion matrix per field (rows ground truth, columns prediction, counts)."""
    import matplotlib.pyplot as plt

    confusion = report.get("structured", {}).get("confusion", {})
    fig, axes = plt.subplots(1, len(FIELDS), figsize=(5 * len(FIELDS), 4.4))
    for ax, key in zip(np.atleast_1d(axes), FIELDS, strict=True):
        part = confusion.get(key)
        if not part:
            ax.set_axis_off()
            continue
        matrix = np.asarray(part["matrix"], dtype=float)
        ax.imshow(matrix, cmap="Blues")
        ax.set_xticks(range(len(part["labels"])), part["labels"], rotation=45, ha="right")
        ax.set_yticks(range(len(part["labels"])), part["labels"])
        for (i, j), value in np.ndenumerate(matrix):
            if value:
                ax.text(j, i, int(value), ha="center", va="center",
                        color="white" if value > matrix.max() / 2 else "black", fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("ground truth")
        ax.set_title(schema.FIELD_LABELS[key])
        ax.grid(False)
    if title:
        fig.suptitle(title)
    return fig


def plot_safety_rates(reports: Reports) -> Any:
    """Critical-miss rate (close person/car/bicycle not named) and hallucination rate; lower is better."""
    import matplotlib.pyplot as plt

    names = list(reports)
    metrics = {"critical miss rate": "critical_miss_rate", "hallucination rate": "hallucination_rate"}
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(names) + 2), 4))
    series = {label: [_num(reports[n].get("structured", {}).get(key)) for n in names] for label, key in metrics.items()}
    _bars(ax, [n.replace(" ", "\n") for n in names], series)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("rate (lower is better)")
    ax.set_title("safety errors")
    ax.legend(fontsize=8)
    return fig


def plot_metric_vs_step(points: Sequence[tuple[int, Mapping[str, Any]]],
                        metrics: Mapping[str, str] | None = None) -> Any:
    """Metrics of checkpoint evaluations against the training step (``points``: (step, report))."""
    import matplotlib.pyplot as plt

    metrics = metrics or {"accuracy Sidewalk": "accuracy.sidewalk_pos", "accuracy Road": "accuracy.road_pos",
                          "accuracy RoadVsSidewalk": "accuracy.road_vs_sidewalk",
                          "near recall": "structured.near_objects.recall"}
    steps = [step for step, _ in points]
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, dotted in metrics.items():
        values = []
        for _, report in points:
            value: Any = report
            for part in dotted.split("."):
                value = value.get(part) if isinstance(value, Mapping) else None
            values.append(_num(value))
        ax.plot(steps, values, marker="o", label=label)
    ax.set_xlabel("training step")
    ax.set_ylim(0, 1.05)
    ax.set_title("metrics by checkpoint")
    ax.legend(fontsize=8)
    return fig


def plot_caption_metrics(scores: Mapping[str, Mapping[str, Any]], reference: str = "vs_priority") -> Any:
    """BLEU-4, METEOR, ROUGE-L and CIDEr per model against one reference (``vs_priority``/``vs_original``)."""
    import matplotlib.pyplot as plt

    names = list(scores)
    keys = [k for k in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
            if any(k in scores[n].get(reference, {}) for n in names)]
    fig, ax = plt.subplots(figsize=(9, 4))
    series = {n: [_num(scores[n].get(reference, {}).get(k)) for k in keys] for n in names}
    _bars(ax, keys, series)
    ax.set_title(f"caption metrics {reference.replace('_', ' ')} (CIDEr is on a 0-10 scale)")
    ax.legend(fontsize=8)
    return fig


# --- error records (notebook 06) -----------------------------------------------------


def plot_errors_by_type(errors_frame: pd.DataFrame, types: Sequence[str], models: Sequence[str]) -> Any:
    """Errors of each type (most dangerous on top), one bar per model: ``errors_frame`` is :func:`errors.errors_frame`."""
    import matplotlib.pyplot as plt

    counts = errors_frame.groupby(["type", "model"]).size()
    shown = [t for t in types if t in counts.index.get_level_values(0)] or list(types)
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(shown) * max(1, len(models)) ** 0.5 + 1.5))
    y = np.arange(len(shown))
    height = 0.8 / max(len(models), 1)
    for i, model in enumerate(models):
        values = [int(counts.get((t, model), 0)) for t in shown]
        ax.barh(y - 0.4 + height * (i + 0.5), values, height, label=model)
    ax.set_yticks(y, [t.replace("_", " ") for t in shown])
    ax.invert_yaxis()
    ax.set_xlabel("errors (image, object or field)")
    ax.set_title("errors by type, most dangerous first")
    ax.legend(fontsize=8, loc="lower right")
    return fig


def plot_failing_images(records_frame: pd.DataFrame, top: int = 12) -> Any:
    """The ``top`` images with the highest severity summed over the models, one stacked segment per model."""
    import matplotlib.pyplot as plt

    table = records_frame.pivot_table(index="image", columns="model", values="severity", aggfunc="sum", fill_value=0)
    table = table[[m for m in dict.fromkeys(records_frame["model"]) if m in table]]
    table = table.loc[table.sum(axis=1).sort_values(ascending=False).index[:top]]
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(table) + 1.5))
    left = np.zeros(len(table))
    for model in table.columns:
        ax.barh(np.arange(len(table)), table[model], left=left, label=model)
        left += table[model].to_numpy()
    ax.set_yticks(np.arange(len(table)), table.index)
    ax.invert_yaxis()
    ax.set_xlabel("severity summed over the models")
    ax.set_title(f"the {len(table)} images that fail worst")
    ax.legend(fontsize=8, loc="lower right")
    return fig


def plot_errors_by_scene(records_frame: pd.DataFrame) -> Any:
    """Mean severity per image by the scene's Sidewalk position and by its number of close classes, per model."""
    import matplotlib.pyplot as plt

    from bvip_helpers.evaluate import CROWDING_GROUPS

    models = list(dict.fromkeys(records_frame["model"]))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    for ax, column, groups, title in (
            (axes[0], "sidewalk_pos", list(schema.FIELD_ENUMS["sidewalk_pos"]), "by Sidewalk position (truth)"),
            (axes[1], "crowding", ["0", *CROWDING_GROUPS], "by close classes in the scene")):
        means = records_frame.groupby([column, "model"])["severity"].mean()
        sizes = records_frame.groupby(column)["image"].nunique()
        shown = [g for g in groups if g in sizes.index]
        series = {m: [_num(means.get((g, m))) for g in shown] for m in models}
        _bars(ax, [f"{g}\n({int(sizes[g])} image{'s' if sizes[g] != 1 else ''})" for g in shown], series)
        ax.set_title(title)
    axes[0].set_ylabel("mean severity per image")
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def plot_spoken_order(table: pd.DataFrame) -> Any:
    """Words before the first and the last close hazard per model (:func:`errors.spoken_order_table`), seconds on
    the right axis; the ground-truth priority caption is the reference bar."""
    import matplotlib.pyplot as plt

    from bvip_helpers.errors import WORDS_PER_MINUTE

    fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(table) + 3), 4))
    series = {"first close hazard": [_num(v) for v in table["words to first hazard"]],
              "last close hazard": [_num(v) for v in table["words to last hazard"]]}
    labels = [f"{m}\n(none heard in {n} of {s})" for m, n, s in
              zip(table["model"], table["no hazard heard"], table["scenes with hazards"], strict=True)]
    _bars(ax, [label.replace(" (truth)", "\n(truth)") for label in labels], series)
    ax.set_ylabel("words before the hazard")
    seconds = ax.secondary_yaxis("right", functions=(lambda w: w * 60 / WORDS_PER_MINUTE,
                                                     lambda s: s * WORDS_PER_MINUTE / 60))
    seconds.set_ylabel(f"seconds at {WORDS_PER_MINUTE} words a minute")
    ax.set_title("spoken order: how long until the pedestrian hears the hazard (lower is better)")
    ax.legend(fontsize=8)
    return fig
