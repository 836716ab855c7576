"""Accuracy: the share of predictions equal to the reference."""
from sklearn.metrics import accuracy_score

from hftl.metrics import make_module

SCIKIT = """@article{scikit-learn, title={Scikit-learn: Machine Learning in {P}ython}, author={Pedregosa, F. and others}, journal={JMLR}, volume={12}, pages={2825--2830}, year={2011}}"""
Accuracy = make_module("accuracy", accuracy_score, SCIKIT)
