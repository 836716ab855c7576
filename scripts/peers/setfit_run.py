"""One SetFit run (the peer in scripts/bench_fewshot.py), in .venv-peers (scripts/setup_peers.sh), never in hftl's
environment: train on a csv of labelled rows, score a csv, print one JSON line.

    .venv-peers/bin/python scripts/peers/setfit_run.py --train few.csv --eval validation.csv --model DIR --seed 0

SetFit's defaults (SetFit 1.2: CosineSimilarityLoss, 1 epoch, batch 16, body rate 2e-5, a LogisticRegression head),
with num_iterations=20 as in its README's few-shot examples. --template T --label-names A B ... adds two rows per
label with the text T filled with its name, as setfit.get_templated_dataset does (sample_size=2), before training. The seconds are the whole process, imports included,
as hftl's are.
"""
import argparse
import csv
import json
import time

START = time.perf_counter()

from datasets import Dataset  # noqa: E402
from setfit import SetFitModel, Trainer, TrainingArguments  # noqa: E402


def rows(path, text, label):
    with open(path, newline="") as f:
        data = list(csv.DictReader(f))
    return Dataset.from_dict({"text": [r[text] for r in data], "label": [r[label] for r in data]})


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--train", required=True)
    p.add_argument("--eval", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--template")
    p.add_argument("--label-names", nargs="+", help="--template: the name of label 0, 1, ... (the csv holds ids)")
    a = p.parse_args()
    train, test = rows(a.train, a.text_column, a.label_column), rows(a.eval, a.text_column, a.label_column)
    if a.template:
        added = [(a.template.format(name), str(i)) for i, name in enumerate(a.label_names) for _ in range(2)]
        train = Dataset.from_dict({"text": train["text"] + [t for t, _ in added], "label": train["label"] + [y for _, y in added]})
    model = SetFitModel.from_pretrained(a.model, local_files_only=True)
    args = TrainingArguments(num_iterations=a.iterations, seed=a.seed, report_to="none", save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=train)
    trainer.train()
    predicted = model.predict(test["text"], as_numpy=True)
    accuracy = float((predicted.astype(str) == [str(v) for v in test["label"]]).mean())
    print(json.dumps({"accuracy": accuracy, "seconds": time.perf_counter() - START, "train_rows": len(train)}))


if __name__ == "__main__":
    main()
