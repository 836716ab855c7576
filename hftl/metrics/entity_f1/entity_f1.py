"""Token classification: entity-level F1 (micro over entities), seqeval's default (CoNLL) conventions."""
from hftl.metrics.entities import make_module, scores

Metric = make_module("entity_f1", lambda references, predictions: scores(references, predictions)["f1"], "entity-level F1 (micro over entities)")
