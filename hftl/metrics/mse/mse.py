"""Regression: mean squared error, averaged over targets."""
from sklearn.metrics import mean_squared_error

from hftl.metrics import make_module

SCIKIT = """@article{scikit-learn, title={Scikit-learn: Machine Learning in {P}ython}, author={Pedregosa, F. and others}, journal={JMLR}, volume={12}, pages={2825--2830}, year={2011}}"""
Metric = make_module("mse", mean_squared_error, SCIKIT, inputs="values")
