"""hftl.data.load_splits: file formats, label mapping, carving validation, and preflight errors."""
from __future__ import annotations

import re
from collections import Counter

import datasets
import pytest
from datasets import ClassLabel, Dataset, Features, Value

from conftest import toy_rows, write_rows
from hftl.config import DataConfig
from hftl.data import DataError, load_splits
from hftl.tasks.single_label import label_names_of

datasets.disable_progress_bars()


def names(dd, split="train"):
    return dd[split].features["labels"].names


def decoded(dd, split):
    """(text, label name) per row."""
    ds = dd[split]
    feature = ds.features["labels"]
    return [(t, feature.int2str(i)) for t, i in zip(ds["text"], ds["labels"])]


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".json", ".parquet"])
def test_formats_load(tmp_path, suffix):
    train = toy_rows(20, seed=3) + [{"text": "good, nice\tand fine", "label": "positive"}]  # separators inside a field
    valid = toy_rows(6, seed=4)
    cfg = DataConfig(train_file=str(write_rows(tmp_path / f"train{suffix}", train)),
                     validation_file=str(write_rows(tmp_path / f"validation{suffix}", valid)))
    dd, source = load_splits(cfg, seed=0)
    assert set(dd) == {"train", "validation"}
    assert names(dd) == ["negative", "positive"]
    assert decoded(dd, "train") == [(r["text"], r["label"]) for r in train]  # row order and content kept
    assert decoded(dd, "validation") == [(r["text"], r["label"]) for r in valid]
    assert isinstance(dd["train"].features["labels"], ClassLabel)
    assert "label" not in dd["train"].column_names  # replaced by the integer 'labels'
    assert source == tmp_path.name


def test_test_file_loads(tmp_path):
    cfg = DataConfig(train_file=str(write_rows(tmp_path / "tr.csv", toy_rows(10, 0))),
                     validation_file=str(write_rows(tmp_path / "va.csv", toy_rows(4, 1))),
                     test_file=str(write_rows(tmp_path / "te.csv", toy_rows(6, 2))))
    dd, _ = load_splits(cfg, seed=0)
    assert set(dd) == {"train", "validation", "test"}
    assert len(dd["test"]) == 6
    assert names(dd, "test") == names(dd)


def test_string_labels_sorted_from_train(tmp_path):
    # 'zebra' first in the file, but ids follow the sorted names
    train = [{"text": "a", "label": "zebra"}, {"text": "b", "label": "apple"}, {"text": "c", "label": "mango"}]
    valid = [{"text": "d", "label": "mango"}, {"text": "e", "label": "zebra"}]
    cfg = DataConfig(train_file=str(write_rows(tmp_path / "tr.csv", train)), validation_file=str(write_rows(tmp_path / "va.csv", valid)))
    dd, _ = load_splits(cfg, seed=0)
    assert names(dd) == ["apple", "mango", "zebra"]
    assert names(dd, "validation") == ["apple", "mango", "zebra"]  # validation uses train's mapping
    assert list(dd["train"]["labels"]) == [2, 0, 1]
    assert list(dd["validation"]["labels"]) == [1, 2]


def test_validation_with_subset_of_labels_keeps_train_mapping(tmp_path):
    train = [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}, {"text": "c", "label": "z"}]
    valid = [{"text": "d", "label": "z"}]
    cfg = DataConfig(train_file=str(write_rows(tmp_path / "tr.csv", train)), validation_file=str(write_rows(tmp_path / "va.csv", valid)))
    dd, _ = load_splits(cfg, seed=0)
    assert names(dd, "validation") == ["x", "y", "z"]
    assert list(dd["validation"]["labels"]) == [2]


def test_int_labels_with_label_names(tmp_path):
    train = [{"text": f"t{i}", "label": i % 2} for i in range(6)]
    valid = [{"text": "v0", "label": 1}, {"text": "v1", "label": 0}]
    cfg = DataConfig(train_file=str(write_rows(tmp_path / "tr.jsonl", train)),
                     validation_file=str(write_rows(tmp_path / "va.jsonl", valid)),
                     label_names=["negative", "positive"])
    dd, _ = load_splits(cfg, seed=0)
    assert names(dd) == ["negative", "positive"]  # given order, not sorted
    assert list(dd["train"]["labels"]) == [0, 1, 0, 1, 0, 1]
    assert decoded(dd, "validation") == [("v0", "positive"), ("v1", "negative")]


