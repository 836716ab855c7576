"""Shared fixtures: a tiny BERT checkpoint built at test time, a toy sentiment data set, config helpers.

Everything runs offline on CPU. Hugging Face caches (datasets Arrow files, evaluate modules, the
feature cache) go to a throw-away HF_HOME so runs neither read nor pollute the user's cache.
"""
from __future__ import annotations

import csv
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

# Before anything imports huggingface_hub / datasets / transformers: they read these at import time.
_HF_HOME = tempfile.mkdtemp(prefix="hftl-tests-hf-")
os.environ["HF_HOME"] = _HF_HOME
os.environ.pop("HF_DATASETS_CACHE", None)
os.environ.pop("HF_MODULES_CACHE", None)
os.environ.pop("HF_HUB_CACHE", None)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# Tiny models gain nothing from more threads, and on a busy 2-core machine OpenMP threads that
# spin-wait for each other make a run several times slower. Subprocesses inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

POSITIVE = ["good", "great", "fine", "happy", "nice"]
NEGATIVE = ["bad", "awful", "sad", "poor", "ugly"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
LETTERS = "abcdefghijklmnopqrstuvwxyz"
VOCAB = SPECIALS + POSITIVE + NEGATIVE + list(LETTERS) + ["##" + c for c in LETTERS]


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_HF_HOME, ignore_errors=True)


# ---------------------------------------------------------------- tiny checkpoint


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BERT base model (no classifier) with a WordPiece tokenizer for the toy words."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_bert")
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    torch.manual_seed(0)
    # transformers 5 ignores BertTokenizerFast(vocab_file=...) (every word becomes [UNK]); reading
    # the folder that holds vocab.txt builds the WordPiece tokenizer from it.
    tokenizer = BertTokenizerFast.from_pretrained(str(folder))
    assert tokenizer.convert_ids_to_tokens(tokenizer("great awful")["input_ids"]) == ["[CLS]", "great", "awful", "[SEP]"]
    config = BertConfig(
        vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=37, max_position_embeddings=64,
        # At the default 0.02 a frozen random backbone maps both classes to nearly the same
        # features and head mode cannot learn; 0.2 keeps the toy words apart.
        initializer_range=0.2,
    )
    BertModel(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def sentiment(tmp_path_factory, tiny_bert) -> Path:
    """The tiny BERT with the embeddings of the positive and negative words pushed apart along one direction, as
    pretraining on sentiment would: its features carry the toy rows' labels (test_rank, test_tokens)."""
    from transformers import AutoTokenizer, BertModel

    folder = tmp_path_factory.mktemp("sentiment_bert")
    model = BertModel.from_pretrained(tiny_bert)
    torch.manual_seed(1)
    direction = torch.randn(model.config.hidden_size)
    with torch.no_grad():
        for words, sign in ((POSITIVE, 1), (NEGATIVE, -1)):
            model.embeddings.word_embeddings.weight[[VOCAB.index(w) for w in words]] += sign * direction
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- toy data


def toy_rows(n: int, seed: int) -> list[dict]:
    """n rows alternating positive/negative, each 1-3 words from that class's list."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        words = POSITIVE if label == "positive" else NEGATIVE
        rows.append({"text": " ".join(rng.choice(words) for _ in range(rng.randint(1, 3))), "label": label})
    return rows


def write_rows(path: Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    """Write rows as csv, tsv, jsonl, json (records) or parquet, chosen by the path's suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = columns or (list(rows[0]) if rows else ["text", "label"])
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, columns, delimiter="\t" if suffix == ".tsv" else ",")
            writer.writeheader()
            writer.writerows(rows)
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows) if rows else pa.table({c: pa.array([], pa.string()) for c in columns}), path)
    else:
        raise ValueError(f"write_rows: unsupported suffix {suffix}")
    return path


@pytest.fixture(scope="session")
def toy_rows_train() -> list[dict]:
    return toy_rows(64, seed=0)


@pytest.fixture(scope="session")
def toy_rows_validation() -> list[dict]:
    return toy_rows(16, seed=1)


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory, toy_rows_train, toy_rows_validation) -> dict[str, Path]:
    """{'train': train.csv (64 rows), 'validation': validation.csv (16 rows)}; labels are strings."""
    folder = tmp_path_factory.mktemp("toy_sentiment")
    return {
        "train": write_rows(folder / "train.csv", toy_rows_train),
        "validation": write_rows(folder / "validation.csv", toy_rows_validation),
    }


@pytest.fixture(scope="session")
def make_cfg(tiny_bert, toy_data):
    """make_cfg(tmp_path, **overrides) -> Config for a quick run of the tiny BERT on the toy data.

    Overrides use dotted keys with '__' for '.', e.g. make_cfg(tmp, adapt__mode="lora"), or a
    dict in `extra` for keys that are not identifiers."""
    from hftl.config import load_config

    def make(tmp_path: Path, extra: dict | None = None, **overrides):
        values = {
            "model.name_or_path": str(tiny_bert),
            "data.train_file": str(toy_data["train"]),
            "data.validation_file": str(toy_data["validation"]),
            "data.max_length": 16,
            "output.dir": str(Path(tmp_path) / "out"),
            "train.batch_size": 8,
            "train.eval_batch_size": 32,
            "train.learning_rate": "0.005",
            "train.epochs": 4,
            "train.min_steps": None,  # exactly train.epochs: tests count steps (the minimum is tests/test_features.py's)
            "train.log_every": 1000,
        }
        values.update({k.replace("__", "."): v for k, v in overrides.items()})
        values.update(extra or {})
        return load_config(None, [f"{k}={_yaml_value(v)}" for k, v in values.items()])

    return make


def _yaml_value(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(str(x) for x in v) + "]"
    return str(v)


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def card_results(card_text: str) -> dict[str, dict[str, float]]:
    """The model card's results table ('| split | examples | metric | ... |') as {split: {metric: value}}."""
    lines = card_text[card_text.index("| split | examples |"):].split("\n\n")[0].splitlines()
    names = [c.strip() for c in lines[0].strip().strip("|").split("|")][2:]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines[2:]]
    return {r[0]: {n: float(v) for n, v in zip(names, r[2:])} for r in rows}
