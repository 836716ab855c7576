"""Whether to trust a run: the checks every run reports beside its scores (issue 21).

Each check asks the task (hftl/tasks/) what it means for its kind of target, so single-label, multi-label and
regression runs all get them:

- majority baseline: the task's one constant prediction made from the training split (`Task.majority`: the most
  frequent class, each label's majority, the training mean), scored with the task's own metrics on every evaluated
  split; `Task.above_baseline` says whether the model is clearly above it (and what "clearly" is);
- collapse: `Task.collapse`, how much of a split's predictions are one and the same (one class, one label set, a
  near-constant number); train.fail_on_collapse=true makes a collapsed split an error before output.dir is written;
- per-class precision / recall / F1 / support (`Task.card_rows`) for every evaluated split;
- calibration: expected calibration error (`Task.calibration`) and a reliability diagram; train.calibrate=true fits
  a temperature on validation first (`Task.calibrate`, folded into the saved head).

`assess` gathers them into one record (results.json's "checks"), the card's Checks section and the log's lines.
"""
from __future__ import annotations

import math

import numpy as np
import torch

# Calibration error: confidences are put in this many equal-width bins (Guo et al. 2017 use 15).
ECE_BINS = 15
# train.calibrate searches the temperature in this range (log scale); a perfectly separated validation split would
# push it to 0, an uninformative one to infinity.
TEMPERATURE_RANGE = (0.05, 20.0)
# The card lists every class up to this many; beyond, the CARD_EXTREMES worst and best by F1 (all are in results.json).
CARD_CLASSES = 20
CARD_EXTREMES = 5
RELIABILITY_PNG = "reliability_diagram.png"


# ---------------------------------------------------------------- helpers the tasks use


def wilson_lower(successes: float, n: int, z: float = 1.96) -> float:
    """The lower end of the Wilson score interval (95% by default) of a proportion successes / n."""
    if n == 0:
        return 0.0
    p = successes / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - spread) / (1 + z * z / n)


def reliability(confidence: np.ndarray, outcome: np.ndarray, bins: int = ECE_BINS) -> tuple[float, list[dict]]:
    """(expected calibration error, the bins): confidences in `bins` equal-width bins on [0, 1]; ECE is the rows'
    share-weighted mean |mean confidence - mean outcome| over the bins (outcome: 1 when the prediction was right, or
    for one binary label, when the label applies)."""
    confidence, outcome = np.asarray(confidence, dtype=np.float64).ravel(), np.asarray(outcome, dtype=np.float64).ravel()
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        inside = which == b
        n = int(inside.sum())
        if n:
            conf, acc = float(confidence[inside].mean()), float(outcome[inside].mean())
            ece += n / len(confidence) * abs(conf - acc)
            rows.append({"low": b / bins, "high": (b + 1) / bins, "rows": n, "confidence": conf, "outcome": acc})
    return float(ece), rows


