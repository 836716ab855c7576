"""The practitioner's baseline (scripts/bench_fewshot.py), in .venv-peers: the checkpoint's sentence-transformers
embeddings + scikit-learn LogisticRegression with its defaults (C=1). Prints one JSON line.

    .venv-peers/bin/python scripts/peers/embeddings_logreg.py --train train.csv --eval test.csv --model DIR
"""
import argparse
import csv
import json
import time

START = time.perf_counter()

from sentence_transformers import SentenceTransformer  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402


def rows(path):
    with open(path, newline="") as f:
        data = list(csv.DictReader(f))
    return [r["text"] for r in data], [r["label"] for r in data]


p = argparse.ArgumentParser()
p.add_argument("--train", required=True)
p.add_argument("--eval", required=True)
p.add_argument("--model", required=True)
p.add_argument("--seed", type=int, default=0)
a = p.parse_args()
model = SentenceTransformer(a.model, device="cpu", local_files_only=True)
(x, y), (xt, yt) = rows(a.train), rows(a.eval)
clf = LogisticRegression(max_iter=1000, random_state=a.seed).fit(model.encode(x), y)
accuracy = float((clf.predict(model.encode(xt)) == yt).mean())
print(json.dumps({"accuracy": accuracy, "seconds": time.perf_counter() - START, "train_rows": len(x)}))
