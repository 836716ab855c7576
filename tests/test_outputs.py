"""The output folder: refused before training when it would clobber, swapped in only after success."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hftl import hub


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def siblings(folder: Path) -> list[str]:
    """Everything beside the output folder in its parent (temporary and backup folders would show here)."""
    return sorted(p.name for p in folder.parent.iterdir() if p.name != folder.name)


def previous_output(folder: Path) -> dict[str, bytes]:
    (folder / "sub").mkdir(parents=True)
    (folder / "old.txt").write_text("the previous run")
    (folder / "sub" / "model.safetensors").write_bytes(b"old weights")
    return snapshot(folder)


# ---------------------------------------------------------------- through the recipe


def test_existing_output_refused_before_training(make_cfg, tmp_path, monkeypatch):
    import hftl.models
    from hftl.recipe import train as main

    cfg = make_cfg(tmp_path)
    out = Path(cfg.output.dir)
    before = previous_output(out)

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded: the output check must come before any training")

    monkeypatch.setattr(hftl.models, "load_classifier", no_model)
    with pytest.raises(hub.OutputError) as e:
        main(cfg)
    assert str(out) in str(e.value) and "output.overwrite" in str(e.value)
    assert snapshot(out) == before
    assert siblings(out) == []


def test_empty_existing_output_is_fine(make_cfg, tmp_path):
    from hftl.recipe import train as main

    cfg = make_cfg(tmp_path, extra={"train.max_steps": 2, "output.verify_reload": 4})
    Path(cfg.output.dir).mkdir(parents=True)
    main(cfg)
    assert (Path(cfg.output.dir) / "model.safetensors").is_file()


def test_overwrite_replaces_old_output_only_after_success(make_cfg, tmp_path, monkeypatch):
    from hftl.recipe import train as main

    out = tmp_path / "out"
    before = previous_output(out)

    # A run that fails after training started leaves the previous output as it was.
    failing = make_cfg(tmp_path, extra={"output.overwrite": True, "train.max_steps": 2})
    failing.train.metric_for_best = "no_such_metric"  # after load_config, which would refuse it before training
    with pytest.raises((ValueError, RuntimeError), match="no_such_metric"):
        main(failing)
    assert snapshot(out) == before
    assert siblings(out) == []

    # A run that succeeds: at verification (the last step) the old folder is still in place.
    seen = []
    real_verify = hub.verify_reload

    def watching(folder, *args, **kwargs):
        seen.append({"old_still_there": (out / "old.txt").is_file(), "new_complete": (Path(folder) / "model.safetensors").is_file(),
                     "folder": Path(folder)})
        return real_verify(folder, *args, **kwargs)

    monkeypatch.setattr(hub, "verify_reload", watching)
    main(make_cfg(tmp_path, extra={"output.overwrite": True, "train.max_steps": 2, "output.verify_reload": 8}))
    assert seen == [{"old_still_there": True, "new_complete": True, "folder": seen[0]["folder"]}]
    assert seen[0]["folder"] != out and seen[0]["folder"].parent == out.parent
    assert not (out / "old.txt").exists() and not (out / "sub").exists()
    assert (out / "model.safetensors").is_file() and (out / "results.json").is_file()
    assert siblings(out) == []


# ---------------------------------------------------------------- hub.save_output directly


@pytest.fixture(scope="module")
def parts(tiny_bert):
    from huggingface_hub import ModelCard
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=2)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_bert))
    card = ModelCard("---\nlibrary_name: transformers\n---\n\n# test card\n")
    return model, tokenizer, card


class VerifyFailed(RuntimeError):
    pass


def failing_verify(folder):
    assert (Path(folder) / "model.safetensors").is_file()  # it is called on the complete new folder
    raise VerifyFailed("predictions differ")


def save(out, parts, **kwargs):
    model, tokenizer, card = parts
    return hub.save_output(str(out), model, tokenizer, card, extra={"results.json": {"accuracy": 1.0}, "note.txt": "hi"}, **kwargs)


def test_save_output_failed_verify_keeps_previous(tmp_path, parts):
    out = tmp_path / "out"
    before = previous_output(out)
    with pytest.raises(VerifyFailed):
        save(out, parts, overwrite=True, verify=failing_verify)
    assert snapshot(out) == before
    assert siblings(out) == []


def test_save_output_failed_verify_without_previous(tmp_path, parts):
    out = tmp_path / "out"
    with pytest.raises(VerifyFailed):
        save(out, parts, overwrite=False, verify=failing_verify)
    assert not out.exists()
    assert siblings(out) == []


def test_save_output_success_replaces(tmp_path, parts):
    import json

    out = tmp_path / "out"
    previous_output(out)
    verified = []
    result = save(out, parts, overwrite=True, verify=lambda folder: verified.append(sorted(p.name for p in Path(folder).iterdir())))
    assert Path(result) == out
    assert len(verified) == 1
    assert {"config.json", "model.safetensors", "README.md", "results.json", "note.txt", "tokenizer.json"} <= set(verified[0])
    assert sorted(p.name for p in out.iterdir()) == verified[0]  # what was verified is what is in place
    assert not (out / "old.txt").exists()
    assert json.loads((out / "results.json").read_text()) == {"accuracy": 1.0}
    assert (out / "note.txt").read_text() == "hi"
    assert siblings(out) == []


def test_save_output_without_overwrite_refuses(tmp_path, parts):
    out = tmp_path / "out"
    before = previous_output(out)
    with pytest.raises(hub.OutputError):
        save(out, parts, overwrite=False)
    assert snapshot(out) == before
    assert siblings(out) == []


def test_output_dir_that_is_a_file(tmp_path):
    path = tmp_path / "out"
    path.write_text("not a folder")
    with pytest.raises(hub.OutputError, match="is a file"):
        hub.check_output_dir(str(path), overwrite=True)


def test_check_output_dir_cases(tmp_path):
    hub.check_output_dir(str(tmp_path / "missing"), overwrite=False)  # absent: fine
    (tmp_path / "empty").mkdir()
    hub.check_output_dir(str(tmp_path / "empty"), overwrite=False)  # empty: fine
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    hub.check_output_dir(str(tmp_path / "full"), overwrite=True)
    with pytest.raises(hub.OutputError):
        hub.check_output_dir(str(tmp_path / "full"), overwrite=False)


def test_save_output_release_drops_the_weights_before_verify(tmp_path, tiny_bert):
    """release=True: the run's model lets go of its weights once written, so the reload check never holds two copies;
    the folder still holds them all."""
    from huggingface_hub import ModelCard
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=2)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    hub.save_output(str(tmp_path / "out"), model, AutoTokenizer.from_pretrained(str(tiny_bert)), ModelCard("# card\n"), {},
                    overwrite=False, verify=lambda folder: seen.append({p.device.type for p in model.parameters()}), release=True)
    assert seen == [{"meta"}]
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in expected.items() if k in saved) and "classifier.weight" in saved
