"""`hftl tune`: the key=range syntax and its refusals, trials as ordinary runs scored on validation, intermediate
evaluations reported to the pruner (and a pruned trial stopped), the best trial written as a preset `hftl train` loads,
the report and plots, and two worker processes sharing one study through Optuna's storage."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO_ROOT, read_json
from hftl.config import ConfigError, _flatten as flat, load_config, to_dict, to_yaml
from hftl.tune import Param, check_space, parse_param, split_args, tune

SPACE = ["train.learning_rate=log:0.003:0.03", "adapt.lora_r=int:2:8:2", "train.epochs=choice:1,2"]


@pytest.fixture(scope="module")
def optuna():
    """The tests that run a study need hftl[tune] (scripts/setup.sh installs it); the others run without it."""
    return pytest.importorskip("optuna")


@pytest.fixture(scope="module")
def overrides(tiny_bert, toy_data) -> list[str]:
    # 64 rows at batch 8: 8 steps an epoch, evaluated every 4.
    return [f"model.name_or_path={tiny_bert}", f"data.train_file={toy_data['train']}",
            f"data.validation_file={toy_data['validation']}", "data.max_length=16", "train.batch_size=8",
            "train.min_steps=null", "train.evals_per_epoch=2", "train.log_every=1000", "adapt.mode=lora", "output.verify_reload=0"]


@pytest.fixture(scope="module")
def preset(overrides, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("preset") / "tiny_lora.yaml"
    path.write_text(to_yaml(load_config(None, overrides)))
    return path


def test_range_syntax():
    assert parse_param("train.learning_rate=log:1e-5:1e-3") == Param("train.learning_rate", "log", 1e-5, 1e-3)
    assert parse_param("adapt.lora_dropout=float:0:0.3") == Param("adapt.lora_dropout", "float", 0.0, 0.3)
    assert parse_param("adapt.lora_r=int:4:32:4") == Param("adapt.lora_r", "int", 4, 32, 4)
    assert parse_param("train.epochs=choice:1,2,3").choices == [1, 2, 3]
    assert parse_param("adapt.pooling=choice:mean,cls").choices == ["mean", "cls"]
    # not a range: an ordinary key=value for every trial
    assert parse_param("train.epochs=2") is None and parse_param("output.dir=runs:a") is None
    space, rest = split_args(["adapt.lora_r=int:4:8", "train.epochs=2", "train.learning_rate=log:1e-4:1e-2"])
    assert [p.key for p in space] == ["adapt.lora_r", "train.learning_rate"] and rest == ["train.epochs=2"]


@pytest.mark.parametrize("arg, message", [
    ("train.learning_rate=log:0:1e-3", r"a log range needs LO > 0; the form is train.learning_rate=log:LO:HI"),
    ("train.learning_rate=log:1e-3:1e-5", r"LO \(0.001\) must be below HI \(1e-05\)"),
    ("adapt.lora_r=int:4:x", r"whole numbers expected; the form is adapt.lora_r=int:LO:HI\[:STEP\]"),
    ("adapt.lora_r=int:4:32:5", r"STEP must be a positive whole number that divides HI - LO \(28\)"),
    ("train.epochs=choice:2", r"give two or more plain values"),
    ("train.lr=log:1e-5:1e-3", r"unknown config key 'train.lr'"),
])
def test_bad_range_is_refused(arg, message):
    with pytest.raises(ConfigError, match=message):
        parse_param(arg)


def test_range_the_config_cannot_take_is_refused_before_training(overrides, monkeypatch, capsys, tmp_path, optuna):
    import hftl.compare
    from hftl.cli import main

    base = load_config(None, overrides)
    with pytest.raises(ConfigError, match=r"adapt.lora_r=int:0:8: 0 is not a value it takes \(adapt.lora_r=0; expected a whole number >= 1"):
        check_space(base, [parse_param("adapt.lora_r=int:0:8")])
    with pytest.raises(ConfigError, match=r"adapt.pooling=choice:mean,top: 'top' is not a value it takes"):
        check_space(base, [parse_param("adapt.pooling=choice:mean,top")])
    monkeypatch.setattr(hftl.compare, "train", lambda cfg: pytest.fail("trained"))
    assert main(["tune", "--trials", "2", "--out", str(tmp_path), *overrides, "train.warmup_ratio=float:0:2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hftl: error: train.warmup_ratio=float:0:2: 2.0 is not a value it takes") and err.count("\n") == 1
    assert main(["tune", "--trials", "2", "--out", str(tmp_path), *overrides, "adapt.lora_r=int:2:4", "adapt.lora_r=int:4:8"]) == 2
    assert "adapt.lora_r is searched twice" in capsys.readouterr().err
    assert main(["tune", "--trials", "2", "--out", str(tmp_path), *overrides]) == 2
    assert "give at least one key=range" in capsys.readouterr().err
    assert main(["tune", "--trials", "1", "--storage", "redis-ish", "--out", str(tmp_path), *overrides, *SPACE]) == 2
    assert "--storage redis-ish: give an RDB URL" in capsys.readouterr().err


def test_missing_optuna_is_one_line(overrides, monkeypatch, capsys, tmp_path):
    from hftl.cli import main

    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna raises ImportError
    assert main(["tune", "--trials", "1", "--out", str(tmp_path), *overrides, *SPACE]) == 2
    assert capsys.readouterr().err == "hftl: error: hftl tune needs optuna, which is not installed: pip install 'hftl[tune]'.\n"


@pytest.fixture(scope="module")
def study(preset, tmp_path_factory, optuna):
    """Four trials through the CLI, the study in an RDB (SQLite) file."""
    from hftl.cli import main

    tmp = tmp_path_factory.mktemp("tune")
    out, url = tmp / "report", f"sqlite:///{tmp / 'study.db'}"
    assert main(["tune", str(preset), "--trials", "4", "--study-name", "tiny", "--storage", url, "--sampler-seed", "0",
                 "--out", str(out), *SPACE]) == 0
    return out, url


def test_trials_are_ordinary_runs_scored_on_validation(study, optuna):
    out, url = study
    trials = optuna.load_study(study_name="tiny", storage=url).trials
    assert [t.number for t in trials] == [0, 1, 2, 3] and all(t.state.name == "COMPLETE" for t in trials)
    assert len({tuple(sorted(t.params.items())) for t in trials}) > 1  # the sampler varies them
    for t in trials:
        folder = out / "trials" / f"trial-{t.number:04d}"
        saved = read_json(folder / "results.json")
        assert t.value == saved["results"]["validation"]["accuracy"]
        ran = load_config(folder / "hftl_config.yaml")
        assert (ran.train.learning_rate, ran.adapt.lora_r, ran.train.epochs) == (t.params["train.learning_rate"], t.params["adapt.lora_r"],
                                                                                 t.params["train.epochs"])
        # every evaluation during training reached the trial, at its optimizer step
        assert t.intermediate_values == {h["step"]: h["eval_accuracy"] for h in saved["history"]}
        assert len(t.intermediate_values) == 2 * t.params["train.epochs"]


def test_best_trial_is_a_preset_hftl_train_loads(study, optuna, capsys):
    from hftl.cli import main

    out, url = study
    best = optuna.load_study(study_name="tiny", storage=url).best_trial
    text = (out / "best.yaml").read_text()
    assert text.startswith(f"# hftl tune: the best of 4 finished trial(s) of study 'tiny': trial {best.number}, validation accuracy")
    loaded = load_config(out / "best.yaml")
    trained = load_config(out / "trials" / f"trial-{best.number:04d}" / "hftl_config.yaml")
    assert loaded.output.dir == str(out / "best")
    assert {k: v for k, v in flat(to_dict(loaded)).items() if k != "output.dir"} == \
           {k: v for k, v in flat(to_dict(trained)).items() if k != "output.dir"}
    capsys.readouterr()
    assert main(["train", str(out / "best.yaml")]) == 0  # and it trains to the trial's result
    assert read_json(out / "best" / "results.json")["results"]["validation"]["accuracy"] == best.value


def test_report_and_plots(study):
    out, url = study
    report = read_json(out / "report.json")
    text = (out / "report.md").read_text()
    assert report["counts"] == {"COMPLETE": 4} and report["best"]["preset"] == str(out / "best.yaml")
    assert f"Study `tiny` ({url}): 4 complete trial(s)" in text and "**Best: trial" in text
    for t in report["trials"]:
        assert f"| {t['number']} | complete | " in text and t["worker"] in text
    assert f"--storage {url}" in text and "train.learning_rate=log:0.003:0.03" in text
    for png in ("optimization_history.png", "param_importances.png", "intermediate_values.png"):
        assert report["plots"][png] == "drawn" and f"]({png})" in text
        with Image.open(out / png) as image:
            image.verify()
            assert image.size[0] > 100 and image.size[1] > 100


def test_rerun_continues_the_study(study, preset, optuna):
    from hftl.cli import main

    out, url = study
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("trials/*/results.json")}
    assert main(["tune", "--study-name", "tiny", "--storage", url, "--trials", "1", "--out", str(out), str(preset), *SPACE]) == 0
    trials = optuna.load_study(study_name="tiny", storage=url).trials
    assert [t.number for t in trials] == [0, 1, 2, 3, 4] and (out / "trials" / "trial-0004" / "results.json").is_file()
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # the earlier trials' runs are untouched
    # another search space is not mixed into this study
    assert main(["tune", "--study-name", "tiny", "--storage", url, "--trials", "1", "--out", str(out), str(preset),
                 "train.learning_rate=log:0.001:0.01"]) == 2


def test_pruned_trial_stops_at_its_first_evaluation(overrides, tmp_path, optuna):
    class PruneAfterFirstTrial(optuna.pruners.BasePruner):
        """Prunes every trial but the first at its first evaluation."""

        def prune(self, study, trial) -> bool:
            return trial.number > 0

    base = load_config(None, overrides)
    out = tmp_path / "report"
    report = tune(base, [parse_param("train.learning_rate=log:0.003:0.03")], 2, out, study_name="p", pruner=PruneAfterFirstTrial(),
                  sampler_seed=0)
    first, second = optuna.load_study(study_name="p", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(out / "study.journal")))).trials  # the default storage: a journal in OUT
    assert (first.state.name, second.state.name) == ("COMPLETE", "PRUNED")
    assert len(first.intermediate_values) == 6 and list(second.intermediate_values) == [4]  # 3 epochs; stopped at step 4 of 24
    assert (out / "trials" / "trial-0000" / "results.json").is_file() and not (out / "trials" / "trial-0001").exists()
    assert report["counts"] == {"COMPLETE": 1, "PRUNED": 1} and "| 1 | pruned |" in (out / "report.md").read_text()


def test_two_workers_share_one_study(preset, tmp_path, optuna):
    """Two `hftl tune` processes, as on two machines sharing a filesystem: one journal file, one study."""
    journal, out = tmp_path / "shared" / "study.journal", tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    workers = [subprocess.Popen([sys.executable, "-m", "hftl", "tune", str(preset), "--trials", "2", "--study-name", "shared",
                                 "--storage", f"journal:{journal}", "--sampler-seed", str(i), "--out", str(out), *SPACE[:2],
                                 "train.epochs=1"],
                                cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    for w in workers:
        _, err = w.communicate(timeout=600)
        assert w.returncode == 0, err[-3000:]
    trials = optuna.load_study(study_name="shared", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal)))).trials
    assert sorted(t.number for t in trials) == [0, 1, 2, 3] and all(t.state.name == "COMPLETE" for t in trials)
    by_worker = {}
    for t in trials:
        by_worker.setdefault(t.user_attrs["worker"], []).append(t.number)
    assert sorted(len(v) for v in by_worker.values()) == [2, 2]  # each worker ran its own two
    assert sorted(p.name for p in (out / "trials").iterdir()) == [f"trial-{n:04d}" for n in range(4)]
    for t in trials:
        assert read_json(out / "trials" / f"trial-{t.number:04d}" / "results.json")["results"]["validation"]["accuracy"] == t.value
