"""Entity-level scores of IOB2 tag sequences with seqeval's default conventions (seqeval.metrics.f1_score etc. in
its default, non-strict mode, which is the CoNLL-2000 conlleval script's), written out so no dependency is needed.

Entities are (type, first word, last word) chunks of the rows joined by an 'O'; an I-X that follows neither B-X nor
I-X starts a chunk of its own, as conlleval reads it. Precision, recall and F1 pool every entity (micro average); a
score with nothing to divide by is 0 (seqeval's zero_division default warns and gives 0).
"""
from __future__ import annotations

import datasets
import evaluate


def _end_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    return (prev_tag in ("E", "S") or (prev_tag in ("B", "I") and tag in ("B", "S", "O"))
            or (prev_tag not in ("O", ".") and prev_type != type_))


def _start_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    return (tag in ("B", "S") or (prev_tag in ("E", "S", "O") and tag in ("E", "I"))
            or (tag not in ("O", ".") and prev_type != type_))


def entities(rows: list[list[str]]) -> list[tuple[str, int, int]]:
    """seqeval.metrics.sequence_labeling.get_entities over the rows joined by 'O': (type, start, end), end inclusive."""
    seq = [tag for row in rows for tag in [*row, "O"]]
    chunks, prev_tag, prev_type, begin = [], "O", "", 0
    for i, chunk in enumerate([*seq, "O"]):
        tag, type_ = chunk[0], chunk[1:].split("-", maxsplit=1)[-1] or "_"
        if _end_of_chunk(prev_tag, tag, prev_type, type_):
            chunks.append((prev_type, begin, i - 1))
        if _start_of_chunk(prev_tag, tag, prev_type, type_):
            begin = i
        prev_tag, prev_type = tag, type_
    return chunks


def _divide(a: int, b: int) -> float:
    return a / b if b else 0.0


def scores(references: list[list[str]], predictions: list[list[str]], kind: str | None = None) -> dict[str, float]:
    """{'precision', 'recall', 'f1', 'support'} over every entity (`kind`: only entities of that type)."""
    true, pred = set(entities(references)), set(entities(predictions))
    if kind is not None:
        true, pred = {e for e in true if e[0] == kind}, {e for e in pred if e[0] == kind}
    hit = len(true & pred)
    p, r = _divide(hit, len(pred)), _divide(hit, len(true))
    return {"precision": p, "recall": r, "f1": _divide(2 * p * r, p + r), "support": len(true)}


def types(rows: list[list[str]]) -> list[str]:
    """The entity types the rows' tags name (PER, LOC ...), sorted."""
    return sorted({t.split("-", 1)[1] for row in rows for t in row if "-" in t})


def accuracy(references: list[list[str]], predictions: list[list[str]]) -> float:
    """Share of words whose tag is right (seqeval's accuracy_score)."""
    pairs = [(r, p) for ref, pre in zip(references, predictions) for r, p in zip(ref, pre)]
    return _divide(sum(r == p for r, p in pairs), len(pairs))


def make_module(name: str, score, description: str):
    """An `evaluate.Metric` over rows of IOB2 tag names; `score(references, predictions) -> float`."""
    feature = datasets.Sequence(datasets.Value("string"))

    class EntityMetric(evaluate.Metric):
        def _info(self):
            return evaluate.MetricInfo(
                description=f"{name}: {description} (seqeval's default conventions for IOB2), shipped with hftl for offline use.",
                citation=SEQEVAL,
                inputs_description="predictions and references: lists of IOB2 tag names, one list per row, one tag per word.",
                features=datasets.Features({"predictions": feature, "references": feature}),
            )

        def _compute(self, predictions, references):
            return {name: float(score(references, predictions))}

    EntityMetric.__name__ = "".join(w.capitalize() for w in name.split("_"))
    return EntityMetric


SEQEVAL = """@misc{seqeval, title={{seqeval}: A Python framework for sequence labeling evaluation}, author={Hiroki Nakayama}, year={2018}, url={https://github.com/chakki-works/seqeval}}"""
