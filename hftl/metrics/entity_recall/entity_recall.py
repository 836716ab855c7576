"""Token classification: entity-level recall, seqeval's default (CoNLL) conventions."""
from hftl.metrics.entities import make_module, scores

Metric = make_module("entity_recall", lambda references, predictions: scores(references, predictions)["recall"], "entity-level recall")
