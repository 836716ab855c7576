"""`hftl predict MODEL_DIR FILE` and `hftl evaluate MODEL_DIR FILE`: a trained classifier on new rows.

Both load the model folder as a run left it (read only: nothing is written into it), read the file with the same
loading and checks as training (hftl/data: `_load_file`, the column checks, the modality's media checks), prepare
the rows as training's evaluation did (`Modality.prepare`, length-sorted batches: `hftl.train.eval_dataloader`) and
ask the folder's task (`hftl.tasks.from_model_config`) what the outputs mean. So a folder of any task hftl trains
works without code here knowing the task.

The settings come from the folder's hftl_config.yaml (modality, data.* column names, max_length, eval batch size),
with key=value overrides on top; a folder hftl did not write (or a cached Hub id) gets the modality from its
architecture and the default column names.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, DatasetDict, concatenate_datasets
from tqdm.auto import tqdm

from . import modalities, models, pooling, tasks
from .config import Config, ConfigError, load_config, parse_override
from .data import FORMATS, PATH_KEYS, DataError, _check_columns, _load_dataset, _load_file, label_columns
from .errors import UserError
from .hub import OutputError
from .tasks.token_classification import WINDOW
from .train import average_windows, eval_dataloader, joined, pad_positions, token_slices

# What each modality's AutoModelFor*Classification maps to (transformers' own tables, by name: wav2vec2's audio head is
# Wav2Vec2ForSequenceClassification); audio and images first, whose heads the text table does not list.
AUTO_TABLES = {"audio-classification": "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES",
               "image-classification": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
               "text-classification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
               "token-classification": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"}
# A class the tables do not know (remote code): its name's ending.
ARCHITECTURES = {"ForAudioClassification": "audio-classification", "ForImageClassification": "image-classification",
                 "ForSequenceClassification": "text-classification", "ForTokenClassification": "token-classification"}


def classifier_kind(config) -> str | None:
    """The modality of the classifier `config` describes (its `architectures`), or None when it is no classifier."""
    from transformers.models.auto import modeling_auto

    for name in config.architectures or []:
        for kind, table in AUTO_TABLES.items():
            classes = [c for v in getattr(modeling_auto, table).values() for c in ((v,) if isinstance(v, str) else v)]
            if name in classes:
                return kind
        for suffix, kind in ARCHITECTURES.items():
            if name.endswith(suffix):
                return kind
    return None


ROW = "_hftl_row"  # the input row each prepared row comes from (a media check may leave rows out)
TAG = "hftl_predict_file"  # what _load_file calls the file in its messages; replaced by the file's own name


@dataclasses.dataclass
class Loaded:
    """A model folder ready to run: its settings, modality, task, and either a transformers model with its processor or
    a sentence-transformers classifier (hftl/pooling.py)."""
    source: str  # the folder or Hub id as given
    path: str  # what from_pretrained loads
    cfg: Config
    modality: modalities.Modality
    task: tasks.Task
    model: object
    processor: object | None  # None: a sentence-transformers classifier, which tokenizes itself
    config_file: Path | None  # the hftl_config.yaml the settings came from
    given: tuple[str, ...] = ()  # the keys set by key=value overrides


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0].strip()


def load(source: str, overrides: list[str] = ()) -> Loaded:
    """The model at `source` (a folder hftl or save_pretrained wrote, or a cached Hub id) and its settings."""
    from transformers import AutoConfig

    folder = Path(source).expanduser()
    given = dict(parse_override(o) for o in overrides)
    config_file = folder / "hftl_config.yaml" if folder.is_dir() and (folder / "hftl_config.yaml").is_file() else None
    st = folder.is_dir() and pooling.is_sentence_transformers_classifier(folder)
    if folder.exists():
        if not folder.is_dir():
            raise ConfigError(f"MODEL_DIR '{source}' is a file; give the folder `hftl train` wrote (its output.dir).")
        if not st and not (folder / "config.json").is_file():
            raise ConfigError(f"MODEL_DIR '{source}' is not a model folder: it has no config.json (nor a sentence-transformers "
                              "classifier's modules.json); give the output.dir of a finished `hftl train` run, or a folder "
                              "save_pretrained wrote.")
        path = str(folder)
    elif models._looks_like_path(source):
        raise ConfigError(f"MODEL_DIR '{source}' does not exist; give the output.dir of a finished `hftl train` run, or a Hub id.")
    else:
        path = source  # a Hub id: only a cached one offline
    # The training config as given, then the overrides; model.* is this folder's now (its revision was the base model's).
    cfg = load_config(config_file, list(overrides))
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name_or_path=path, revision=None, from_scratch=False))
    if folder.is_dir():  # before transformers reads a config.json whose auto_map would need code: say why in hftl's words
        models.check_code(str(folder / pooling.PooledClassifier.processor_subfolder) if st else path, cfg.model)
    try:
        config = AutoConfig.from_pretrained(str(folder / pooling.PooledClassifier.processor_subfolder) if st else path,
                                            trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:  # no such Hub repo, not cached offline, a broken config.json
        raise ConfigError(f"MODEL_DIR '{source}': cannot load its config ({_first_line(e)}). Give a local model folder, or a "
                          "Hub id (downloads need network; with HF_HUB_OFFLINE=1 only a cached model).") from e
    if st:
        kind = "text-classification"
    else:
        kind = classifier_kind(config)
        if kind is None:
            raise ConfigError(f"MODEL_DIR '{source}' holds {', '.join(config.architectures or [config.model_type])}, not a "
                              "classifier (an AutoModelForSequenceClassification, AudioClassification or ImageClassification "
                              "model, as `hftl train` writes): there are no labels to predict.")
    if config_file is None and "task" not in given:
        cfg = dataclasses.replace(cfg, task=kind)
    if cfg.task != kind:
        raise ConfigError(f"task={cfg.task}, but MODEL_DIR '{source}' is a {kind} model; leave task unset.")
    if config_file is None and "data.max_length" not in given and kind == "text-classification":
        # No training config to say how long rows were: as long as the model takes (at most 512, BERT's).
        limit = getattr(config, "max_position_embeddings", None) or 512
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_length=min(limit, 512)))
    task = tasks.from_model_config(config)
    modality = modalities.get(cfg.task)
    if st:
        return Loaded(source, path, cfg, modality, task, pooling.load_sentence_transformers(folder), None, config_file, tuple(given))
    models.check_code(path, cfg.model)
    try:
        processor = modality.load_processor(path, cfg)
        model = modality.auto_class.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code,
                                                    use_safetensors=None if cfg.model.allow_pickle else True)
    except UserError:
        raise
    except (OSError, ValueError) as e:  # no processor files, no safetensors weights
        raise ConfigError(f"MODEL_DIR '{source}': cannot load it for {cfg.task} ({_first_line(e)}).") from e
    model.eval()
    return Loaded(source, path, cfg, modality, task, model, processor, config_file, tuple(given))


def _where(loaded: Loaded, key: str) -> str:
    """Where a data.* setting came from, for messages."""
    if f"data.{key}" in loaded.given:
        return "as given"
    return f"from {loaded.config_file}" if loaded.config_file else "the default"


def check_file(file: str) -> None:
    """What can be told of FILE without the model: that it exists and is a format hftl reads (before loading anything)."""
    path = Path(file)
    if not path.exists():
        raise DataError(f"FILE '{file}' does not exist.")
    if path.is_file() and path.suffix.lower() not in FORMATS:
        raise DataError(f"FILE '{file}' has suffix '{path.suffix}'; give a {', '.join(FORMATS)} file, or an audio/image folder.")


def read(loaded: Loaded, file: str, labelled: bool) -> tuple[Dataset, dict]:
    """The rows of `file` (a csv/tsv/json/jsonl/parquet file, or an audio/image folder), checked as training checks its
    splits: input columns, the label column when `labelled`, every media file decoded once. Returns the rows with
    'labels' (encoded by the task; blank when not `labelled`) and ROW, and the rows the media check left out."""
    cfg, data = loaded.cfg, loaded.cfg.data
    keys = loaded.modality.input_keys
    path = Path(file)
    if path.is_dir():
        if not loaded.modality.check:
            raise DataError(f"FILE '{file}' is a folder; a text model reads a csv/tsv/json/jsonl/parquet file.")
        try:  # audiofolder / imagefolder, every split of it
            ds = concatenate_datasets(list(_load_dataset("data_dir", str(path)).values()))
        except DataError as e:
            raise DataError(str(e).replace("data.data_dir: ", "FILE: ", 1)) from e
    else:
        check_file(file)
        try:
            ds = _load_file(file, TAG, [getattr(data, k) for k in keys if k in PATH_KEYS])
        except DataError as e:
            raise DataError(str(e).replace(f"data.{TAG}: ", "FILE: ")) from e
    if len(ds) == 0:
        raise DataError(f"FILE '{file}' has no rows.")
    for key in keys:
        column = getattr(data, key)
        if column and column not in ds.column_names:
            raise DataError(f"FILE '{file}' has no column '{column}' (data.{key}, {_where(loaded, key)}); its columns are "
                            f"{ds.column_names}. Pass data.{key}=<one of those>.")
    column = label_columns(data)[0]  # data.label_column (token classification: data.tags_column)
    key = "tags_column" if column != data.label_column else "label_column"
    if labelled and column not in ds.column_names:
        raise DataError(f"FILE '{file}' has no label column '{column}' (data.{key}, {_where(loaded, key)}); "
                        f"its columns are {ds.column_names}. `hftl evaluate` needs labelled rows: pass data.{key}=<one of "
                        "those>, or use `hftl predict` for unlabelled rows.")
    role = f"FILE '{file}'"
    try:
        _check_columns(ds, role, data, keys, labelled)  # the label column's kind and empty labels, as for a training split
        ds = ds.select_columns([getattr(data, k) for k in keys if getattr(data, k)] + ([column] if labelled else []))
        # Before any media file is decoded: a label the model does not know is found at once.
        ds = loaded.task.encode(ds, role, data) if labelled else loaded.task.add_labels(ds, loaded.task.blank(len(ds)))
    except DataError as e:  # worded for a split of a training run: say it of this file and this model
        raise DataError(str(e).replace(f"the {role} split", role).replace("the train split never has", "the model was not trained on")
                        .replace("train labels are", "the model's labels are")) from e
    ds = ds.add_column(ROW, list(range(len(ds))))
    skipped = {}
    if loaded.modality.check:
        checked, skipped = loaded.modality.check(DatasetDict(input=ds), cfg)
        ds = checked["input"]
    return ds, skipped.get("input", [])


def infer(loaded: Loaded, ds: Dataset, desc: str) -> tuple[np.ndarray, np.ndarray]:
    """(model outputs, encoded labels) of every row of `ds` in its order, in length-sorted batches as training evaluated."""
    cfg = loaded.cfg
    if loaded.processor is None:  # a sentence-transformers classifier: encode() sorts by length and batches itself
        texts = loaded.modality.pipeline_inputs(ds, cfg)
        if texts and isinstance(texts[0], dict):
            texts = [[t["text"], t["text_pair"]] for t in texts]
        logits = loaded.model.encode(texts, batch_size=cfg.train.eval_batch_size, convert_to_tensor=True,
                                     show_progress_bar=True).float().cpu().numpy()
        return logits, np.asarray(ds["labels"])
    # prepare() takes training's splits: a one-row 'train' (its transform augments) beside the rows to run.
    encoded, collator = loaded.modality.prepare(DatasetDict(train=ds.select([0]), input=ds), loaded.processor, cfg)
    order, loader = eval_dataloader(encoded["input"], collator, cfg.train.eval_batch_size)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = loaded.model.to(device)
    outputs, refs, sentences = [], [], []
    with torch.inference_mode():
        for batch in tqdm(loader, desc=desc, file=sys.stderr, mininterval=0.1 if sys.stderr.isatty() else 30):
            windows, labels = batch.pop("num_windows", None), batch.pop("labels")
            if WINDOW in batch:  # data.stride: the sentence each window is of
                sentences.append(batch.pop(WINDOW))
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items() if k != "weight"}
            logits = torch.cat([model(**part).logits for part in token_slices(batch, cfg.train.eval_batch_tokens)]).float().cpu()
            if windows is not None:  # a clip cut into several windows: the mean of their logits, as evaluation takes it
                logits, labels = average_windows(logits, labels, windows)
            outputs.append(logits), refs.append(labels)
    outputs, refs = pad_positions(outputs, refs)  # token classification: per-token outputs of batches of unequal length
    if sentences:  # windows joined into their sentences, in row order
        return joined(torch.cat(outputs).numpy(), torch.cat(refs).numpy(), torch.cat(sentences).numpy(), order)
    back = np.empty(len(order), dtype=np.int64)
    back[order] = np.arange(len(order))  # back[row]: where the loader yielded that row
    return torch.cat(outputs).numpy()[back], torch.cat(refs).numpy()[back]


def _check_out(out: Path, model_dir: str, overwrite: bool, what: str, folder: bool) -> None:
    """Refuse, before any work, an output in the model folder or one that holds something already (unless --overwrite)."""
    model = Path(model_dir).expanduser()
    if model.is_dir() and (out.resolve() == model.resolve() or model.resolve() in out.resolve().parents):
        raise OutputError(f"--out '{out}' is inside MODEL_DIR '{model_dir}'; `hftl {what}` leaves the model folder as it is: "
                          "write somewhere else.")
    if folder:
        if out.exists() and not out.is_dir():
            raise OutputError(f"--out '{out}' is a file; give a folder.")
        if out.is_dir() and any(out.iterdir()) and not overwrite:
            raise OutputError(f"--out '{out}' exists and is not empty; choose another --out, or pass --overwrite to replace it.")
    else:
        if out.is_dir():
            raise OutputError(f"--out '{out}' is a folder; give a file name, e.g. predictions.jsonl.")
        if out.exists() and not overwrite:
            raise OutputError(f"--out '{out}' exists; choose another --out, or pass --overwrite to replace it.")


def _replace(tmp: Path, out: Path) -> None:
    """Put the finished `tmp` where `out` is (--overwrite already allowed replacing it)."""
    if out.is_dir():
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()
    os.replace(tmp, out)


def predict(model_dir: str, file: str, out: str | None = None, overrides: list[str] = (), overwrite: bool = False) -> int:
    """One JSON line per row of `file`, in its order: the task's row (single-label: the label and each label's
    probability). Written to `out`, or to stdout without it. Returns the number of rows."""
    if out:
        _check_out(Path(out), model_dir, overwrite, "predict", folder=False)
    check_file(file)
    stdout = sys.stdout
    # Without --out the predictions are stdout: what the libraries print on the way (audio decoding: ...) goes to stderr.
    with contextlib.redirect_stdout(sys.stderr) if not out else contextlib.nullcontext():
        scores, task = _predict_scores(model_dir, file, overrides)
    lines = "".join(json.dumps(task.row(s)) + "\n" for s in scores)
    if not out:
        stdout.write(lines)
        return len(scores)
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    with os.fdopen(fd, "w") as f:
        f.write(lines)
    _replace(Path(tmp), target)
    return len(scores)


def _predict_scores(model_dir: str, file: str, overrides) -> tuple[np.ndarray, tasks.Task]:
    loaded = load(model_dir, overrides)
    # One output row per input row: a media file that cannot be read stops here, whatever training's data.on_bad_sample.
    loaded.cfg = dataclasses.replace(loaded.cfg, data=dataclasses.replace(loaded.cfg.data, on_bad_sample="error"))
    ds, _ = read(loaded, file, labelled=False)
    logits, labels = infer(loaded, ds, "Predicting")
    return loaded.task.row_scores(logits, labels), loaded.task


def default_eval_dir(model_dir: str, file: str) -> Path:
    return Path("outputs") / "evaluate" / f"{Path(model_dir).name or 'model'}-{Path(file).stem or 'data'}"


def evaluate(model_dir: str, file: str, out: str | None = None, overrides: list[str] = (), overwrite: bool = False) -> dict:
    """The task's metrics (and the mean loss) on the labelled rows of `file`, written to the folder `out` with the
    predictions and the task's figure. The model folder is only read. Returns metrics.json's content."""
    from . import metrics as metrics_lib

    target = Path(out) if out else default_eval_dir(model_dir, file)
    _check_out(target, model_dir, overwrite, "evaluate", folder=True)
    check_file(file)
    loaded = load(model_dir, overrides)
    task, cfg = loaded.task, loaded.cfg
    # The metrics training reported (train.metrics, else the task's), loaded before any row is read.
    names = [m for m in (cfg.train.metrics or task.metric_names)]
    modules = metrics_lib.load_metrics(names)
    ds, skipped = read(loaded, file, labelled=True)
    logits, labels = infer(loaded, ds, "Evaluating")
    predictions, references = task.predict_rows(logits, labels), task.references(labels)
    scores = task.compute(modules, predictions, references)
    # The plain loss of the task (no train.class_weights / label_smoothing: those shaped training, not the model).
    scores["loss"] = float(task.loss(torch.as_tensor(logits), torch.as_tensor(labels), reduction="none").float().mean())
    rows = ds[ROW]
    result = {"model": str(model_dir), "file": str(file), "rows": len(rows), "metrics": scores,
              **({"skipped_rows": skipped} if skipped else {})}
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        (tmp / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        truth, rows_out = task.readable(references), task.row_scores(logits, labels)
        with open(tmp / "predictions.jsonl", "w") as f:
            for row, ref, s in zip(rows, truth, rows_out):
                f.write(json.dumps({"row": row, "reference": ref, **task.row(s)}) + "\n")
        if task.figure_name:
            task.figure(references, predictions, tmp / task.figure_name, f"{task.figure_caption} on {Path(file).name}")
        _replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result["out"] = str(target)
    return result
