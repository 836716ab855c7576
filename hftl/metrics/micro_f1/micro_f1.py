"""Multi-label: F1 over every (row, label) decision pooled (micro average)."""
from sklearn.metrics import f1_score

from hftl.metrics import make_module

SCIKIT = """@article{scikit-learn, title={Scikit-learn: Machine Learning in {P}ython}, author={Pedregosa, F. and others}, journal={JMLR}, volume={12}, pages={2825--2830}, year={2011}}"""
Metric = make_module("micro_f1", f1_score, SCIKIT, inputs="multi_hot", average="micro")
