"""Token classification: share of words tagged right (seqeval's accuracy_score)."""
from hftl.metrics.entities import accuracy, make_module

Metric = make_module("token_accuracy", accuracy, "share of words whose tag is right")
