"""Multi-label: the mean of the labels' F1 scores (macro average: a rare label counts as much as a common one)."""
from sklearn.metrics import f1_score

from hftl.metrics import make_module

SCIKIT = """@article{scikit-learn, title={Scikit-learn: Machine Learning in {P}ython}, author={Pedregosa, F. and others}, journal={JMLR}, volume={12}, pages={2825--2830}, year={2011}}"""
Metric = make_module("macro_f1", f1_score, SCIKIT, inputs="multi_hot", average="macro")
