"""adapt.pretrain=mlm: continued masked-LM pretraining on in-domain text, then classification from that checkpoint."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import LETTERS, read_json, write_rows
from hftl.config import ConfigError
from hftl.data import DataError, load_splits
from hftl.hub import OutputError

# Settings with which the tiny BERT learns the toy texts' masked tokens in a few seconds.
FAST = {"adapt.pretrain": "mlm", "adapt.pretrain_learning_rate": "0.005", "adapt.pretrain_epochs": 6}


def letter_runs(n: int, seed: int) -> list[str]:
    """Runs of 8 consecutive letters ('c d e f g h i j'): a masked letter is predictable from its neighbours."""
    rng = random.Random(seed)
    return [" ".join(LETTERS[s:s + 8]) for s in (rng.randrange(len(LETTERS) - 8) for _ in range(n))]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "domain.txt"
    path.write_text("\n".join(letter_runs(400, seed=0)) + "\n\n")  # a trailing blank line is dropped
    return path


@pytest.fixture(scope="module")
def run(make_cfg, corpus, tmp_path_factory):
    """One whole run (pretrain on the .txt corpus, then classify), recording what the classifier loaded."""
    import hftl.models
    from hftl.recipe import train as main

    cfg = make_cfg(tmp_path_factory.mktemp("pretrain_run"), extra={**FAST, "adapt.pretrain_file": str(corpus), "train.epochs": 1})
    loaded = {}
    original = hftl.models.load_classifier

    def recording(auto_cls, path, *args, **kwargs):
        model, new_keys = original(auto_cls, path, *args, **kwargs)
        loaded.update(path=path, new_keys=new_keys, state={k: v.detach().clone() for k, v in model.state_dict().items()})
        return model, new_keys

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hftl.models, "load_classifier", recording)
        main(cfg)
    out = Path(cfg.output.dir)
    return {"cfg": cfg, "out": out, "pretrained": Path(str(out) + ".pretrained"), "loaded": loaded}


def test_mlm_lowers_heldout_loss(run):
    info = read_json(run["out"] / "results.json")["pretrain"]
    assert info == read_json(run["pretrained"] / "pretrain.json")
    assert info["texts"] + info["heldout_texts"] == 400 and info["heldout_texts"] == 20
    assert info["heldout_loss_after"] < 0.6 * info["heldout_loss_before"], info
    assert info["heldout_perplexity_after"] < info["heldout_perplexity_before"] and info["heldout_masked_tokens"] > 300
    assert info["steps"] == 6 * -(-380 // 8) and info["source"] == run["cfg"].adapt.pretrain_file


def test_pretrained_folder_is_complete(run, tiny_bert):
    folder = run["pretrained"]
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "pretrain.json", "README.md"):
        assert (folder / name).is_file(), name
    assert read_json(folder / "config.json")["architectures"] == ["BertForMaskedLM"]
    assert sorted(p.name for p in folder.parent.iterdir()) == ["out", "out.pretrained"]  # no temporary folders left
    saved, original = load_file(str(folder / "model.safetensors")), load_file(str(tiny_bert / "model.safetensors"))
    assert any(k.startswith("cls.predictions.") for k in saved)  # the MLM head, for a further pretraining stage
    # The masked LM has no pooler; the checkpoint's is kept, so the classifier does not get a random one.
    assert torch.equal(saved["bert.pooler.dense.weight"], original["pooler.dense.weight"])


def test_classifier_starts_from_pretrained_encoder(run, tiny_bert):
    loaded = run["loaded"]
    assert loaded["path"] == str(run["pretrained"])
    assert loaded["new_keys"] == ["classifier.bias", "classifier.weight"]  # only the head is new
    key = "bert.embeddings.word_embeddings.weight"
    pretrained = load_file(str(run["pretrained"] / "model.safetensors"))[key]
    original = load_file(str(tiny_bert / "model.safetensors"))["embeddings.word_embeddings.weight"]
    assert torch.equal(loaded["state"][key], pretrained)
    assert not torch.equal(loaded["state"][key], original)
    assert read_json(run["out"] / "results.json")["results"]["validation"]["accuracy"] >= 0.0


# ---------------------------------------------------------------- the stage on its own


def pretrain_only(cfg, target=None) -> Path:
    from transformers import AutoTokenizer

    from hftl.pretrain import continue_pretraining
    from hftl.train import make_accelerator

    splits, _ = load_splits(cfg.data, cfg.train.seed)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.name_or_path)
    return Path(continue_pretraining(cfg, cfg.model.name_or_path, splits, tokenizer, make_accelerator(cfg.train), target))


ONE_STEP = {"adapt.pretrain": "mlm", "adapt.pretrain_epochs": 0.01}  # one optimizer step


def test_csv_file_with_text_column(make_cfg, tmp_path):
    rows = [{"id": i, "text": t} for i, t in enumerate(letter_runs(39, seed=1))] + [{"id": 39, "text": ""}]
    path = write_rows(tmp_path / "domain.csv", rows)
    info = read_json(pretrain_only(make_cfg(tmp_path, extra={**ONE_STEP, "adapt.pretrain_file": str(path)})) / "pretrain.json")
    assert (info["texts"], info["heldout_texts"], info["steps"]) == (37, 2, 1)  # the blank row is dropped


def test_default_texts_are_training_plus_target(make_cfg, tmp_path):
    target = write_rows(tmp_path / "target.csv", [{"text": t} for t in letter_runs(36, seed=2)])
    info = read_json(pretrain_only(make_cfg(tmp_path, extra={**ONE_STEP, "data.target": str(target)})) / "pretrain.json")
    assert info["texts"] + info["heldout_texts"] == 64 + 36
    assert info["source"] == "the training texts and data.target's"


def test_existing_folder_needs_overwrite_and_resume_reuses_it(make_cfg, tmp_path):
    cfg = make_cfg(tmp_path, extra=ONE_STEP)
    folder = Path(cfg.output.dir + ".pretrained")
    folder.mkdir(parents=True)
    (folder / "stale.txt").write_text("x")
    with pytest.raises(OutputError, match=r"out\.pretrained.*output\.overwrite=true"):
        pretrain_only(cfg)
    assert pretrain_only(make_cfg(tmp_path, extra={**ONE_STEP, "output.overwrite": True})) == folder
    assert not (folder / "stale.txt").exists() and (folder / "model.safetensors").is_file()
    written = (folder / "model.safetensors").stat().st_mtime_ns
    # Resuming the classifier stage: the folder those settings wrote is used as it is.
    assert pretrain_only(make_cfg(tmp_path, extra={**ONE_STEP, "train.resume": "auto"})) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == written
    with pytest.raises(OutputError):  # other settings: not reused
        pretrain_only(make_cfg(tmp_path, extra={**ONE_STEP, "train.resume": "auto", "adapt.mlm_probability": 0.3}))


@pytest.mark.parametrize("extra, error, match", [
    ({"task": "audio-classification"}, ConfigError, r"for text; task=audio-classification"),
    ({"task": "image-classification"}, ConfigError, r"for text; task=image-classification"),
    ({"model.from_scratch": True}, ConfigError, r"model\.from_scratch"),
    ({"adapt.pretrain_file": "missing.txt"}, DataError, r"adapt\.pretrain_file: file 'missing\.txt' does not exist"),
    ({"adapt.pretrain_file": "EMPTY"}, DataError, r"is empty"),
    ({"adapt.pretrain_file": "BLANK"}, DataError, r"0 non-blank text"),
    ({"adapt.pretrain_file": "NOCOLUMN"}, DataError, r"no column 'text' \(data\.text_column\)"),
    ({"adapt.pretrain_file": "WRONG.md"}, DataError, r"suffix '\.md'"),
])
def test_errors(make_cfg, tmp_path, extra, error, match):
    # (An unknown adapt.pretrain is refused when the config is read: tests/test_bad_inputs.py.)
    files = {"EMPTY": tmp_path / "empty.txt", "BLANK": tmp_path / "blank.txt", "NOCOLUMN": tmp_path / "sentences.csv",
             "WRONG.md": tmp_path / "notes.md"}
    files["EMPTY"].write_text("")
    files["BLANK"].write_text("\n  \n\n")
    write_rows(files["NOCOLUMN"], [{"sentence": "a b c"}, {"sentence": "d e f"}])
    files["WRONG.md"].write_text("a b c\n")
    extra = {k: str(files.get(v, v)) if k == "adapt.pretrain_file" else v for k, v in extra.items()}
    cfg = make_cfg(tmp_path, extra={**ONE_STEP, **extra})
    with pytest.raises(error, match=match):
        pretrain_only(cfg)
    assert not Path(cfg.output.dir + ".pretrained").exists()


def test_stage_runs_on_the_shared_loop_and_a_stopped_one_resumes_exactly(make_cfg, corpus, tmp_path, monkeypatch, capsys):
    """The MLM stage is hftl.train.fit's: checkpoints in <checkpoints>/pretrain, a stop signal saves and exits 143, and
    train.resume=auto continues it to the weights and losses of an uninterrupted stage."""
    import itertools
    import os
    import signal

    import hftl.pretrain as pretrain
    from hftl.checkpoint import EXIT_PREEMPTED
    from hftl.recipe import train as main

    def cfg(folder, **more):
        return make_cfg(tmp_path / folder, extra={**FAST, "adapt.pretrain_file": str(corpus), "adapt.pretrain_epochs": 1,
                                                  "train.epochs": 1, "train.save_every": 20, "train.batch_size": 16, **more})

    main(cfg("whole"))
    reference = tmp_path / "whole" / "out.pretrained"
    forwards, original = itertools.count(1), pretrain.MaskedLM.forward

    def signalling(self, *args, **kwargs):
        if self.training and next(forwards) == 22:  # after the checkpoint of step 20
            os.kill(os.getpid(), signal.SIGUSR1)
        return original(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(pretrain.MaskedLM, "forward", signalling)
        with pytest.raises(SystemExit) as stopped:
            main(cfg("stopped"))
    assert stopped.value.code == EXIT_PREEMPTED
    checkpoints = tmp_path / "stopped" / "out.checkpoints" / "pretrain"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-20", "step-22"]
    assert not (tmp_path / "stopped" / "out.pretrained").exists()
    main(cfg("stopped", **{"train.resume": "auto"}))
    assert f"Resumed from {checkpoints}/step-22: step 22 of 24" in capsys.readouterr().out
    want, got = read_json(reference / "pretrain.json"), read_json(tmp_path / "stopped" / "out.pretrained" / "pretrain.json")
    for key in ("steps", "heldout_loss_before", "heldout_loss_after", "train_loss_first", "train_loss_last"):
        assert got[key] == want[key], key
    a, b = load_file(str(reference / "model.safetensors")), load_file(str(tmp_path / "stopped" / "out.pretrained" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
