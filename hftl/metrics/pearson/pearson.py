"""Regression: Pearson's linear correlation between predictions and targets (scipy.stats.pearsonr), averaged over targets."""
from scipy.stats import pearsonr

from hftl.metrics import make_module, per_target

SCIPY = """@article{scipy, title={{SciPy} 1.0: Fundamental Algorithms for Scientific Computing in Python}, author={Virtanen, P. and others}, journal={Nature Methods}, volume={17}, pages={261--272}, year={2020}}"""
Metric = make_module("pearson", per_target(pearsonr), SCIPY, inputs="values")
