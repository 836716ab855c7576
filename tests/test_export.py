"""`hftl export MODEL_DIR --onnx [--int8]`: torch.onnx + ONNX Runtime, checked against the folder's predictions."""
from __future__ import annotations

import json

import pytest

from conftest import read_json
from hftl import cli

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def trained(make_cfg, tmp_path_factory):
    from hftl.recipe import train as main

    tmp = tmp_path_factory.mktemp("export")
    main(make_cfg(tmp))
    return tmp / "out"


def test_export_onnx_fp32_and_int8_predict_as_recorded(trained, capsys):
    import numpy as np
    import onnxruntime
    from transformers import AutoTokenizer

    assert cli.main(["export", str(trained), "--onnx", "--int8"]) == 0
    assert "Exported" in capsys.readouterr().out
    out = trained / "onnx"
    report = read_json(out / "export.json")
    recorded = read_json(trained / "predictions_validation.json")
    assert report["rows"] == len(recorded) == 16
    assert report["fp32"]["agreement"] == 1.0 and report["fp32"]["max_abs_logit_diff"] <= report["fp32_atol"]
    assert report["int8"]["agreement"] >= report["int8_min_agreement"]
    assert report["fp32"]["accuracy"] == report["pytorch_accuracy"] > 0.5  # scored against the validation labels

    # The folder serves on its own: its tokenizer + model.onnx in a fresh ONNX Runtime session give the recorded labels.
    tokenizer = AutoTokenizer.from_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    from hftl.config import load_config
    from hftl.data import load_splits

    cfg = load_config(trained / "hftl_config.yaml")
    texts = list(load_splits(cfg.data, cfg.train.seed)[0]["validation"]["text"])
    for name in ("model.onnx", "model_quantized.onnx"):
        session = onnxruntime.InferenceSession(str(out / name), providers=["CPUExecutionProvider"])
        feed = dict(tokenizer(texts, padding=True, return_tensors="np"))
        wanted = {i.name for i in session.get_inputs()}
        logits = session.run(None, {k: v.astype(np.int64) for k, v in feed.items() if k in wanted})[0]
        got = [config["id2label"][str(i)] for i in logits.argmax(-1)]
        agreement = np.mean([g == r for g, r in zip(got, recorded)])
        assert agreement == 1.0 if name == "model.onnx" else agreement >= report["int8_min_agreement"]


def test_export_given_texts_and_refusals(trained, tmp_path, capsys):
    # An existing --out is not replaced without --overwrite; nothing is exported before that is known.
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    assert cli.main(["export", str(trained), "--onnx", "--out", str(tmp_path / "taken")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    # A folder hftl did not write, and a task export does not handle: one line each.
    assert cli.main(["export", str(tmp_path), "--onnx"]) == 2
    assert "hftl_config.yaml" in capsys.readouterr().err
    audio = tmp_path / "audio_model"
    audio.mkdir()
    (audio / "hftl_config.yaml").write_text("task: audio-classification\n")
    assert cli.main(["export", str(audio), "--onnx"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hftl: error:") and "text-classification" in err and len(err.strip().splitlines()) == 1
    # Given texts: checked against the PyTorch model in the folder.
    assert cli.main(["export", str(trained), "--onnx", "--out", str(tmp_path / "texts"), "--texts", "good great", "awful"]) == 0
    report = read_json(tmp_path / "texts" / "export.json")
    assert report["rows_from"] == "2 given text(s)" and report["fp32"]["agreement"] == 1.0 and "int8" not in report
    # Without --onnx: a usage error.
    with pytest.raises(SystemExit) as e:
        cli.main(["export", str(trained)])
    assert e.value.code == 2


def test_export_without_the_onnx_extra_names_it(trained, tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    assert cli.main(["export", str(trained), "--onnx", "--out", str(tmp_path / "x")]) == 2
    assert "pip install 'hftl[onnx]'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