def test_int_labels_without_names(tmp_path):
    train = [{"text": f"t{i}", "label": i % 3} for i in range(6)]
    cfg = DataConfig(train_file=str(write_rows(tmp_path / "tr.csv", train)),
                     validation_file=str(write_rows(tmp_path / "va.csv", train[:3])))
    dd, _ = load_splits(cfg, seed=0)
    assert names(dd) == ["0", "1", "2"]
    assert list(dd["train"]["labels"]) == [0, 1, 2, 0, 1, 2]


def test_int_label_names_too_few(tmp_path):
    train = [{"text": f"t{i}", "label": i % 3} for i in range(6)]
    cfg = DataConfig(train_file=str(write_rows(tmp_path / "tr.csv", train)),
                     validation_file=str(write_rows(tmp_path / "va.csv", train[:3])), label_names=["a", "b"])
    with pytest.raises(DataError, match="label_names"):
        load_splits(cfg, seed=0)


def test_label_names_refused_for_string_labels(tmp_path):
    cfg = DataConfig(train_file=str(write_rows(tmp_path / "tr.csv", toy_rows(6, 0))),
                     validation_file=str(write_rows(tmp_path / "va.csv", toy_rows(2, 1))), label_names=["a", "b"])
    with pytest.raises(DataError, match="label_names"):
        load_splits(cfg, seed=0)


def _classlabel_parquet(path, texts, ids, label_names):
    features = Features({"text": Value("string"), "label": ClassLabel(names=label_names)})
    Dataset.from_dict({"text": texts, "label": ids}, features=features).to_parquet(str(path))
    return path


def test_classlabel_labels(tmp_path):
    # ClassLabel order is kept as is (not sorted): 'pos' is id 0
    label_names = ["pos", "neg", "neutral"]
    train = _classlabel_parquet(tmp_path / "tr.parquet", ["a", "b", "c", "d"], [0, 1, 2, 1], label_names)
    valid = _classlabel_parquet(tmp_path / "va.parquet", ["e", "f"], [1, 0], label_names)
    assert isinstance(datasets.load_dataset("parquet", data_files=str(train), split="train").features["label"], ClassLabel)
    dd, _ = load_splits(DataConfig(train_file=str(train), validation_file=str(valid)), seed=0)
    assert names(dd) == label_names
    assert list(dd["train"]["labels"]) == [0, 1, 2, 1]
    assert decoded(dd, "validation") == [("e", "neg"), ("f", "pos")]


def test_label_names_of_classlabel_in_memory():
    ds = Dataset.from_dict({"text": ["a", "b"], "label": [1, 0]},
                           features=Features({"text": Value("string"), "label": ClassLabel(names=["b_second", "a_first"])}))
    assert label_names_of(ds, DataConfig()) == ["b_second", "a_first"]


# ---------------------------------------------------------------- carving validation


def _unbalanced(tmp_path, n_pos=60, n_neg=40):
    rows = [{"text": f"pos {i}", "label": "positive"} for i in range(n_pos)] + [{"text": f"neg {i}", "label": "negative"} for i in range(n_neg)]
    return write_rows(tmp_path / "train.csv", rows)


def test_validation_carved_stratified_with_right_sizes(tmp_path):
    cfg = DataConfig(train_file=str(_unbalanced(tmp_path)), validation_fraction=0.2)
    dd, _ = load_splits(cfg, seed=0)
    assert len(dd["train"]) == 80 and len(dd["validation"]) == 20
    val = Counter(label for _, label in decoded(dd, "validation"))
    assert val == {"positive": 12, "negative": 8}  # same 60:40 proportion as the whole file
    tr = Counter(label for _, label in decoded(dd, "train"))
    assert tr == {"positive": 48, "negative": 32}
    # a partition: no row in both, none lost
    assert set(dd["train"]["text"]).isdisjoint(dd["validation"]["text"])
    assert len(set(dd["train"]["text"]) | set(dd["validation"]["text"])) == 100


