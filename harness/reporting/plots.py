"""The benchmark plots: rank against peak memory, training time and score; score against memory,
trainable parameters and training time (one point per trial, the untrained baseline as a dashed line).

One PNG each, next to the sweep's table (results/<sweep>_<plot>.png). A line per recipe (and --set
values), error bars = sample std over seeds; a method without a rank is a dashed horizontal line.
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

RANK_PLOTS = (
    ("peak memory (MiB)", "rank_vs_memory"),
    ("train (s)", "rank_vs_train_time"),
)


def _series(rows: list[dict[str, Any]], metric: str) -> dict[str, dict[float, list[float]]]:
    """label -> rank -> values over seeds (rank inf: no rank)."""
    series: dict[str, dict[float, list[float]]] = {}
    for row in rows:
        value = row.get(metric)
        if value is None:
            continue
        label = row["recipe"] + (f" [{row['settings']}]" if row["settings"] else "")
        series.setdefault(label, {}).setdefault(row["_rank"], []).append(float(value))
    return series


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _memory_label(rows: list[dict[str, Any]]) -> str:
    kinds = sorted({row.get("memory kind") for row in rows if row.get("memory kind")})
    return f"peak memory (MiB, {' / '.join(kinds)})"


def _rank_plot(plt, rows, metric: str, ylabel: str, title: str):
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    ranks = sorted({row["_rank"] for row in rows if row["_rank"] != math.inf})
    for label, by_rank in _series(rows, metric).items():
        ranked = sorted((r, *_mean_std(v)) for r, v in by_rank.items() if r != math.inf)
        if ranked:
            xs, means, stds = zip(*ranked)
            axes.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=label)
        if math.inf in by_rank:
            mean, _ = _mean_std(by_rank[math.inf])
            axes.axhline(mean, linestyle="--", linewidth=1, label=f"{label} (no rank)")
    if ranks:
        axes.set_xscale("log", base=2)
        axes.set_xticks(ranks, [str(int(r)) for r in ranks])
        axes.minorticks_off()
    axes.set_xlabel("rank (r; AdaLoRA target_r)")
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:  # nothing measured this metric: an empty plot, no legend
        axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


def _score_scatter(plt, rows, x_metric: str, score: str, title: str, xlabel: str, log_x: bool = False):
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for row in rows:  # the untrained model: every method's gain is measured from it
        if row["method"] == "none" and row.get(score) is not None:
            axes.axhline(row[score], linestyle="--", linewidth=1, color="grey")
            axes.annotate(row["recipe"], (0.01, row[score]), xycoords=("axes fraction", "data"),
                          textcoords="offset points", xytext=(0, 3), fontsize=7, color="grey")
    methods = list(dict.fromkeys(row["method"] for row in rows if row["method"] != "none"))
    for method in methods:
        points = [
            (row[x_metric], row[score], row)
            for row in rows
            if row["method"] == method and row.get(score) is not None and row.get(x_metric) is not None
            and not (log_x and row[x_metric] <= 0)
        ]
        if not points:
            continue
        xs, ys, _ = zip(*points)
        axes.scatter(xs, ys, label=method)
        for x, y, row in points:
            rank = "no rank" if row["_rank"] == math.inf else f"r{int(row['_rank'])}"
            axes.annotate(rank, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    if log_x:
        axes.set_xscale("log")
    axes.set_xlabel(xlabel)
    axes.set_ylabel(score)
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:  # a sweep of baselines only has no method to name
        axes.legend(fontsize=8, title="method")
    figure.tight_layout()
    return figure


def write_plots(rows: list[dict[str, Any]], folder: Path, sweep: str, score: str | None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    memory_label = _memory_label(rows)
    figures = [
        (name, _rank_plot(plt, rows, metric, memory_label if metric.startswith("peak memory") else metric,
                          f"{sweep}: rank vs {metric.split(' (')[0]}"))
        for metric, name in RANK_PLOTS
    ]
    if score:
        figures.append(("rank_vs_score", _rank_plot(plt, rows, score, score, f"{sweep}: rank vs {score}")))
        trained = [row for row in rows if row["method"] != "none"]
        figures.append(("memory_vs_score", _score_scatter(
            plt, rows, "peak memory (MiB)", score, f"{sweep}: {score} vs memory, per method", memory_label)))
        if any(row.get("trainable params") for row in trained):
            figures.append(("params_vs_score", _score_scatter(
                plt, rows, "trainable params", score, f"{sweep}: {score} vs trainable parameters",
                "trainable parameters (log scale)", log_x=True)))
        figures.append(("train_time_vs_score", _score_scatter(
            plt, rows, "train (s)", score, f"{sweep}: {score} vs training time", "training time (s, optimizer steps)")))
    written = []
    for name, figure in figures:
        path = Path(folder) / f"{sweep}_{name}.png"
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            figure.savefig(tmp, format="png", dpi=110, metadata={"Software": None})
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
            plt.close(figure)
        written.append(path)
    return written
