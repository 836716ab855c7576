"""What audio and images share: a media column read as files, and every file decoded once before training.

The column is cast to its datasets feature (Audio, Image) with decode=False, so each row is
{'path', 'bytes'} and hftl decodes it itself: a file that fails then names its row and path, and
`data.on_bad_sample` decides whether the run stops or leaves the row out.
"""
from __future__ import annotations

from typing import Callable

from datasets import Dataset, DatasetDict, Value

from ..config import ConfigError
from . import DataError

POLICIES = ("error", "skip")


def as_files(splits: DatasetDict, column: str, feature) -> DatasetDict:
    """Every split's `column` as files (see `as_file_column`)."""
    return DatasetDict({split: as_file_column(ds, column, feature) for split, ds in splits.items()})


def as_file_column(ds: Dataset, column: str, feature) -> Dataset:
    """`column` (a datasets Audio/Image feature, or file paths) as `feature(decode=False)`: rows {'path', 'bytes'}."""
    if getattr(ds.features[column], "dtype", None) == "large_string":  # how csv paths arrive; Audio/Image cast from 'string'
        ds = ds.cast_column(column, Value("string"))
    return ds.cast_column(column, feature(decode=False))


def name_of(value) -> str:
    """A file's name for messages: its path, else the size of the bytes stored in the row."""
    if not value:
        return "<no file>"
    return value.get("path") or f"<{len(value.get('bytes') or b'')} bytes stored in the data set>"


def reason(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def check(splits: DatasetDict, column: str, probe: Callable, policy: str, what: str) -> tuple[DatasetDict, dict[str, list[str]]]:
    """Decode every row's file with `probe`, which raises on a bad one; stop there, or leave such rows out.

    Returns the splits without the bad rows and, per split with any, the ids of the rows left out."""
    if policy not in POLICIES:
        raise ConfigError(f"data.on_bad_sample='{policy}'; expected one of {', '.join(POLICIES)}.")
    kept, skipped = {}, {}
    for split, ds in splits.items():
        good, bad = [], []
        for start in range(0, len(ds), 256):  # a batch at a time: Hub data keeps the bytes in the rows
            for i, value in enumerate(ds[start:start + 256][column], start):
                try:
                    probe(value)
                    good.append(i)
                except Exception as e:  # whatever the decoder raises: the file is unusable
                    if policy == "error":
                        raise DataError(
                            f"the {split} split, row {i}: cannot read {what} file '{name_of(value)}' ({reason(e)}). "
                            f"Replace or remove it, or set data.on_bad_sample=skip to leave such rows out."
                        ) from e
                    bad.append(f"{split} row {i}: {name_of(value)} ({reason(e)})")
        if not good:
            raise DataError(f"no {what} file of the {split} split can be read (first: {bad[0]}); check data.{what}_column and the files.")
        kept[split] = ds.select(good) if bad else ds
        if bad:
            skipped[split] = bad
    return DatasetDict(kept), skipped
