"""Token classification: entity-level precision, seqeval's default (CoNLL) conventions."""
from hftl.metrics.entities import make_module, scores

Metric = make_module("entity_precision", lambda references, predictions: scores(references, predictions)["precision"], "entity-level precision")