def test_validation_carve_is_seeded(tmp_path):
    cfg = DataConfig(train_file=str(_unbalanced(tmp_path)), validation_fraction=0.2)
    a, _ = load_splits(cfg, seed=1)
    b, _ = load_splits(cfg, seed=1)
    c, _ = load_splits(cfg, seed=2)
    assert list(a["validation"]["text"]) == list(b["validation"]["text"])
    assert list(a["train"]["text"]) == list(b["train"]["text"])
    assert sorted(a["validation"]["text"]) != sorted(c["validation"]["text"])


def test_validation_fraction_out_of_range(tmp_path):
    cfg = DataConfig(train_file=str(_unbalanced(tmp_path)), validation_fraction=0.0)
    with pytest.raises(DataError, match="validation_fraction"):
        load_splits(cfg, seed=0)


def test_max_samples(tmp_path):
    cfg = DataConfig(train_file=str(_unbalanced(tmp_path)), validation_fraction=0.2, max_train_samples=10, max_eval_samples=5)
    dd, _ = load_splits(cfg, seed=0)
    assert len(dd["train"]) == 10 and len(dd["validation"]) == 5


# ---------------------------------------------------------------- text pairs


def test_text_pair_column(tmp_path, tiny_bert):
    from transformers import AutoTokenizer

    from hftl.data import text

    rows = [{"premise": "good", "hypothesis": "nice", "label": "same"}, {"premise": "bad", "hypothesis": "great", "label": "different"}] * 3
    cfg = DataConfig(train_file=str(write_rows(tmp_path / "tr.csv", rows)), validation_file=str(write_rows(tmp_path / "va.csv", rows[:2])),
                     text_column="premise", text_pair_column="hypothesis")
    dd, _ = load_splits(cfg, seed=0)
    assert list(dd["validation"]["premise"]) == ["good", "bad"] and list(dd["validation"]["hypothesis"]) == ["nice", "great"]
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_bert))
    encoded, _ = text.prepare(dd, tokenizer, cfg)
    first = encoded["validation"][0]
    assert tokenizer.convert_ids_to_tokens(first["input_ids"]) == ["[CLS]", "good", "[SEP]", "nice", "[SEP]"]
    assert first["token_type_ids"] == [0, 0, 0, 1, 1]
    assert text.inputs_for_pipeline(dd["validation"], cfg) == [{"text": "good", "text_pair": "nice"}, {"text": "bad", "text_pair": "great"}]


def test_missing_text_pair_column(tmp_path):
    cfg = DataConfig(train_file=str(write_rows(tmp_path / "tr.csv", toy_rows(4, 0))), validation_file=str(write_rows(tmp_path / "va.csv", toy_rows(2, 0))),
                     text_pair_column="hypothesis")
    with pytest.raises(DataError) as e:
        load_splits(cfg, seed=0)
    assert "'hypothesis'" in str(e.value) and "text_pair_column" in str(e.value)


# ---------------------------------------------------------------- preflight errors


def test_missing_column_names_existing_columns(tmp_path):
    cfg = DataConfig(train_file=str(write_rows(tmp_path / "tr.csv", toy_rows(4, 0))),
                     validation_file=str(write_rows(tmp_path / "va.csv", toy_rows(2, 0))), label_column="sentiment")
    with pytest.raises(DataError) as e:
        load_splits(cfg, seed=0)
    msg = str(e.value)
    assert "'sentiment'" in msg and "label_column" in msg
    assert "'text'" in msg and "'label'" in msg  # the columns that do exist
    assert "train" in msg


def test_missing_text_column_in_validation_only(tmp_path):
    valid = [{"sentence": "good", "label": "positive"}]
    cfg = DataConfig(train_file=str(write_rows(tmp_path / "tr.csv", toy_rows(4, 0))), validation_file=str(write_rows(tmp_path / "va.csv", valid)))
    with pytest.raises(DataError) as e:
        load_splits(cfg, seed=0)
    msg = str(e.value)
    assert "validation" in msg and "'text'" in msg and "'sentence'" in msg


def test_unseen_validation_label_is_named(tmp_path):
    valid = toy_rows(4, 1) + [{"text": "meh", "label": "neutral"}]
    cfg = DataConfig(train_file=str(write_rows(tmp_path / "tr.csv", toy_rows(8, 0))), validation_file=str(write_rows(tmp_path / "va.csv", valid)))
    with pytest.raises(DataError) as e:
        load_splits(cfg, seed=0)
    msg = str(e.value)
    assert "neutral" in msg
    assert "validation" in msg
    assert "row 4" in msg