def fit_temperature(loss, logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T > 0 that minimises `loss(logits / T, labels)` (the validation negative log-likelihood):
    Guo et al. 2017's temperature scaling, one number for the whole model, searched on log T in TEMPERATURE_RANGE."""
    from scipy.optimize import minimize_scalar

    z, y = torch.as_tensor(np.asarray(logits), dtype=torch.float64), torch.as_tensor(np.asarray(labels))
    low, high = (math.log(v) for v in TEMPERATURE_RANGE)
    best = minimize_scalar(lambda log_t: float(loss(z / math.exp(log_t), y)), bounds=(low, high), method="bounded",
                           options={"xatol": 1e-5})
    return float(math.exp(best.x))


# ---------------------------------------------------------------- the checks of one run


def _verdict(ok: bool | None) -> str:
    return "not assessed" if ok is None else "ok" if ok else "warning"


def assess(task, labelled: dict, result: dict, overfitting: str, domain_gap: dict | None) -> dict:
    """Every check of a run. `labelled`: split -> rows with the encoded 'labels' ('train' and each evaluated split);
    `result`: hftl.train.fit's (its predictions and logits, after `Task.calibrate`). Returns the record written to
    results.json["checks"]: majority_baseline, collapse, per_class, calibration (by split), and `list`, one entry per
    check with its verdict (ok / warning / not assessed) and a sentence."""
    from . import metrics as metrics_lib

    modules = metrics_lib.load_metrics(list(task.metric_names))  # the task's own metrics, whatever train.metrics lists
    constant = task.majority(task.references(task.labels_of(labelled["train"])))
    record = {"majority_baseline": {}, "collapse": {}, "per_class": {}, "calibration": {}, "list": []}
    checks = record["list"]
    checks.append({"check": "overfitting", "split": "validation",
                   "verdict": _verdict(None if overfitting.startswith("Not assessed") else not overfitting.startswith("Signs")),
                   "text": overfitting})
    for split, predictions in result["predictions"].items():
        references = task.references(task.labels_of(labelled[split]))
        n = len(references)
        model = task.compute(modules, predictions, references)
        baseline = task.compute(modules, task.constant_predictions(constant, references), references)
        above, text = task.above_baseline(model, baseline, n)
        record["majority_baseline"][split] = {"prediction": task.describe_constant(constant), "model": model, "baseline": baseline,
                                              "clearly_above": above, "text": text}
        checks.append({"check": "majority baseline", "split": split, "verdict": _verdict(above), "text": text})
        collapse = task.collapse(predictions, references)
        record["collapse"][split] = collapse
        checks.append({"check": "collapse", "split": split, "verdict": _verdict(None if collapse["collapsed"] is None else not collapse["collapsed"]),
                       "text": collapse["text"]})
        record["per_class"][split] = task.card_rows(references, predictions)
        calibration = task.calibration(result["logits"][split], references)
        if calibration is not None:
            record["calibration"][split] = calibration
            after = f" ({calibration['ece_uncalibrated']:.4f} before temperature scaling, T={task.temperature:.3f})" \
                if task.temperature != 1.0 else ""
            checks.append({"check": "calibration", "split": split, "verdict": "ok" if calibration["ece"] <= ECE_WARN else "warning",
                           "text": f"expected calibration error {calibration['ece']:.4f}{after}, {calibration['what']}; "
                                   + ("at most" if calibration["ece"] <= ECE_WARN else "above") + f" {ECE_WARN:g}."})
    if domain_gap:
        checks.append({"check": "domain mismatch", "split": "target", "verdict": "ok" if domain_gap.get("a_distance", 0) < DOMAIN_WARN else "warning",
                       "text": f"proxy A-distance {domain_gap['a_distance']:.2f}, MMD {domain_gap['mmd']:.3f}. {domain_gap.get('reading', '')}".strip()})
    return record


# A calibration error above this is called a warning (confidences off by more than 5 points on average).
ECE_WARN = 0.05
# A proxy A-distance at or above this (of 0..2) is called a warning: where hftl.domain.reading starts to call it a
# domain shift (moderate from 0.5, large from 1.5).
DOMAIN_WARN = 0.5


def collapsed(record: dict) -> list[str]:
    """The splits whose predictions collapsed."""
    return [s for s, c in record["collapse"].items() if c["collapsed"]]


def card_tables(task, record: dict) -> dict:
    """split -> {'columns', 'rows' (the card's), 'left_out'}: every class up to CARD_CLASSES, else the CARD_EXTREMES
    worst and best by F1 (the rest are in results.json)."""
    tables = {}
    for split, rows in record["per_class"].items():
        if not rows:
            continue
        columns = [k for k in rows[0] if k != "name"]
        shown, note = rows, ""
        if len(rows) > CARD_CLASSES and "f1" in columns:
            ranked = sorted(range(len(rows)), key=lambda i: (rows[i]["f1"], -rows[i]["support"]))
            keep = sorted(set(ranked[:CARD_EXTREMES]) | set(ranked[-CARD_EXTREMES:]), key=lambda i: rows[i]["f1"])
            shown = [dict(rows[i], id=i) for i in keep]
            note = (f"the {CARD_EXTREMES} worst and {CARD_EXTREMES} best of {len(rows)} by F1; every one is in results.json "
                    "(checks.per_class)")
        else:
            shown = [dict(r, id=i) for i, r in enumerate(rows)]
        tables[split] = {"columns": columns, "rows": shown, "note": note}
    return tables


def log_lines(record: dict) -> list[str]:
    return [f"check {c['check']} ({c['split']}): {c['verdict'].upper()}: {c['text'].removeprefix('Not assessed: ')}"
            for c in record["list"]]
