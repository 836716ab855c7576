"""Multi-label: the share of rows whose whole set of labels is predicted exactly (scikit-learn's accuracy on 0/1 rows)."""
from sklearn.metrics import accuracy_score

from hftl.metrics import make_module

SCIKIT = """@article{scikit-learn, title={Scikit-learn: Machine Learning in {P}ython}, author={Pedregosa, F. and others}, journal={JMLR}, volume={12}, pages={2825--2830}, year={2011}}"""
Metric = make_module("subset_accuracy", accuracy_score, SCIKIT, inputs="multi_hot")
