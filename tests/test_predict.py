"""`hftl predict` and `hftl evaluate`: a model folder a tiny run wrote, on files, through the command line.

One text run (module-scoped) writes the folder; predict must give what training's evaluation recorded
(predictions_validation.json), evaluate must reproduce results.json's validation metrics, and neither may change
a byte of the folder. Each refusal is one line and exit code 2, before any model output is written.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from conftest import read_json, toy_rows, write_rows
from hftl import cli


@pytest.fixture(scope="module")
def run(make_cfg, tmp_path_factory) -> Path:
    from hftl.recipe import train

    cfg = make_cfg(tmp_path_factory.mktemp("predict_run"), train__epochs=3)
    train(cfg)
    return Path(cfg.output.dir)


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def hftl(*args) -> int:
    return cli.main([str(a) for a in args])


def error_of(capsys, *args) -> str:
    assert hftl(*args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("hftl: error: "), err
    return err[-1]


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_predict_gives_what_training_evaluated(run, toy_data, tmp_path):
    before = snapshot(run)
    out = tmp_path / "pred.jsonl"
    assert hftl("predict", run, toy_data["validation"], "--out", out) == 0
    rows = jsonl(out)
    expected = read_json(run / "predictions_validation.json")
    assert len(rows) == len(expected) == 16  # one line per input row, in input order
    assert [r["label"] for r in rows] == expected
    for r in rows:
        assert set(r["scores"]) == {"negative", "positive"}
        assert sum(r["scores"].values()) == pytest.approx(1.0, abs=1e-5)
        assert r["label"] == max(r["scores"], key=r["scores"].get)
    assert snapshot(run) == before


def test_predict_unlabelled_file_in_input_order_and_renamed_column(run, tmp_path, capsys):
    rows = toy_rows(9, seed=5)
    file = write_rows(tmp_path / "new.jsonl", [{"sentence": r["text"]} for r in rows])  # no label, another column name
    assert hftl("predict", run, file, "data.text_column=sentence") == 0  # to stdout
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 9
    # the same rows in another order give the same predictions, moved with them
    assert hftl("predict", run, write_rows(tmp_path / "rev.jsonl", [{"sentence": r["text"]} for r in rows[::-1]]),
                "data.text_column=sentence") == 0
    reversed_lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["label"] for r in reversed_lines] == [r["label"] for r in lines][::-1]
    for a, b in zip(lines, reversed_lines[::-1]):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-5)


def test_plain_model_folder_without_hftl_config(run, toy_data, tmp_path):
    """A folder save_pretrained wrote (no hftl_config.yaml): the modality from its architecture, default columns."""
    import shutil

    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(run / name, plain / name)
    assert hftl("predict", plain, toy_data["validation"], "--out", tmp_path / "p.jsonl") == 0
    assert [r["label"] for r in jsonl(tmp_path / "p.jsonl")] == read_json(run / "predictions_validation.json")


def test_evaluate_reproduces_results_and_leaves_the_folder_alone(run, toy_data, tmp_path, capsys):
    before = snapshot(run)
    out = tmp_path / "eval"
    assert hftl("evaluate", run, toy_data["validation"], "--out", out) == 0
    assert "accuracy=" in capsys.readouterr().out
    assert snapshot(run) == before
    metrics = read_json(out / "metrics.json")
    trained = read_json(run / "results.json")["results"]["validation"]
    assert set(metrics["metrics"]) == set(trained)
    for k, v in trained.items():
        assert metrics["metrics"][k] == pytest.approx(v, abs=1e-5), k
    assert metrics["rows"] == 16
    preds = jsonl(out / "predictions.jsonl")
    assert [p["row"] for p in preds] == list(range(16))
    assert [p["label"] for p in preds] == read_json(run / "predictions_validation.json")
    assert [p["reference"] for p in preds] == [r["label"] for r in toy_rows(16, seed=1)]
    assert (out / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second evaluation into the same folder is refused, unless --overwrite
    assert "exists and is not empty" in error_of(capsys, "evaluate", run, toy_data["validation"], "--out", out)
    assert hftl("evaluate", run, toy_data["validation"], "--out", out, "--overwrite") == 0
    assert read_json(out / "metrics.json")["metrics"] == pytest.approx(metrics["metrics"])
    assert snapshot(run) == before


def test_refusals(run, toy_data, tiny_bert, tmp_path, capsys):
    val = toy_data["validation"]
    no_text = write_rows(tmp_path / "no_text.csv", [{"review": "good", "label": "positive"}])
    msg = error_of(capsys, "predict", run, no_text)
    assert "no column 'text'" in msg and "data.text_column" in msg and "review" in msg
    unknown = write_rows(tmp_path / "unknown.csv", [{"text": "good", "label": "positive"}, {"text": "meh", "label": "neutral"}])
    msg = error_of(capsys, "evaluate", run, unknown, "--out", tmp_path / "e1")
    assert "['neutral']" in msg and "row 1" in msg and "not trained on" in msg and "['negative', 'positive']" in msg
    unlabelled = write_rows(tmp_path / "unlabelled.csv", [{"text": "good"}])
    msg = error_of(capsys, "evaluate", run, unlabelled, "--out", tmp_path / "e2")
    assert "label column 'label'" in msg and "hftl predict" in msg
    assert "does not exist" in error_of(capsys, "predict", run, tmp_path / "missing.csv")
    assert "does not exist" in error_of(capsys, "predict", tmp_path / "no_model", val)
    (tmp_path / "empty_dir").mkdir()
    assert "not a model folder" in error_of(capsys, "predict", tmp_path / "empty_dir", val)
    assert "not a classifier" in error_of(capsys, "predict", tiny_bert, val)  # a BertModel: no head, no labels
    assert "cannot load" in error_of(capsys, "predict", "nobody/no-such-model", val)  # a Hub id, offline and not cached
    existing = tmp_path / "taken.jsonl"
    existing.write_text("mine\n")
    assert "--overwrite" in error_of(capsys, "predict", run, val, "--out", existing)
    assert existing.read_text() == "mine\n"
    assert hftl("predict", run, val, "--out", existing, "--overwrite") == 0
    assert len(jsonl(existing)) == 16
    assert "inside MODEL_DIR" in error_of(capsys, "evaluate", run, val, "--out", run / "eval")
    for name in ("e1", "e2"):  # a refused evaluation wrote nothing
        assert not (tmp_path / name).exists()
    assert not (run / "eval").exists()



def test_sentence_transformers_folder(make_cfg, toy_data, tmp_path):
    """A pooling the architecture's head cannot express is saved in the sentence-transformers layout (hftl/pooling.py):
    predict and evaluate read it through sentence-transformers, as the reload check did."""
    from hftl.pooling import is_sentence_transformers_classifier
    from hftl.recipe import train

    cfg = make_cfg(tmp_path, adapt__mode="head", adapt__pooling="mean")
    train(cfg)
    run = Path(cfg.output.dir)
    assert is_sentence_transformers_classifier(run)
    before = snapshot(run)
    assert hftl("predict", run, toy_data["validation"], "--out", tmp_path / "p.jsonl") == 0
    rows = jsonl(tmp_path / "p.jsonl")
    assert [r["label"] for r in rows] == read_json(run / "predictions_validation.json")
    assert all(sum(r["scores"].values()) == pytest.approx(1.0, abs=1e-5) for r in rows)
    assert hftl("evaluate", run, toy_data["validation"], "--out", tmp_path / "e") == 0
    trained = read_json(run / "results.json")["results"]["validation"]
    assert read_json(tmp_path / "e" / "metrics.json")["metrics"] == pytest.approx(trained, abs=1e-5)
    assert snapshot(run) == before


def test_image_folder_round_trip(tmp_path, capsys):
    """An imagefolder: predict reads the folder (class sub-folders give the labels evaluate scores against)."""
    from test_image import image_cfg, tiny_vit, write_images

    from hftl.recipe import train

    images = tmp_path / "stripes"
    write_images(images / "train", 16, seed=0)
    write_images(images / "validation", 8, seed=1)
    cfg = image_cfg(tmp_path / "out", tiny_vit(tmp_path / "vit"), adapt__mode="head", data__data_dir=images, train__epochs=2)
    train(cfg)
    run = Path(cfg.output.dir)
    before = snapshot(run)
    assert hftl("predict", run, images / "validation", "--out", tmp_path / "p.jsonl") == 0
    assert [r["label"] for r in jsonl(tmp_path / "p.jsonl")] == read_json(run / "predictions_validation.json")
    assert hftl("evaluate", run, images / "validation", "--out", tmp_path / "e") == 0
    trained = read_json(run / "results.json")["results"]["validation"]
    assert read_json(tmp_path / "e" / "metrics.json")["metrics"] == pytest.approx(trained, abs=1e-5)
    # A file that cannot be decoded: predict stops (one output row per input row); evaluate follows data.on_bad_sample.
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(images / "validation", broken)
    (broken / "h" / "0.png").write_bytes(b"not an image")
    assert "cannot read image file" in error_of(capsys, "predict", run, broken)
    assert hftl("evaluate", run, broken, "--out", tmp_path / "e2", "data.on_bad_sample=skip") == 0
    result = read_json(tmp_path / "e2" / "metrics.json")
    assert result["rows"] == 7 and len(result["skipped_rows"]) == 1 and "0.png" in result["skipped_rows"][0]
    assert len(jsonl(tmp_path / "e2" / "predictions.jsonl")) == 7
    assert snapshot(run) == before


def test_audio_round_trip_with_windowed_clips(tmp_path, capsys):
    """Speech: paths in a csv (relative to it), clips longer than a window evaluated as the mean of their windows."""
    from test_audio import audio_cfg, tiny_speech_model, write_clips

    from hftl.recipe import train

    train_csv, val_csv = write_clips(tmp_path / "clips", "train.csv", 16, seed=0), write_clips(tmp_path / "clips", "validation.csv", 8, seed=1, long_every=3)
    cfg = audio_cfg(tmp_path / "out", tiny_speech_model(tmp_path / "w2v"), train_csv, val_csv, adapt__mode="head", train__epochs=2)
    train(cfg)
    run = Path(cfg.output.dir)
    from transformers import AutoConfig

    from hftl.predict import classifier_kind

    # Wav2Vec2ForSequenceClassification: an audio head by transformers' table, not by its name (a folder without hftl_config.yaml)
    assert classifier_kind(AutoConfig.from_pretrained(run)) == "audio-classification"
    before = snapshot(run)
    capsys.readouterr()
    assert hftl("predict", run, val_csv) == 0  # to stdout: only the predictions (the media check's log goes to stderr)
    captured = capsys.readouterr()
    assert "audio decoding" in captured.err
    assert [json.loads(line)["label"] for line in captured.out.splitlines()] == read_json(run / "predictions_validation.json")
    assert hftl("evaluate", run, val_csv, "--out", tmp_path / "e") == 0
    trained = read_json(run / "results.json")["results"]["validation"]
    assert read_json(tmp_path / "e" / "metrics.json")["metrics"] == pytest.approx(trained, abs=1e-5)
    assert snapshot(run) == before