def test_single_label_train_refused(tmp_path):
    rows = [{"text": "good", "label": "positive"}] * 4
    cfg = DataConfig(train_file=str(write_rows(tmp_path / "tr.csv", rows)), validation_file=str(write_rows(tmp_path / "va.csv", rows)))
    with pytest.raises(DataError, match="single label"):
        load_splits(cfg, seed=0)


def test_empty_label_refused(tmp_path):
    rows = toy_rows(4, 0) + [{"text": "x", "label": None}]
    cfg = DataConfig(train_file=str(write_rows(tmp_path / "tr.jsonl", rows)), validation_file=str(write_rows(tmp_path / "va.jsonl", toy_rows(2, 0))))
    with pytest.raises(DataError, match=r"empty label.*\[4\]"):
        load_splits(cfg, seed=0)


def _empty_file(folder, suffix):
    path = folder / f"va{suffix}"
    if suffix == ".jsonl":
        path.write_text("")
    else:
        write_rows(path, [], columns=["text", "label"])
    return path


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_empty_split_is_a_data_error(tmp_path, suffix):
    empty = _empty_file(tmp_path, suffix)
    cfg = DataConfig(train_file=str(write_rows(tmp_path / "tr.csv", toy_rows(4, 0))), validation_file=str(empty))
    with pytest.raises(DataError) as e:
        load_splits(cfg, seed=0)
    assert "validation_file" in str(e.value) and str(empty) in str(e.value)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_empty_split_file_says_empty(tmp_path, suffix):
    empty = _empty_file(tmp_path, suffix)
    cfg = DataConfig(train_file=str(write_rows(tmp_path / "tr.csv", toy_rows(4, 0))), validation_file=str(empty))
    with pytest.raises(DataError) as e:
        load_splits(cfg, seed=0)
    message = str(e.value).replace(str(tmp_path), "<tmp>")  # the tmp path holds this test's name
    assert re.search(r"\bempty\b", message), message


def test_missing_file(tmp_path):
    cfg = DataConfig(train_file=str(tmp_path / "nope.csv"))
    with pytest.raises(DataError) as e:
        load_splits(cfg, seed=0)
    assert "data.train_file" in str(e.value) and "nope.csv" in str(e.value) and "does not exist" in str(e.value)


def test_bad_suffix(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("text,label\ngood,positive\n")
    with pytest.raises(DataError) as e:
        load_splits(DataConfig(train_file=str(path)), seed=0)
    msg = str(e.value)
    assert "'.txt'" in msg and ".csv" in msg and ".parquet" in msg


def test_unparseable_file_names_it(tmp_path):
    path = tmp_path / "train.parquet"
    path.write_text("this is not parquet")
    with pytest.raises(DataError, match="train.parquet"):
        load_splits(DataConfig(train_file=str(path)), seed=0)


def test_no_data_given():
    with pytest.raises(DataError, match="no data given"):
        load_splits(DataConfig(), seed=0)


# ---------------------------------------------------------------- builtin


def test_builtin_vader_lexicon_offline():
    dd, source = load_splits(DataConfig(builtin="vader_lexicon"), seed=42)
    assert source == "vader_lexicon"
    assert names(dd) == ["negative", "positive"]
    assert len(dd["train"]) > 1000 and len(dd["validation"]) > 100
    for split in ("train", "validation"):
        counts = Counter(dd[split]["labels"])
        assert set(counts) == {0, 1}
    # every kept word is at least min_abs_rating from neutral, with the matching label
    for text_, rating, label in zip(dd["validation"]["text"], dd["validation"]["mean_rating"], dd["validation"]["labels"]):
        assert abs(rating) >= 1.0
        assert (rating > 0) == (label == 1), (text_, rating, label)
    row = dict(zip(list(dd["train"]["text"]) + list(dd["validation"]["text"]), list(dd["train"]["labels"]) + list(dd["validation"]["labels"])))
    assert row.get("good") == 1 and row.get("terrible") == 0


def test_builtin_unknown():
    with pytest.raises(ValueError, match="vader_lexicon"):
        load_splits(DataConfig(builtin="nope"), seed=0)
