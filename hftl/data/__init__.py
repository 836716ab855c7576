"""Load labelled splits with `datasets`, fix the label mapping, and check them before training.

The result is always a DatasetDict with 'train' and 'validation' (and 'test' when asked), whose label column is
named ``labels``, encoded by the run's task (hftl/tasks/), which reads the label names from the training split.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import datasets
import pyarrow.parquet as pq
from datasets import ClassLabel, Dataset, DatasetDict, Value, concatenate_datasets
from datasets.exceptions import DatasetGenerationError

from ..config import DataConfig
from ..errors import UserError

FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class DataError(UserError, ValueError):
    """Bad input data; the message names the file/split, the column or row, and what was expected."""


# DataConfig keys whose column may hold media file paths (audio, images).
PATH_KEYS = ("audio_column", "image_column")


def _absolute_paths(ds: Dataset, columns, base: Path) -> Dataset:
    """A relative media path in a csv/json is relative to that file (as in audiofolder's metadata.csv)."""
    columns = [c for c in columns if c in ds.column_names and getattr(ds.features[c], "dtype", None) in ("string", "large_string")]
    if not columns:
        return ds

    def resolve(row):
        return {c: row[c] if row[c] is None or Path(row[c]).is_absolute() else str((base / row[c]).resolve()) for c in columns}

    return ds.map(resolve, desc="Resolving file paths")


def _parquet_rows(p: Path) -> int | None:
    try:
        return pq.ParquetFile(p).metadata.num_rows
    except Exception:  # not parquet at all: load_dataset below reports it with the file name
        return None


def _header(p: Path, fmt: str, delimiter: str) -> list[str]:
    """The column names a csv/tsv header or a parquet schema declares (json has no header: a key appears once per row)."""
    if fmt == "parquet":
        try:
            return pq.ParquetFile(p).schema_arrow.names
        except Exception:  # not parquet at all: load_dataset below reports it with the file name
            return []
    if fmt == "csv":
        with open(p, newline="", encoding="utf-8") as f:
            return next(csv.reader(f, delimiter=delimiter), [])
    return []


def _bad_utf8(p: Path) -> str | None:
    """Where a text file first stops being UTF-8: 'line N (byte offset B: 0x..)', or None when it is valid throughout."""
    offset, line, carry = 0, 1, b""
    with open(p, "rb") as f:
        while True:
            block = f.read(1 << 24)
            data, last = carry + block, not block
            try:
                data.decode("utf-8")
                carry = b""
            except UnicodeDecodeError as e:
                if e.reason == "unexpected end of data" and not last:  # a character cut by the block boundary: read on
                    data, carry = data[:e.start], data[e.start:]
                else:
                    line += data.count(b"\n", 0, e.start)
                    return f"line {line} (byte offset {offset + e.start}: 0x{data[e.start:e.start + 1].hex()})"
            if last:
                return None
            line, offset = line + data.count(b"\n"), offset + len(data)


def _bad_json(p: Path) -> str | None:
    """The first line of a JSON Lines file (or the place in a JSON document) that does not parse, or None."""
    text = p.read_text(encoding="utf-8")
    try:
        json.loads(text)
        return None  # one valid document: what is wrong is not its syntax
    except ValueError as e:
        if not text.lstrip().startswith("{"):  # one document (a list of records), not one object per line
            return f"line {e.lineno}, column {e.colno} (byte offset {len(text[:e.pos].encode())}) is not valid JSON ({e.msg})"
    offset = 0
    for n, line in enumerate(text.splitlines(keepends=True), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except ValueError as e:
                return f"line {n} (byte offset {offset}) is not a JSON object ({e.msg} at column {e.colno})"
            if not isinstance(row, dict):
                return f"line {n} (byte offset {offset}) is a JSON {type(row).__name__}, not an object (one row: {{'column': value, ...}})"
        offset += len(line.encode())
    return None


def _why_unreadable(p: Path, fmt: str, e: Exception) -> str:
    """What is wrong with a file load_dataset could not read: the first broken JSON line, else the reason the parser
    gave (datasets wraps it in 'An error occurred while generating the dataset')."""
    where = _bad_json(p) if fmt == "json" else None
    if where:
        return where
    while isinstance(e, DatasetGenerationError) and e.__cause__ is not None:
        e = e.__cause__
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _load_dataset(key: str, *args) -> DatasetDict:
    """`datasets.load_dataset(*args)` of a folder or a Hub data set; what it cannot read is one line naming data.<key>."""
    try:
        return datasets.load_dataset(*args)
    except Exception as e:  # EmptyDatasetError, DatasetNotFoundError, ConnectionError offline, a builder's parse error
        hint = (" (a Hub data set needs network; with HF_DATASETS_OFFLINE=1 only one already in the cache)"
                if key == "name" and not Path(args[0]).exists() else "")
        raise DataError(f"data.{key}: could not read '{args[0]}': {type(e).__name__}: "
                        f"{(str(e).strip().splitlines() or [''])[0]}{hint}.") from e


def _load_file(path: str, what: str, path_columns=()) -> Dataset:
    p = Path(path)
    if p.is_dir():
        raise DataError(f"data.{what}: '{path}' is a folder; give one csv/tsv/json/jsonl/parquet file "
                        f"(a folder of audio or images with class sub-folders is read with data.data_dir).")
    if not p.is_file():
        raise DataError(f"data.{what}: file '{path}' does not exist.")
    fmt = FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise DataError(f"data.{what}: '{path}' has suffix '{p.suffix}'; expected one of {', '.join(FORMATS)}.")
    kwargs = {"delimiter": "\t"} if p.suffix.lower() == ".tsv" else {}
    if p.stat().st_size == 0 or (fmt == "parquet" and _parquet_rows(p) == 0):
        raise DataError(f"data.{what}: '{path}' is empty: it has no rows; the split needs at least one.")
    # Before load_dataset: pandas reports a bad byte without saying where, and pyarrow's json reader stores it, to fail
    # later when a row is read. One pass over the file (about a second per GB).
    bad = _bad_utf8(p) if fmt in ("csv", "json") else None
    if bad:
        raise DataError(f"data.{what}: '{path}' is not UTF-8 text: {bad} is not valid UTF-8. Save the file as UTF-8.")
    header = _header(p, fmt, kwargs.get("delimiter", ","))
    twice = sorted({c for c in header if c and header.count(c) > 1})  # pandas names empty ones 'Unnamed: N' itself
    if twice:  # pandas would rename the second 'text' to 'text.1', and which one is read would be a guess
        raise DataError(f"data.{what}: '{path}' has column name(s) {twice} more than once in its header ({header}); "
                        "give every column its own name.")
    try:
        # load_dataset caches the Arrow conversion keyed by the file's content.
        ds = datasets.load_dataset(fmt, data_files=str(p), split="train", **kwargs)
    except Exception as e:  # pyarrow/pandas parse errors: say which file, and where in it
        if "corresponds to no data" in str(e):  # e.g. a csv with a header and no rows
            raise DataError(f"data.{what}: '{path}' is empty: it has no rows; the split needs at least one.") from e
        raise DataError(f"data.{what}: could not read '{path}' as {fmt}: {_why_unreadable(p, fmt, e)}.") from e
    return _absolute_paths(ds, path_columns, p.parent)


def check_source(cfg: DataConfig) -> None:
    """Exactly one source of labelled rows is set (called before the model loads, and again by load_raw)."""
    sources = [k for k in ("builtin", "train_file", "data_dir", "name") if getattr(cfg, k)]
    if len(sources) > 1:
        raise DataError(f"data: {', '.join('data.' + k for k in sources)} are all set; a run reads one source, so set the others to null.")
    if not sources:
        raise DataError("no data given: set data.train_file (local csv/tsv/json/jsonl/parquet), data.data_dir (local "
                        "audiofolder/imagefolder), data.name (Hub) or data.builtin.")


def load_raw(cfg: DataConfig, path_columns=()) -> tuple[dict[str, Dataset], str]:
    """Raw splits by role ('train', 'validation', 'test'; validation may be missing) and a source name.

    `path_columns` name columns that may hold media file paths, made absolute for csv/json files."""
    check_source(cfg)
    if cfg.builtin:
        from .builtin import load_builtin

        return load_builtin(cfg), cfg.builtin
    if cfg.train_file:
        splits = {"train": _load_file(cfg.train_file, "train_file", path_columns)}
        if cfg.validation_file:
            splits["validation"] = _load_file(cfg.validation_file, "validation_file", path_columns)
        if cfg.test_file:
            splits["test"] = _load_file(cfg.test_file, "test_file", path_columns)
        return splits, Path(cfg.train_file).parent.name or Path(cfg.train_file).stem
    if cfg.data_dir or cfg.name:
        name = cfg.data_dir or cfg.name
        if cfg.data_dir:
            if not Path(cfg.data_dir).is_dir():
                raise DataError(f"data.data_dir: folder '{cfg.data_dir}' does not exist.")
            # datasets picks the builder the files call for: audiofolder, imagefolder, csv, ...
            ds = _load_dataset("data_dir", cfg.data_dir)
        else:
            ds = _load_dataset("name", cfg.name, cfg.config_name)
        wanted = {"train": cfg.train_split, "validation": cfg.validation_split, "test": cfg.test_split}
        if cfg.train_split not in ds:
            raise DataError(f"data.train_split: '{name}' has no split '{cfg.train_split}'; it has {sorted(ds)}.")
        if cfg.test_split and cfg.test_split not in ds:
            raise DataError(f"data.test_split: '{name}' has no split '{cfg.test_split}'; it has {sorted(ds)}.")
        return {role: ds[s] for role, s in wanted.items() if s and s in ds}, Path(cfg.data_dir).resolve().name if cfg.data_dir else name
    raise AssertionError("unreachable: check_source found a source")


def label_columns(cfg: DataConfig) -> list[str]:
    """The columns that hold a row's label(s): data.label_columns, else data.label_column (token classification:
    data.tags_column, a list of tags per row)."""
    if cfg.problem_type == "token_classification":
        return [cfg.tags_column]
    return list(cfg.label_columns) if cfg.label_columns else [cfg.label_column]


def _check_columns(ds: Dataset, role: str, cfg: DataConfig, input_keys: tuple[str, ...], labelled: bool = True) -> None:
    if len(ds) == 0:
        raise DataError(f"the {role} split is empty; it needs at least one row.")
    for key in input_keys:
        col = getattr(cfg, key)
        if col and col not in ds.column_names:
            raise DataError(
                f"the {role} split has no column '{col}' (data.{key}); its columns are {ds.column_names}. "
                f"Set data.{key}=<one of those>."
            )
    if not labelled:
        return
    if cfg.label_columns is not None and len(cfg.label_columns) < 1:
        raise DataError("data.label_columns=[] names no column; give the label columns, or set it to null to read data.label_column.")
    key = "tags_column" if cfg.problem_type == "token_classification" else "label_columns" if cfg.label_columns else "label_column"
    missing = [c for c in label_columns(cfg) if c not in ds.column_names]
    if missing:
        named = f"column(s) {missing}" if cfg.label_columns else f"column '{missing[0]}'"
        raise DataError(f"the {role} split has no {named} (data.{key}); its columns are {ds.column_names}. "
                        f"Set data.{key} to {'some' if cfg.label_columns else 'one'} of those.")
    for col in label_columns(cfg):
        feature = ds.features[col]
        # A column of lists is a multi-label column (hftl/tasks/multi_label.py); records, images, ... are no labels.
        if not isinstance(feature, (ClassLabel, Value, datasets.Sequence, datasets.LargeList)):
            row, value = next(((i, v) for i, v in enumerate(ds[col]) if v is not None), (0, None))
            holds = "records" if isinstance(value, dict) else f"{type(feature).__name__} values"
            raise DataError(f"the {role} split's label column '{col}'{source_of(role, cfg)} holds {holds} "
                            f"(row {row}: {str(value)[:80]}), not labels: a class, a list of labels (multi-label) or a number "
                            "(regression) per row. Set data.label_column to the column that has them.")
        nulls = [i for i, v in enumerate(ds[col]) if v is None]
        if nulls:
            raise DataError(f"the {role} split has an empty label in column '{col}' at row(s) {nulls[:10]}"
                            f"{' (a row with no labels is [], not empty)' if isinstance(feature, datasets.Sequence) else ''}.")


def source_of(role: str, cfg: DataConfig) -> str:
    """' (file 'x.csv')' or ' of 'name'': where a split's rows come from, for messages."""
    file = {"train": cfg.train_file, "validation": cfg.validation_file or cfg.train_file, "test": cfg.test_file}.get(role)
    if file:
        return f" (file '{file}')"
    source = cfg.data_dir or cfg.name or cfg.builtin
    return f" of '{source}'" if source and role in ("train", "validation", "test") else ""


TEMPLATE_ROWS = 2  # rows per label that data.label_template adds (SetFit's get_templated_dataset: sample_size=2)


def with_label_rows(train: Dataset, cfg: DataConfig, input_keys: tuple[str, ...]) -> Dataset:
    """data.label_template: TEMPLATE_ROWS training rows per label whose text is the template filled with the label's
    name ('This sentence is positive.'), appended to the train split (the budget of data.samples_per_class is drawn
    first). Each added row copies a real row of its label for the other columns, so the features stay the same."""
    template = cfg.label_template
    if "text_column" not in input_keys:
        raise DataError("data.label_template writes sentences from the label names; it is for text data only (set it to null).")
    if cfg.text_pair_column:
        raise DataError("data.label_template makes single sentences, but the rows are pairs (data.text_pair_column); set one of them to null.")
    if template.count("{}") != 1:
        raise DataError(f"data.label_template={template!r} must hold exactly one '{{}}' where the label name goes, "
                        "e.g. 'This sentence is {}.'")
    names = train.features["labels"].names
    if all(n.lstrip("-").isdigit() for n in names):
        raise DataError(f"data.label_template fills in the label names, but they are numbers {names}: name them with "
                        "data.label_names (e.g. [negative, positive]) or set data.label_template=null.")
    labels = train["labels"]
    first = {y: i for i, y in reversed(list(enumerate(labels)))}
    rows = [first[y] for y in sorted(first) for _ in range(TEMPLATE_ROWS)]
    added = train.select(rows).map(lambda r: {cfg.text_column: template.format(names[r["labels"]])}, desc="label template rows")
    return concatenate_datasets([train, added])


def load_splits(cfg: DataConfig, seed: int, input_keys: tuple[str, ...] = ("text_column", "text_pair_column")) -> tuple[DatasetDict, str]:
    """`load_labelled` without its task: (splits, source)."""
    splits, source, _ = load_labelled(cfg, seed, input_keys)
    return splits, source


def load_labelled(cfg: DataConfig, seed: int, input_keys: tuple[str, ...] = ("text_column", "text_pair_column")):
    """Load, validate and label-encode the splits; carve validation from train when absent. Returns (splits, source, the
    task, hftl/tasks/, which read the labels and encoded them as 'labels').

    `input_keys` name the DataConfig fields holding the columns the modality reads (checked to exist)."""
    from .. import tasks

    raw, source = load_raw(cfg, [getattr(cfg, k) for k in input_keys if k in PATH_KEYS])
    for role, ds in raw.items():
        _check_columns(ds, role, cfg, input_keys)
    task = tasks.read(raw["train"], cfg)
    splits = {role: task.encode(ds, role, cfg) for role, ds in raw.items()}
    task.check_train(splits["train"], cfg)
    if "validation" not in splits and cfg.validation_fraction == 0 and "test" not in splits:
        raise DataError("data.validation_fraction=0 trains on every labelled row with no validation split, so results come from "
                        "a test split: give data.test_file (or data.test_split), or a validation split.")
    if "validation" not in splits and cfg.validation_fraction != 0:
        if not 0 < cfg.validation_fraction < 1:
            raise DataError(f"no validation split and data.validation_fraction={cfg.validation_fraction}; set it in (0, 1), give a "
                            "validation split, or set it to 0 to train on every row without one.")
        try:
            parts = splits["train"].train_test_split(test_size=cfg.validation_fraction, seed=seed,
                                                     stratify_by_column="labels" if task.stratify else None)
        except ValueError:  # a class too small to stratify: fall back to a plain seeded split
            parts = splits["train"].train_test_split(test_size=cfg.validation_fraction, seed=seed)
        task.check_carved(splits["train"], parts["train"], parts["test"], cfg)
        splits["train"], splits["validation"] = parts["train"], parts["test"]
        task.validation_carved = True
    if cfg.samples_per_class is not None:
        if cfg.samples_per_class < 1:
            raise DataError(f"data.samples_per_class={cfg.samples_per_class}; it must be at least 1 (null: every training row).")
        splits["train"] = task.per_class(splits["train"], cfg.samples_per_class, seed)
    if cfg.max_train_samples:
        splits["train"] = splits["train"].shuffle(seed=seed).select(range(min(cfg.max_train_samples, len(splits["train"]))))
        task.check_train(splits["train"], cfg, f" after data.max_train_samples={cfg.max_train_samples}")
    if cfg.label_template is not None:
        if task.name != "single_label":
            raise DataError(f"data.label_template writes one sentence per class name; the labels here are {task.name} "
                            "labels, not single classes: set data.label_template=null.")
        splits["train"] = with_label_rows(splits["train"], cfg, input_keys)
    if cfg.max_eval_samples:
        for role in ("validation", "test"):
            if role in splits:
                splits[role] = splits[role].select(range(min(cfg.max_eval_samples, len(splits[role]))))
    task.observe_train(splits["train"])
    return DatasetDict(splits), source, task


def load_target(cfg: DataConfig, task, input_keys: tuple[str, ...], check=None) -> tuple[DatasetDict, dict[str, list[str]]]:
    """data.target's rows as splits for `Modality.prepare`, and {'target': ids of rows `check` left out}.

    'train': every row with label 0, since its labels are never trained on: adapt.align and adapt.reweight read
    the inputs only, prepared as training rows are. 'target': only when the rows have data.label_column, their
    labels encoded by the run's task (hftl/tasks/; a list of label names: single-label), for a 'target' evaluation. `check(splits) -> (splits, skipped)`
    is the modality's media check. A file is read as data.train_file is, a folder as data.data_dir is (every split)."""
    if isinstance(task, list):
        from ..tasks.single_label import SingleLabel

        task = SingleLabel(task)
    path = Path(cfg.target)
    if path.is_dir():
        ds = datasets.concatenate_datasets(list(_load_dataset("target", str(path)).values()))
    else:
        ds = _load_file(cfg.target, "target", [getattr(cfg, k) for k in input_keys if k in PATH_KEYS])
    role = f"target (data.target '{cfg.target}')"
    labelled = all(c in ds.column_names for c in label_columns(cfg))
    _check_columns(ds, role, cfg, input_keys, labelled)
    ds = ds.select_columns([getattr(cfg, k) for k in input_keys if getattr(cfg, k)] + (label_columns(cfg) if labelled else []))
    if labelled:  # before decoding any media file: an unknown label is found at once
        ds = task.encode(ds, role, cfg)
    rows, skipped = check(DatasetDict(target=ds)) if check else (DatasetDict(target=ds), {})
    ds = rows["target"]
    inputs = ds.remove_columns("labels") if labelled else ds
    splits = DatasetDict(train=task.add_labels(inputs, task.blank(len(inputs))))
    if labelled:
        splits["target"] = ds
    return splits, skipped
