"""`hftl compare`: modes x label budgets x seeds on the tiny BERT, the report folder, reuse, the negative-transfer guard,
and the label budget data.samples_per_class it varies."""
from __future__ import annotations

import shutil
import statistics
from collections import Counter

import pytest
from PIL import Image

from conftest import read_json
from hftl.compare import NO_GAIN, PNGS, compare, guard, overfitting, write_card_check
from hftl.config import ConfigError, DataConfig, load_config, to_yaml
from hftl.data import DataError, load_splits

MODES, SEEDS, BUDGETS = ["lora"], [0, 1], ["4", "all"]
EXPECTED = {(m, b, s) for m in ("scratch", "head", "lora") for b in BUDGETS for s in SEEDS}


@pytest.fixture(scope="module")
def overrides(tiny_bert, toy_data) -> list[str]:
    return [f"model.name_or_path={tiny_bert}", f"data.train_file={toy_data['train']}",
            f"data.validation_file={toy_data['validation']}", "data.max_length=16", "train.batch_size=8",
            "train.learning_rate=0.01", "train.max_steps=6", "train.evals_per_epoch=2", "train.log_every=1000",
            "output.verify_reload=0"]


@pytest.fixture(scope="module")
def report(overrides, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "report"
    return out, compare(load_config(None, overrides), MODES, SEEDS, BUDGETS, out, command="hftl compare --modes lora ...")


def test_every_mode_budget_and_seed_ran_once(report):
    out, rep = report
    assert {(r["mode"], r["labels_per_class"], r["seed"]) for r in rep["runs"]} == EXPECTED
    assert len(rep["runs"]) == len(EXPECTED)
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(f"{m}-{b}-s{s}" for m, b, s in EXPECTED)
    # scratch really is random weights in full mode; the budget really limits the training rows
    assert "from_scratch: true" in (out / "runs" / "scratch-4-s0" / "hftl_config.yaml").read_text()
    assert "Training examples: 8;" in (out / "runs" / "head-4-s1" / "README.md").read_text()
    assert "Training examples: 64;" in (out / "runs" / "head-all-s1" / "README.md").read_text()


def test_report_md_table(report):
    out, rep = report
    text = (out / "report.md").read_text()
    for mode in ("scratch", "head", "lora"):
        for budget in BUDGETS:
            g = next(g for g in rep["groups"] if g["mode"] == mode and g["labels_per_class"] == budget)
            row = f"| {mode} | {budget} | {g['validation']['mean']:.4f} ± {g['validation']['sd']:.4f} | {g['trainable_params']:,} |"
            assert row in text
    assert "hftl compare --modes lora ..." in text and "Machine: CPU:" in text
    for g in rep["groups"]:
        if g["mode"] != "scratch":
            assert g["transfer_check"] in text
    # head trains the classifier only; lora adds adapters; scratch trains everything
    params = {g["mode"]: g["trainable_params"] for g in rep["groups"]}
    assert params["head"] < params["lora"] < params["scratch"]


def test_plots_are_png(report):
    out, _ = report
    for png in PNGS:
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", png
        with Image.open(out / png) as image:
            image.verify()
            assert image.size[0] > 100 and image.size[1] > 100


def test_report_json_equals_runs(report):
    out, rep = report
    assert read_json(out / "report.json") == rep
    for r in rep["runs"]:
        saved = read_json(out / r["folder"] / "results.json")
        assert r["results"] == saved["results"]
        assert (r["train_seconds"], r["trainable_params"]) == (saved["train_seconds"], saved["trainable_params"])
    for g in rep["groups"]:
        values = [r["results"]["validation"]["accuracy"] for r in rep["runs"]
                  if (r["mode"], r["labels_per_class"]) == (g["mode"], g["labels_per_class"])]
        assert g["validation"]["mean"] == pytest.approx(statistics.fmean(values))
        assert g["validation"]["sd"] == pytest.approx(statistics.stdev(values))


def test_verdict_in_every_transferred_card(report):
    out, rep = report
    for r in rep["runs"]:
        card = (out / r["folder"] / "README.md").read_text()
        if r["mode"] == "scratch":
            assert "`hftl compare` trained this configuration" not in card
        else:
            g = next(g for g in rep["groups"] if (g["mode"], g["labels_per_class"]) == (r["mode"], r["labels_per_class"]))
            assert g["transfer_check"] in card and card.count("## Transfer check") == 1
            # where the template puts it, and the limits paragraph no longer says there was no baseline
            assert card.index("## Results") < card.index("## Transfer check") < card.index("## Training")
            assert "did not compare against such a baseline" not in card and "see the transfer check above" in card


def test_rerun_reuses_finished_runs(report, overrides, monkeypatch):
    import hftl.recipe as recipe

    out, rep = report
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/results.json")}
    calls = []
    original = recipe.train
    monkeypatch.setattr(recipe, "train", lambda cfg: calls.append(cfg.output.dir) or original(cfg))
    again = compare(load_config(None, overrides), MODES, SEEDS, BUDGETS, out, command="hftl compare --modes lora ...")
    assert calls == [] and {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert again["runs"] == rep["runs"]
    for r in rep["runs"]:  # the card's section is replaced, not added twice
        assert (out / r["folder"] / "README.md").read_text().count("## Transfer check") == (r["mode"] != "scratch")
    # an interrupted compare: only the missing run trains
    shutil.rmtree(out / "runs" / "lora-4-s1")
    compare(load_config(None, overrides), MODES, SEEDS, BUDGETS, out)
    assert calls == [str(out / "runs" / "lora-4-s1")]
    # a finished run of another configuration is not passed off as this one
    with pytest.raises(ConfigError, match=r"scratch-4-s0' is a finished run of another configuration \(train.learning_rate: 0.01 there, 0.02 now"):
        compare(load_config(None, [*overrides, "train.learning_rate=0.02"]), MODES, SEEDS, BUDGETS, out)


def test_guard_fires_on_negative_transfer_only():
    gain, text = guard([0.50, 0.52], [0.60, 0.62])  # transfer below scratch
    assert not gain and text.startswith(NO_GAIN) and "0.5100 ± 0.0141 vs scratch 0.6100 ± 0.0141" in text
    gain, text = guard([0.70, 0.80], [0.66, 0.74])  # above, but within the larger sd (0.0707)
    assert not gain and NO_GAIN in text
    gain, text = guard([0.90, 0.91], [0.60, 0.62])  # clearly better
    assert gain and NO_GAIN not in text and "gain +0.2950" in text
    assert not guard([0.605], [0.60])[0] and guard([0.62], [0.60])[0]  # one seed: more than one point
    assert guard([0.20, 0.21], [0.50, 0.52], greater_is_better=False)[0]  # e.g. a loss: lower is better


def test_negative_verdict_lands_in_card(report, tmp_path):
    out, rep = report
    folder = shutil.copytree(out / "runs" / "head-4-s0", tmp_path / "run")
    old = next(g["transfer_check"] for g in rep["groups"] if (g["mode"], g["labels_per_class"]) == ("head", "4"))
    _, text = guard([0.50, 0.52], [0.60, 0.62])
    write_card_check(folder, f"on validation accuracy, {text}.")
    card = (folder / "README.md").read_text()
    assert NO_GAIN in card and "0.5100 ± 0.0141" in card and card.count("## Transfer check") == 1
    assert old in (out / "runs" / "head-4-s0" / "README.md").read_text() and old not in card  # replaced, not added
    assert card.startswith("---\n") and "pipeline_tag: text-classification" in card.split("---")[1]  # metadata kept


def test_overfitting_flag():
    rising = [{"step": 2, "train_loss": 0.6, "eval_loss": 0.40, "eval_accuracy": 0.9},
              {"step": 4, "train_loss": 0.2, "eval_loss": 0.70, "eval_accuracy": 0.8}]
    falling = [{"step": 2, "train_loss": 0.6, "eval_loss": 0.50, "eval_accuracy": 0.8},
               {"step": 4, "train_loss": 0.4, "eval_loss": 0.45, "eval_accuracy": 0.9}]
    assert "validation loss rose" in overfitting(rising, "accuracy", True)
    assert overfitting(falling, "accuracy", True) is None


def test_cli(report, overrides, tmp_path, capsys):
    from hftl.cli import main

    out, _ = report
    shutil.copytree(out / "runs", tmp_path / "runs")  # finished runs: the command only reports
    preset = tmp_path / "preset.yaml"  # the runs' configuration, read back as `hftl train` reads a preset
    preset.write_text(to_yaml(load_config(None, overrides)))
    # key=value after the options, and after a list option
    rc = main(["compare", str(preset), "--modes", "head", "train.max_steps=6", "--seeds", "0", "1", "--labels-per-class", "all",
               "--out", str(tmp_path), "train.batch_size=8"])
    printed, err = capsys.readouterr()
    assert rc == 0, err
    assert "| scratch | all |" in printed and "## Transfer check" in printed and "| lora |" not in printed
    assert f"hftl compare {preset} --modes head --seeds 0 1 --labels-per-class all --out {tmp_path} train.batch_size=8 train.max_steps=6" \
        in (tmp_path / "report.md").read_text()
    # another configuration is refused, not passed off as these runs
    assert main(["compare", str(preset), "--modes", "head", "--seeds", "0", "--labels-per-class", "all", "--out", str(tmp_path),
                 "train.max_steps=7"]) == 2
    assert "train.max_steps: 6 there, 7 now" in capsys.readouterr().err
    assert main(["compare", "--modes", "nope", "--out", str(tmp_path), *overrides]) == 2
    assert "--modes nope: unknown mode" in capsys.readouterr().err
    assert main(["compare", "--labels-per-class", "0", "--out", str(tmp_path), *overrides]) == 2
    assert "--labels-per-class '0'" in capsys.readouterr().err


def test_samples_per_class(toy_data):
    def load(seed=0, **kw):
        return load_splits(DataConfig(train_file=str(toy_data["train"]), **kw), seed)[0]

    splits = load(samples_per_class=3, validation_file=str(toy_data["validation"]))
    assert Counter(splits["train"]["labels"]) == {0: 3, 1: 3} and len(splits["validation"]) == 16
    rows = lambda s: sorted(load(seed=s, samples_per_class=3)["train"]["text"])  # noqa: E731
    assert rows(0) == rows(0) and rows(0) != rows(1)  # seeded
    # validation is carved first (7 of 64 rows, stratified): 28 negative and 29 positive rows are left for training
    assert Counter(load(samples_per_class=28)["train"]["labels"]) == {0: 28, 1: 28}
    with pytest.raises(DataError, match=r"samples_per_class=29, .*label 'negative' has 28 row\(s\); lower data.samples_per_class to at most 28"):
        load(samples_per_class=29)
