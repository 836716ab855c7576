"""`hftl rank` (hftl/rank.py) through the command line, on tiny checkpoints built here.

'sentiment' (conftest) is the tiny BERT with the embeddings of the positive and negative words pushed apart along
one direction, as pretraining on sentiment would: its features should rank first, above the same
architecture with random weights (scratch:) and the unshifted tiny BERT.
"""
from __future__ import annotations

from conftest import read_json
from test_image import tiny_vit

from hftl import cli


def data_args(toy_data, tmp_path) -> list[str]:
    return [f"data.train_file={toy_data['train']}", f"data.validation_file={toy_data['validation']}", "data.max_length=16",
            f"train.feature_cache_dir={tmp_path / 'features'}"]


def rank(capsys, args: list[str], out) -> tuple[dict, str]:
    assert cli.main(["rank", *args, "--out", str(out)]) == 0
    return read_json(out), capsys.readouterr().out


def test_ranks_pretrained_features_first_and_reuses_them(tmp_path, capsys, tiny_bert, sentiment, toy_data):
    candidates = [str(tiny_bert), f"scratch:{sentiment}", str(sentiment)]
    # Overrides may follow --models; max_train_samples limits the rows as in training.
    args = ["--models", *candidates, *data_args(toy_data, tmp_path), "data.max_train_samples=48"]
    first, table = rank(capsys, args, tmp_path / "first.json")

    order = [m["model"] for m in first["models"]]
    assert order[0] == str(sentiment), first
    assert [m["rank"] for m in first["models"]] == [1, 2, 3]
    assert sorted(order) == sorted(candidates)
    scores = {m["model"]: m for m in first["models"]}
    assert scores[str(sentiment)]["hscore"] > scores[f"scratch:{sentiment}"]["hscore"]
    assert first["train_rows"] == 48 and first["labels"] == ["negative", "positive"]
    assert all(m["feature_cache"] == "computed" and m["feature_dim"] == 32 and m["seconds"] > 0 for m in first["models"])
    assert len({m["cache_file"] for m in first["models"]}) == 3  # random weights are another checkpoint
    assert "| rank | model | LogME | H-score | seconds | features |" in table
    best = scores[str(sentiment)]
    assert f"| 1 | {sentiment} | {best['logme']:.4f} | {best['hscore']:.4f} |" in table

    again, table = rank(capsys, args, tmp_path / "again.json")
    assert [m["feature_cache"] for m in again["models"]] == ["hit"] * 3
    assert [(m["model"], m["logme"], m["hscore"]) for m in again["models"]] == [(m["model"], m["logme"], m["hscore"]) for m in first["models"]]
    assert "| hit |" in table

    # Training the winner's head reads the features ranking stored.
    out = tmp_path / "head"
    assert cli.main(["train", f"model.name_or_path={sentiment}", "adapt.mode=head", *data_args(toy_data, tmp_path),
                     "data.max_train_samples=48", "train.epochs=1", "train.metrics=[accuracy]", "output.verify_reload=0",
                     f"output.dir={out}"]) == 0
    cache = read_json(out / "results.json")["feature_cache"]["splits"]
    assert cache["train"]["hit"] and cache["train"]["file"] == best["cache_file"]
    assert not cache["validation"]["hit"]


def test_images_rank_too(tmp_path, capsys):
    vit = tiny_vit(tmp_path / "vit")
    result, table = rank(capsys, ["--models", str(vit), f"scratch:{vit}", "task=image-classification", "data.builtin=sklearn_digits",
                                  "data.max_train_samples=40", f"train.feature_cache_dir={tmp_path / 'features'}"], tmp_path / "r.json")
    assert result["task"] == "image-classification" and result["train_rows"] == 40 and len(result["labels"]) == 10
    assert {m["model"] for m in result["models"]} == {str(vit), f"scratch:{vit}"}
    assert all(m["feature_dim"] == 16 and m["feature_cache"] == "computed" for m in result["models"])
    assert table.count("| computed |") == 2


def test_unknown_model_exits_2_naming_it(tmp_path, capsys, tiny_bert, toy_data):
    code = cli.main(["rank", "--models", str(tiny_bert), "no-such-org/no-such-model", *data_args(toy_data, tmp_path)])
    assert code == 2
    captured = capsys.readouterr()
    assert "--models entry 'no-such-org/no-such-model'" in captured.err
    assert "| rank |" not in captured.out  # refused before scoring the first candidate
    assert not (tmp_path / "features").exists()
