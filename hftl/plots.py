"""PNG pictures for model cards and reports, drawn with matplotlib's Agg renderer (no display needed).

Every function takes plain lists / dicts, writes one PNG at `path` and returns that path, so `hftl train`
(the card's confusion matrix and learning curves) and `hftl compare` (metric against labels, parameters and
time: `errorbar_png`) draw the same way. They build a
`matplotlib.figure.Figure` directly instead of going through pyplot: no global figure state, no backend to
choose, nothing left open.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CONFUSION_PNG = "confusion_matrix.png"
CURVES_PNG = "learning_curves.png"
DPI = 100
MAX_ANNOTATED = 30  # above this many classes the cells are too small for their counts; colour alone is drawn


def confusion_counts(labels: list[int], predictions: list[int], num_labels: int) -> np.ndarray:
    """counts[i][j]: rows whose true label is i and predicted label j (every class, even one never seen)."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(labels, predictions, labels=list(range(num_labels)))


def confusion_matrix_png(counts, label_names: list[str], path: str | Path, title: str = "") -> Path:
    """Counts in the cells; colour = share of the true class's rows (row-normalised), so a rare class's
    mistakes show as clearly as a common one's."""
    counts = np.asarray(counts)
    n = len(label_names)
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape, dtype=float), where=totals > 0)
    size = min(max(4.0, 0.5 * n + 2), 20.0)
    fig = _figure(figsize=(size + 1, size))
    ax = fig.add_subplot()
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="share of the true class's rows")
    ax.set_xticks(range(n), label_names, rotation=45 if n > 2 else 0, ha="right" if n > 2 else "center")
    ax.set_yticks(range(n), label_names)
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    ax.set_title(title or f"Confusion matrix ({int(counts.sum())} rows)")
    if n <= MAX_ANNOTATED:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", color="white" if shares[i, j] > 0.5 else "black")
    return _save(fig, path)


