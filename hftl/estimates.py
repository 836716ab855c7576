"""Transferability estimates: how well a frozen checkpoint's features suit a labelled task, without training.

Both read the features a classification head would (one vector per training row) and the row labels,
and take seconds where fine-tuning takes hours, so `hftl rank` can order candidate checkpoints first.
"""
from __future__ import annotations

import numpy as np

# Added to the fixed-point denominators, as in the reference implementation: a target the features fit
# exactly (zero residual) or ignore (zero weights) would otherwise divide by zero.
_EPSILON = 1e-5


def logme(features, labels, max_iter: int = 1000, tol: float = 1e-7) -> float:
    """LogME (You et al., ICML 2021, "LogME: Practical Assessment of Pre-trained Models for Transfer Learning").

    For each class, the one-vs-rest target t (1 for the class, 0 otherwise) is modelled as a Bayesian linear
    regression on the features F: w ~ N(0, I/alpha), t ~ N(F w, I/beta). alpha and beta are set to maximise the
    evidence p(t | F, alpha, beta) by MacKay's fixed-point updates, which need only one SVD of F, shared by all
    classes. Returns the mean over classes of the maximised log evidence divided by the number of rows.

    Higher is better: the labels are more probable under a linear model of these features. The value is a log
    density per row (usually negative), comparable across checkpoints on the same rows and labels, not across tasks.

    Follows thuml/LogME's `_fit_fixed_point`, with one change: where F has rank k below its width D (fewer
    rows than feature dimensions, or dependent features), the reference's D/2 log(alpha) term counts D-k
    directions that carry no data; here the determinant covers exactly the k that do, so the value is the
    exact log evidence, as tests/test_estimates.py checks against a direct Gaussian density. The reference
    also stops after 11 iterations; here the updates run to convergence.
    """
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    n = len(f)
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    keep = s > s.max(initial=0.0) * max(f.shape) * np.finfo(np.float64).eps  # numerical rank, as np.linalg.matrix_rank
    u, sigma = u[:, keep], s[keep] ** 2  # sigma: the nonzero eigenvalues of F^T F
    k = len(sigma)
    evidences = []
    for c in np.unique(y):
        t = (y == c).astype(np.float64)
        x2 = (u.T @ t) ** 2  # t's energy along each direction F spans
        outside = t @ t - x2.sum()  # and outside them: no weights can fit it

        def fit(lam):
            """||m||^2 and ||t - F m||^2 for the posterior mean m at prior/noise ratio lam = alpha / beta."""
            return (sigma * x2 / (sigma + lam) ** 2).sum(), (x2 * (lam / (sigma + lam)) ** 2).sum() + outside

        alpha, beta = 1.0, 1.0
        for _ in range(max_iter):
            lam = alpha / beta
            gamma = (sigma / (sigma + lam)).sum()  # effective number of parameters the data determine
            m2, res2 = fit(lam)
            alpha, beta = gamma / (m2 + _EPSILON), (n - gamma) / (res2 + _EPSILON)
            if abs(alpha / beta - lam) <= tol * lam:
                break
        m2, res2 = fit(alpha / beta)
        evidence = (k / 2 * np.log(alpha) + n / 2 * np.log(beta) - 0.5 * np.log(alpha + beta * sigma).sum()
                    - beta / 2 * res2 - alpha / 2 * m2 - n / 2 * np.log(2 * np.pi))
        evidences.append(evidence / n)
    return float(np.mean(evidences))


def hscore(features, labels, shrink: bool = True) -> float:
    """H-score (Bao et al., ICIP 2019, "An Information-theoretic Approach to Transferability in Task Transfer
    Learning"): tr(cov(f)^-1 cov(E[f | y])), the share of the features' variance that the class explains,
    summed over directions whitened by the feature covariance.

    Higher is better; it lies between 0 (class means coincide) and (number of classes - 1) (classes fully
    separated by their means).

    shrink=True (default) is the regularised H-score of Ibrahim et al. (NeurIPS 2022, "Newer is not always
    better"): cov(f) is the Ledoit-Wolf shrinkage estimate (1-a) S + a (tr S / D) I (sklearn), and cov(E[f | y])
    is scaled by the same (1-a). With fewer rows than feature dimensions the plain sample covariance is
    singular and its pseudo-inverse makes any features, even noise, look perfectly separable (score
    classes - 1); shrinkage keeps the inverse well-conditioned. shrink=False: the original score with the
    pseudo-inverse of the sample covariance.
    """
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    f = f - f.mean(axis=0)
    if shrink:
        from sklearn.covariance import ledoit_wolf

        cov, a = ledoit_wolf(f, assume_centered=True)
    else:
        cov, a = f.T @ f / len(f), 0.0
    classes, index, counts = np.unique(y, return_inverse=True, return_counts=True)
    means = np.stack([f[index == i].mean(axis=0) for i in range(len(classes))])
    # cov(E[f | y]) = sum_c p_c m_c m_c^T, so its trace against cov^-1 is sum_c p_c m_c^T cov^-1 m_c.
    whitened = means @ np.linalg.pinv(cov, hermitian=True)
    return float((1 - a) * np.sum(counts / len(f) * np.einsum("cd,cd->c", whitened, means)))
