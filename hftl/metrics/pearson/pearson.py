"""Regression: Pearson's linear correlation between predictions and targets (scipy.stats.pearsonr), averaged over targets."""
import numpy as np
from scipy.stats import pearsonr

from hftl.metrics import make_module

SCIPY = """@article{scipy, title={{SciPy} 1.0: Fundamental Algorithms for Scientific Computing in Python}, author={Virtanen, P. and others}, journal={Nature Methods}, volume={17}, pages={261--272}, year={2020}}"""


def per_target_pearson(references, predictions) -> float:
    """The mean over target columns of the correlation; a constant column (no spread) correlates 0."""
    references, predictions = np.atleast_2d(references.T).T, np.atleast_2d(predictions.T).T
    values = [pearsonr(r, p).statistic if np.ptp(r) and np.ptp(p) else 0.0 for r, p in zip(references.T, predictions.T)]
    return float(np.mean(values))


Metric = make_module("pearson", per_target_pearson, SCIPY, inputs="values")