def curves_png(panels: dict[str, dict[str, tuple[list, list]]], path: str | Path, xlabel: str = "optimizer step",
               title: str = "") -> Path:
    """One panel per key of `panels` (its y-axis label); in each, one line per series name -> (xs, ys).
    A series of a single point is drawn as a marker."""
    fig = _figure(figsize=(6 * len(panels), 4.5))
    for ax, (ylabel, series) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels.items()):
        for name, (xs, ys) in series.items():
            ax.plot(xs, ys, label=name, marker="o" if len(xs) < 30 else None, markersize=3)
        _label(ax, xlabel, ylabel, bool(series))
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def learning_curves_png(step_log: list[dict], history: list[dict], metric: str, path: str | Path, title: str = "") -> Path:
    """Left: training loss per optimizer step (`fit`'s step_log) and validation loss per evaluation (its history);
    right: validation `metric` per evaluation."""
    steps, losses = [s["step"] for s in step_log], [s["loss"] for s in step_log]
    window = max(1, len(losses) // 20)  # per-step losses are noisy: the trend is the mean of the last ~5% of steps
    loss = {"training loss (per step)": (steps, losses),
            **({f"training loss (mean of the last {window} steps)": (steps, moving_average(losses, window))} if window > 1 else {}),
            "validation loss": ([h["step"] for h in history], [h["eval_loss"] for h in history])}
    score = {f"validation {metric}": ([h["step"] for h in history], [h[f"eval_{metric}"] for h in history])}
    return curves_png({"loss": loss, metric: score}, path, title=title)


def moving_average(values: list[float], window: int) -> list[float]:
    """The mean of each value and the up to window-1 before it (a trailing mean: the first points average fewer)."""
    sums = np.concatenate([[0.0], np.cumsum(np.asarray(values, dtype=float))])
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(0, ends - window)
    return ((sums[ends] - sums[starts]) / (ends - starts)).tolist()


def errorbar_png(series: dict[str, tuple[list, list, list]], path: str | Path, xlabel: str, ylabel: str,
                 xticks: list | None = None, logx: bool = False, connect: bool = True,
                 notes: dict[str, list[str]] | None = None, title: str = "") -> Path:
    """One series per name -> (xs, means, standard deviations), drawn as points with error bars.

    xticks: labels for the x positions 0, 1, ... (xs are then those positions); logx: log-scale x axis;
    connect: join a series' points with a line; notes: per series, a short text beside each point."""
    fig = _figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for name, (xs, means, sds) in series.items():
        ax.errorbar(xs, means, yerr=sds, label=name, marker="o", markersize=4, capsize=3, linestyle="-" if connect else "none")
        for x, y, note in zip(xs, means, (notes or {}).get(name, [])):
            ax.annotate(note, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if xticks is not None:
        ax.set_xticks(range(len(xticks)), [str(t) for t in xticks])
    if logx:
        ax.set_xscale("log")
    _label(ax, xlabel, ylabel, bool(series))
    if title:
        ax.set_title(title)
    return _save(fig, path)


def _figure(figsize: tuple) -> Figure:
    # Imported when a picture is drawn, after training: the training loop does not carry matplotlib in memory.
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, dpi=DPI, layout="constrained")


def _label(ax, xlabel: str, ylabel: str, legend: bool) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend()


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    fig.savefig(path, format="png")
    return path


def scatter_png(targets, predictions, names: list[str], path: str | Path, title: str = "") -> Path:
    """Regression: predicted against true value, one panel per target, with the diagonal (a perfect prediction)."""
    targets, predictions = np.asarray(targets, dtype=float), np.asarray(predictions, dtype=float)
    targets, predictions = targets.reshape(len(targets), -1), predictions.reshape(len(predictions), -1)
    k = targets.shape[1]
    fig = _figure(figsize=(4.5 * k + 0.5, 4.5))
    for j, ax in enumerate(fig.subplots(1, k, squeeze=False)[0]):
        t, p = targets[:, j], predictions[:, j]
        ax.scatter(t, p, s=6, alpha=0.4)
        low, high = float(min(t.min(), p.min())), float(max(t.max(), p.max()))
        ax.plot([low, high], [low, high], color="grey", linewidth=1, label="prediction = target")
        _label(ax, f"true {names[j]}", f"predicted {names[j]}", True)
    fig.suptitle(title or f"Predictions against targets ({len(targets)} rows)")
    return _save(fig, path)


def per_label_png(scores: dict[str, list[float]], names: list[str], support: list[int], path: str | Path, title: str = "") -> Path:
    """Multi-label: per label (one row each, with its positive rows), a bar per score (precision, recall, F1)."""
    n = len(names)
    fig = _figure(figsize=(7, min(max(3.0, 0.3 * n + 1.5), 30.0)))
    ax = fig.add_subplot()
    height = 0.8 / max(1, len(scores))
    for i, (metric, values) in enumerate(scores.items()):
        ax.barh(np.arange(n) + i * height, values, height=height, label=metric)
    ax.set_yticks(np.arange(n) + height * (len(scores) - 1) / 2, [f"{name} ({s})" for name, s in zip(names, support)])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    _label(ax, "score", "label (positive rows)", True)
    ax.set_title(title or "Per-label scores")
    return _save(fig, path)


def reliability_png(bins: list[dict], path: str | Path, title: str = "", ece: float | None = None) -> Path:
    """Reliability diagram (hftl/trust.py's bins): per confidence bin, the share of outcomes that came true against
    the mean confidence, beside the diagonal a calibrated model follows; bar widths are the bins, their shade the rows."""
    fig = _figure(figsize=(5, 5))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="calibrated")
    if bins:
        most = max(b["rows"] for b in bins)
        for b in bins:
            ax.bar(b["low"], b["outcome"], width=b["high"] - b["low"], align="edge", color="tab:blue",
                   alpha=0.3 + 0.7 * b["rows"] / most, edgecolor="black", linewidth=0.5)
        ax.plot([b["confidence"] for b in bins], [b["outcome"] for b in bins], marker="o", color="tab:orange",
                label="mean confidence per bin")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    _label(ax, "confidence (predicted probability)", "share right (or label present)", True)
    ax.set_title(title or ("Reliability" + (f" (ECE {ece:.3f})" if ece is not None else "")))
    return _save(fig, path)
