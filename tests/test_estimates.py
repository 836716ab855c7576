"""Transferability estimates (hftl/estimates.py) against direct computations from their definitions."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.stats import multivariate_normal

from hftl.estimates import hscore, logme


def max_log_evidence(f: np.ndarray, labels: np.ndarray) -> float:
    """LogME by brute force: for each one-vs-rest target t, the Bayesian linear model w ~ N(0, I/alpha),
    t ~ N(F w, I/beta) has marginal t ~ N(0, I/beta + F F^T / alpha); maximise its log density over
    (log alpha, log beta) numerically from several starts, divide by n, average over classes."""
    n = len(f)
    out = []
    for c in np.unique(labels):
        t = (labels == c).astype(float)

        def negative(p):
            alpha, beta = np.exp(p)
            return -multivariate_normal(np.zeros(n), np.eye(n) / beta + f @ f.T / alpha).logpdf(t)

        runs = [minimize(negative, start, method="Nelder-Mead", options={"xatol": 1e-9, "fatol": 1e-11, "maxiter": 4000})
                for start in ((0.0, 0.0), (3.0, 1.0), (-3.0, 2.0))]
        out.append(-min(r.fun for r in runs) / n)
    return float(np.mean(out))


def informative(rng, n: int, d: int, classes: int, strength: float = 2.0):
    labels = np.arange(n) % classes
    f = rng.normal(size=(n, d))
    f[:, :classes] += strength * np.eye(classes)[labels]
    return f, labels


def test_logme_is_the_maximised_evidence():
    rng = np.random.default_rng(0)
    f, labels = informative(rng, 60, 5, 3)
    assert logme(f, labels) == pytest.approx(max_log_evidence(f, labels), rel=1e-3)


def test_logme_exact_where_features_are_rank_deficient():
    """Fewer independent directions (6) than dimensions (40): the reference implementation's D/2 log(alpha) would
    count 34 empty directions (it gives about +0.2 here, the true value is about -0.6)."""
    rng = np.random.default_rng(1)
    labels = np.arange(30) % 3
    latent = rng.normal(size=(30, 6)) + 1.5 * np.eye(3, 6)[labels]
    f = latent @ rng.normal(size=(6, 40))
    expected = max_log_evidence(f, labels)
    assert logme(f, labels) == pytest.approx(expected, rel=1e-3)
    assert expected < 0


def test_logme_ranks_informative_features_above_noise():
    rng = np.random.default_rng(2)
    f, labels = informative(rng, 200, 16, 4)
    noise = rng.normal(size=f.shape)
    assert logme(f, labels) > logme(noise, labels) + 0.1


def test_hscore_one_dimension_is_between_over_total_variance():
    """One feature: no shrinkage (Ledoit-Wolf's is 0), so H = var(E[f | y]) / var(f)."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, 100)
    f = labels * 0.7 + rng.normal(size=100)
    means = np.array([f[labels == c].mean() for c in range(3)])[labels]
    expected = np.var(means) / np.var(f)
    assert hscore(f[:, None], labels) == pytest.approx(expected, rel=1e-9)
    assert hscore(f[:, None], labels, shrink=False) == pytest.approx(expected, rel=1e-9)


def test_hscore_unshrunk_matches_the_definition():
    rng = np.random.default_rng(4)
    f, labels = informative(rng, 50, 4, 3, strength=1.0)
    g = np.stack([f[labels == c].mean(axis=0) for c in range(3)])[labels]  # E[f | y] row by row
    expected = np.trace(np.linalg.pinv(np.cov(f, rowvar=False)) @ np.cov(g, rowvar=False))
    assert hscore(f, labels, shrink=False) == pytest.approx(expected, rel=1e-9)


def test_hscore_known_extremes():
    """Features that are the one-hot label (plus tiny noise) separate the classes fully: H = classes - 1 = 2;
    noise features explain nothing: H near 0."""
    rng = np.random.default_rng(5)
    labels = np.arange(300) % 3
    onehot = np.eye(3)[labels] + 1e-3 * rng.normal(size=(300, 3))
    noise = rng.normal(size=(300, 3))
    for shrink in (True, False):
        assert hscore(onehot, labels, shrink=shrink) == pytest.approx(2.0, abs=0.02)
        assert hscore(noise, labels, shrink=shrink) < 0.1
    f, labels = informative(rng, 200, 16, 4)
    assert hscore(f, labels) > hscore(rng.normal(size=f.shape), labels) + 0.5


def test_hscore_shrinkage_keeps_noise_low_with_few_rows():
    """20 rows of 64-dimensional noise: the sample covariance is singular and the plain H-score calls the
    classes perfectly separable (classes - 1); the shrunk one does not."""
    rng = np.random.default_rng(6)
    labels = np.arange(20) % 2
    noise = rng.normal(size=(20, 64))
    assert hscore(noise, labels, shrink=False) == pytest.approx(1.0, abs=1e-6)
    assert hscore(noise, labels) < 0.3
