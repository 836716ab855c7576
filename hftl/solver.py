"""Solve the head on frozen features instead of training it (adapt.solve_head).

On a frozen backbone the head sees fixed features, so a linear head is a convex problem: multinomial
logistic regression, which scikit-learn's L-BFGS solves to convergence in seconds. Its one real choice is the
L2 penalty, picked here on the validation split by `train.metric_for_best` from a grid (strongest penalty first,
each fit warm-started from the last), or by stratified cross-validation on the training rows when validation is
too small to tell the values apart. Features are standardised for the solver and the scaling is folded back into
the weights, so the result is an ordinary linear layer on the raw features: it is written into the model's own
head modules (a chain of linear layers, e.g. BERT's `classifier`, wav2vec2's `projector` + `classifier`) and the
saved folder stays a standard one. AdamW for a fixed number of epochs (adapt.solve_head=false) stops wherever the
epochs end, at an unregularised point, which is how head mode lost 13 points on SST-2 to a ten-line baseline.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

# Inverse L2 strengths, strongest penalty first: 1e-4 .. 1e2 in decades; the best is then refined half a decade either
# side (features are standardised, so the useful range is about the same for every checkpoint).
GRID = tuple(float(10.0 ** k) for k in range(-4, 3))
MIN_VALIDATION = 20  # fewer validation rows than this (or than 2 per label) cannot rank the grid: cross-validate
FOLDS = 5
WIDEN = 3  # at most this many decades beyond either end of the grid
FINAL_TOL = 1e-6  # the chosen C's fit: converged, not just ranked
PATIENCE = 2  # grid values in a row scoring below the best before the walk towards weaker penalties stops


@dataclass
class Solution:
    weight: np.ndarray  # (labels, features), acting on raw features
    bias: np.ndarray  # (labels,)
    c: float  # the chosen inverse L2 strength
    path: list[dict]  # one entry per grid value: {"C": ..., "score": ...}
    selected_on: str  # "validation" or "cross-validation (k folds)"


def _standardise(x: np.ndarray) -> tuple[np.ndarray, float]:
    """Centre, and scale every feature by one number (the features' root-mean-square deviation): the penalty grid then
    means the same for any checkpoint's feature scale, and the geometry is kept. Per-feature scaling would stretch the
    directions that vary least, which with a few rows are mostly noise (SST-2, 8 rows per class, 6 draws: 59.8% against
    60.5% with one scale, 72.3% against 72.7% at 64 per class)."""
    mean = x.mean(0)
    scale = float(np.sqrt(((x - mean) ** 2).mean()))
    return mean, scale if scale > 1e-12 else 1.0


def _logistic(c: float, seed: int, tol: float = 1e-4, max_iter: int = 1000):
    from sklearn.linear_model import LogisticRegression

    # lbfgs is multinomial for more than two labels. Choosing C, scikit-learn's default tolerance is enough to rank
    # the values, and with few rows and a weak penalty (separable rows, the optimum at infinity) max_iter bounds the
    # walk; the chosen C is then solved tightly (FINAL_TOL).
    return LogisticRegression(C=c, max_iter=max_iter, tol=tol, random_state=seed, warm_start=True)


def _as_logits(clf, mean: np.ndarray, std: np.ndarray, num_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """The fitted model as (W, b) on raw features, with one row per label even where scikit-learn keeps one for two
    labels (then the two logits are -z/2 and z/2, whose softmax is its sigmoid(z))."""
    coef, intercept = clf.coef_ / std, clf.intercept_ - (clf.coef_ / std) @ mean
    full_w, full_b = np.zeros((num_labels, coef.shape[1])), np.zeros(num_labels)
    if coef.shape[0] == 1:  # binary: classes_ = [a, b], z is the logit of b
        a, b = clf.classes_
        full_w[a], full_w[b], full_b[a], full_b[b] = -coef[0] / 2, coef[0] / 2, -intercept[0] / 2, intercept[0] / 2
    else:
        full_w[clf.classes_], full_b[clf.classes_] = coef, intercept
    absent = np.setdiff1d(np.arange(num_labels), clf.classes_)
    full_b[absent] = -1e4  # a label the training rows never have is never predicted (the solver never saw it)
    return full_w, full_b


def solve_logistic(x: np.ndarray, y: np.ndarray, num_labels: int, x_val: np.ndarray, y_val: np.ndarray, score,
                   seed: int = 0, grid=GRID) -> Solution:
    """Logistic regression on (x, y) with C chosen by score(classifier, features, labels) -> float (higher is better)
    on (x_val, y_val), or by cross-validation on (x, y) when validation is too small. When the best C lies at an end
    of the grid, the grid is widened that way (half a decade at a time, up to WIDEN times) while the score improves."""
    x, x_val = np.asarray(x, dtype=np.float32), np.asarray(x_val, dtype=np.float32)
    y, y_val = np.asarray(y), np.asarray(y_val)
    mean, std = _standardise(x)
    z, z_val = (x - mean) / std, (x_val - mean) / std
    counts = np.bincount(y, minlength=num_labels)
    folds = int(min(FOLDS, counts[counts > 0].min()))
    if len(y_val) >= max(MIN_VALIDATION, 2 * num_labels) or (folds < 2 and len(y_val)):
        held_out = [(np.arange(len(y)), None)]  # fit on every training row, score on validation
        selected_on = "validation"
    elif folds < 2:  # a label with a single row and no validation: nothing to select C on
        clf = _logistic(1.0, seed, tol=FINAL_TOL, max_iter=5000).fit(z, y)
        weight, bias = _as_logits(clf, mean, std, num_labels)
        return Solution(weight, bias, 1.0, [], "no selection (a label has one training row and there is no validation split)")
    else:
        from sklearn.model_selection import StratifiedKFold

        held_out = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(z, y))
        selected_on = f"cross-validation ({folds} folds of the training rows)"
    # One warm-started model per fold, walked from strong to weak penalty.
    models = [_logistic(grid[0], seed) for _ in held_out]

    def evaluate(c: float) -> float:
        scores = []
        for clf, (rows, held) in zip(models, held_out):
            clf.set_params(C=c)
            clf.fit(z[rows], y[rows])
            scores.append(score(clf, z_val, y_val) if held is None else score(clf, z[held], y[held]))
        return float(np.mean(scores))

    # Walk from strong to weak penalty and stop once PATIENCE values in a row score below the best so far: the score
    # over C rises to one peak and falls (SST-2's full path: 79.6, 80.1, 80.7 at C=1e-3, then 80.6 ... 80.0), and the
    # weak-penalty fits are the slow ones (8x the iterations of C=1e-3), so the walk skips most of the cost.
    path, behind = [], 0
    for c in grid:
        path.append({"C": c, "score": evaluate(c)})
        best_score = max(e["score"] for e in path)
        behind = behind + 1 if path[-1]["score"] < best_score else 0
        if behind >= PATIENCE:
            break
    # An optimum at an end of the grid may lie beyond it (a walk that stopped early has two values after its best).
    for _ in range(WIDEN):
        best = max(range(len(path)), key=lambda i: (path[i]["score"], -i))
        if best not in (0, len(path) - 1) or len(path) == 1:
            break
        lower = best == 0
        c = path[best]["C"] / 10 if lower else path[best]["C"] * 10
        entry, previous = {"C": c, "score": evaluate(c)}, path[best]["score"]
        path.insert(0 if lower else len(path), entry)
        if entry["score"] <= previous:
            break
    if len(grid) > 1:  # then half a decade either side of the best
        best = max(range(len(path)), key=lambda i: (path[i]["score"], -i))
        for c in (path[best]["C"] / 10 ** 0.5, path[best]["C"] * 10 ** 0.5):
            path.append({"C": c, "score": evaluate(c)})
        path.sort(key=lambda e: e["C"])
    # The best score; among equals the strongest penalty (the first), which generalises at least as well.
    best = max(range(len(path)), key=lambda i: (path[i]["score"], -i))
    clf = _logistic(path[best]["C"], seed, tol=FINAL_TOL, max_iter=5000).fit(z, y)
    weight, bias = _as_logits(clf, mean, std, num_labels)
    return Solution(weight, bias, path[best]["C"], path, selected_on)


def solve_one_vs_rest(x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, score, seed: int = 0,
                      grid=GRID) -> Solution:
    """Multi-label: one binary logistic regression per label (y: n x labels of 0/1), one C for all, chosen by
    score(logits_fn, features, labels) -> float (higher is better) on (x_val, y_val), or on a held-out fifth of the
    training rows when validation has fewer than MIN_VALIDATION rows. A label that the training rows never have (or
    always have) gets no model: a constant logit of -1e4 (or 1e4)."""
    x, x_val = np.asarray(x, dtype=np.float32), np.asarray(x_val, dtype=np.float32)
    y, y_val = np.asarray(y).round().astype(int), np.asarray(y_val).round().astype(int)
    mean, std = _standardise(x)
    z, z_val = (x - mean) / std, (x_val - mean) / std
    if len(y_val) >= MIN_VALIDATION:
        rows, held, selected_on = np.arange(len(y)), None, "validation"
    else:
        order = np.random.default_rng(seed).permutation(len(y))
        cut = max(1, len(y) // FOLDS)
        rows, held, selected_on = order[cut:], order[:cut], "a held-out fifth of the training rows"
    varying = [j for j in range(y.shape[1]) if 0 < y[rows, j].sum() < len(rows)]

    def fit(c: float, fit_rows, models=None, tol=1e-4, max_iter=1000):
        models = models or {j: _logistic(c, seed, tol, max_iter) for j in varying}
        w, b = np.zeros((y.shape[1], z.shape[1])), np.where(y[fit_rows].mean(0) > 0.5, 1e4, -1e4)
        for j, clf in models.items():
            clf.set_params(C=c)
            clf.fit(z[fit_rows], y[fit_rows, j])
            w[j], b[j] = clf.coef_[0], clf.intercept_[0]
        return w, b, models

    models, path = None, []
    for c in grid:  # strongest penalty first, each fit warm-started from the last
        w, b, models = fit(c, rows, models)
        features, labels = (z_val, y_val) if held is None else (z[held], y[held])
        path.append({"C": c, "score": float(score(lambda f: f @ w.T + b, features, labels))})
    best = max(range(len(path)), key=lambda i: (path[i]["score"], -i))
    w, b, _ = fit(path[best]["C"], np.arange(len(y)), tol=FINAL_TOL, max_iter=5000)
    weight = w / std
    return Solution(weight, b - weight @ mean, path[best]["C"], path, selected_on)


RIDGE_GRID = tuple(float(10.0 ** k) for k in range(-6, 2))  # ridge penalty per training row (alpha / n), weakest first


def solve_ridge(x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, score, seed: int = 0,
                grid=RIDGE_GRID) -> Solution:
    """Ridge regression of y (n x targets) on x, its penalty chosen by score(predict, features, targets) -> float
    (higher is better) on (x_val, y_val), or by 5-fold cross-validation on (x, y) when validation has fewer than
    MIN_VALIDATION rows. One SVD per fit gives every penalty's solution in closed form. `Solution.c` is the inverse
    penalty 1 / (alpha / n), as for the logistic solver."""
    x, x_val = np.asarray(x, dtype=np.float64), np.asarray(x_val, dtype=np.float64)
    y, y_val = np.asarray(y, dtype=np.float64).reshape(len(x), -1), np.asarray(y_val, dtype=np.float64).reshape(len(x_val), -1)
    mean, std = _standardise(x)
    z, z_val = (x - mean) / std, (x_val - mean) / std

    def fit(rows: np.ndarray):
        zr, yr = z[rows], y[rows]
        zm, ym = zr.mean(0), yr.mean(0)
        u, s, vt = np.linalg.svd(zr - zm, full_matrices=False)
        uty = u.T @ (yr - ym)

        def solution(penalty: float) -> tuple[np.ndarray, np.ndarray]:
            w = vt.T @ ((s / (s ** 2 + penalty * len(rows)))[:, None] * uty)  # (features, targets)
            return w, ym - zm @ w
        return solution

    if len(y_val) >= MIN_VALIDATION:
        folds, selected_on = [(np.arange(len(y)), None)], "validation"
    elif len(y) >= 2 * FOLDS:
        from sklearn.model_selection import KFold

        folds = list(KFold(FOLDS, shuffle=True, random_state=seed).split(z))
        selected_on = f"cross-validation ({FOLDS} folds of the training rows)"
    else:
        folds, selected_on = [], "no selection (too few rows to hold any out)"
    fits = [(fit(rows), held) for rows, held in folds]

    def evaluate(penalty: float) -> float:
        values = []
        for solution, held in fits:
            w, b = solution(penalty)
            features, targets = (z_val, y_val) if held is None else (z[held], y[held])
            values.append(score(lambda f: f @ w + b, features, targets))
        return float(np.mean(values))

    path = [{"C": 1.0 / a, "score": evaluate(a)} for a in grid] if fits else []
    best = max(range(len(path)), key=lambda i: (path[i]["score"], -path[i]["C"])) if path else None
    penalty = 1.0 / path[best]["C"] if path else 1e-2
    w, b = fit(np.arange(len(y)))(penalty)
    weight = (w / std).T  # (targets, features) on raw features
    bias = b - weight @ mean
    return Solution(weight, bias, 1.0 / penalty, path, selected_on)


def linear_chain(layers: list[nn.Module], num_labels: int) -> bool:
    """Whether `layers` (a head's modules, applied in order) are linear layers that can carry any (labels x features)
    map: each one nn.Linear with a bias, every intermediate width at least the number of labels."""
    return bool(layers) and all(isinstance(m, nn.Linear) and m.bias is not None for m in layers) \
        and all(m.out_features >= num_labels for m in layers[:-1]) and layers[-1].out_features == num_labels


@torch.no_grad()
def write_into(layers: list[nn.Module], weight: np.ndarray, bias: np.ndarray) -> None:
    """Make the chain of linear `layers` compute x -> weight @ x + bias: the first layer computes it in its first
    rows (the rest zero), each later one passes those rows on."""
    k = weight.shape[0]
    for i, layer in enumerate(layers):
        layer.weight.zero_(), layer.bias.zero_()
        if i == 0:
            layer.weight[:k] = torch.as_tensor(weight, dtype=layer.weight.dtype)
            layer.bias[:k] = torch.as_tensor(bias, dtype=layer.bias.dtype)
        else:
            layer.weight[:k, :k] = torch.eye(k, dtype=layer.weight.dtype)
