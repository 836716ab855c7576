"""How far data.target lies from the training rows, measured before training on the pretrained model's features.

Two standard measures on the pooled features the classification head would read (`hftl.cache.extract`, heads
removed), for equally many seeded-random rows of each domain:
- proxy A-distance (Ben-David et al. 2007; Ganin et al. 2016): 2 (1 - 2 err), where err is the cross-validated
  error of a logistic-regression domain classifier (source vs target). 0: the domains cannot be told apart;
  2: a linear classifier separates them perfectly.
- maximum mean discrepancy with a Gaussian kernel (bandwidth: median pairwise squared distance), the distance
  between the two feature distributions' kernel mean embeddings; 0 for identical ones.
Features are standardised over both domains together first, so no single large feature dimension decides.
`hftl train` measures it once the model is loaded, before any training, when data.target is given: training rows
against target rows, both prepared as training rows are; results.json and the card report it.
"""
from __future__ import annotations

import numpy as np
import torch

from .cache import _model_inputs, extract, heads_removed, rng_watch

MAX_ROWS = 1000  # per domain: enough for a stable estimate, a small fraction of a training epoch's forward passes
FOLDS = 5


def _both(source, target) -> np.ndarray:
    return np.concatenate([np.asarray(source, dtype=np.float64), np.asarray(target, dtype=np.float64)])


def target_probability(source, target, seed: int = 0, folds: int = FOLDS) -> np.ndarray:
    """p(target | x) for every row (source rows first) from a domain classifier (standardised logistic regression),
    out of fold: no row's probability comes from a classifier that saw it. Also what adapt.reweight weighs by."""
    # sklearn's model code is imported here, not at the top: a run without data.target never loads it.
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.array([0] * len(source) + [1] * len(target))
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    return cross_val_predict(classifier, _both(source, target), y, cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
                             method="predict_proba")[:, 1]


def proxy_a_distance(source, target, seed: int = 0) -> tuple[float, float]:
    """(proxy A-distance in [0, 2], the domain classifier's cross-validated balanced error)."""
    from sklearn.metrics import balanced_accuracy_score

    y = np.array([0] * len(source) + [1] * len(target))
    predicted = (target_probability(source, target, seed) > 0.5).astype(int)
    # Balanced: with unequal row counts, always guessing the larger domain would otherwise look like separation.
    error = 1 - balanced_accuracy_score(y, predicted)
    # A classifier worse than chance tells the domains apart no better than one at chance.
    return float(np.clip(2 * (1 - 2 * error), 0.0, 2.0)), float(error)


def mmd(source, target) -> float:
    """Gaussian-kernel MMD (square root of the biased MMD^2 estimate; 0 to sqrt(2)) on jointly standardised features."""
    from sklearn.metrics.pairwise import euclidean_distances, rbf_kernel
    from sklearn.preprocessing import StandardScaler

    x = StandardScaler().fit_transform(_both(source, target))
    squared = euclidean_distances(x, squared=True)
    median = np.median(squared[np.triu_indices(len(x), k=1)])
    k = rbf_kernel(x, gamma=1.0 / median if median > 0 else 1.0)
    n = len(source)
    mmd2 = k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()
    return float(np.sqrt(max(mmd2, 0.0)))


def reading(a_distance: float, adapting: bool = False) -> str:
    """The A-distance in plain words; `adapting`: the run already uses adapt.align / reweight / pretrain for it, so the
    words do not advise what it did."""
    if a_distance < 0.5:
        return "The target rows look much like the training rows to the pretrained model: little domain shift."
    if a_distance < 1.5:
        return ("A linear classifier partly tells target rows from training rows: a moderate domain shift; expect scores "
                "on the target to differ from validation.")
    advice = ("judge the run on labelled target rows" if adapting
              else "consider adapt.align, adapt.reweight or adapt.pretrain")
    return ("A linear classifier separates target rows from training rows almost perfectly: a large domain shift; "
            f"validation scores say little about the target ({advice}).")


def gap(source, target, seed: int = 0, adapting: bool = False) -> dict:
    """Both measures and their reading (`adapting`: as for `reading`) for two feature matrices (rows = examples)."""
    a, error = proxy_a_distance(source, target, seed)
    return {"a_distance": a, "domain_classifier_error": error, "mmd": mmd(source, target), "rows": min(len(source), len(target)),
            "reading": reading(a, adapting)}


def pooled_features(model, head: list[str], ds, collator, batch_size: int, accelerator) -> np.ndarray:
    """One feature vector per row: what the head reads, averaged over a row's windows (long audio clips)."""
    with torch.inference_mode(), heads_removed(model, head):
        model.eval()
        dim = model(**_model_inputs(collator([ds[0]]), accelerator.device)).logits.shape[-1]
    rows = extract(model, head, ds, collator, batch_size, accelerator, None, None, desc="Domain features")["features"]
    return np.stack([r.view(-1, dim).mean(0).numpy() for r in rows])


def estimate(model, head: list[str], source, target, collator, batch_size: int, accelerator, seed: int,
             adapting: bool = False) -> dict | None:
    """`gap` for up to MAX_ROWS seeded-random rows of each of two encoded splits (training rows, data.target's),
    equally many of each, logged; None (also logged) when either has fewer than FOLDS rows to cross-validate on.
    `adapting`: as for `reading`."""
    n = min(len(source), len(target), MAX_ROWS)
    if n < FOLDS:
        accelerator.print(f"domain mismatch not measured: it needs at least {FOLDS} training and {FOLDS} data.target rows, got {len(source)} and {len(target)}.")
        return None
    rng = np.random.default_rng(seed)
    model.to(accelerator.device)
    # Rows prepared as training rows are may draw random crops / augmentations: undo those draws, so that training
    # sees the same random numbers as without data.target.
    with rng_watch():
        features = [pooled_features(model, head, ds.select(sorted(rng.choice(len(ds), n, replace=False).tolist())),
                                    collator, batch_size, accelerator) for ds in (source, target)]
    result = gap(*features, seed=seed, adapting=adapting)
    accelerator.print(f"domain mismatch (data.target vs training rows, {n} of each): proxy A-distance {result['a_distance']:.2f}, "
                      f"MMD {result['mmd']:.3f}. {result['reading']}")
    return result
