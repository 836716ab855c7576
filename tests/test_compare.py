"""`hftl compare`: modes x label budgets x seeds on the tiny BERT, the report folder, reuse, the fair scratch baseline,
each mode's learning rate chosen on validation, the verdicts against scratch, and the label budget data.samples_per_class
it varies."""
from __future__ import annotations

import shutil
import statistics
from collections import Counter

import pytest
from PIL import Image

from conftest import read_json, toy_rows, write_rows
from hftl.compare import (BETTER, INCONCLUSIVE, NEEDS_SEEDS, PNGS, PRETRAINED_ONLY, WORSE, choose, compare, overfitting, run_config,
                          scratch_config, verdict, widen, write_card_check)
from hftl.config import ConfigError, DataConfig, load_config, to_yaml
from hftl.data import DataError, load_splits

MODES, SEEDS, BUDGETS = ["lora"], [0, 1], ["4", "all"]
EXPECTED = {(m, b, s) for m in ("scratch", "head", "lora") for b in BUDGETS for s in SEEDS}
ONE_RATE = [1]  # the config's rate for every mode: these tests are about the runs and the report, not the rate search


@pytest.fixture(scope="module")
def overrides(tiny_bert, toy_data) -> list[str]:
    return [f"model.name_or_path={tiny_bert}", f"data.train_file={toy_data['train']}",
            f"data.validation_file={toy_data['validation']}", "data.max_length=16", "train.batch_size=8",
            "train.learning_rate=0.01", "train.max_steps=6", "train.evals_per_epoch=2", "train.log_every=1000",
            "output.verify_reload=0"]


@pytest.fixture(scope="module")
def report(overrides, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "report"
    return out, compare(load_config(None, overrides), MODES, SEEDS, BUDGETS, out, command="hftl compare --modes lora ...",
                        lr_scales=ONE_RATE)


def test_every_mode_budget_and_seed_ran_once(report):
    out, rep = report
    assert {(r["mode"], r["budget"], r["seed"]) for r in rep["runs"]} == EXPECTED
    assert len(rep["runs"]) == len(EXPECTED)
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(f"{m}-{b}-lr0.01-s{s}" for m, b, s in EXPECTED)
    # scratch really is random weights in full mode; the budget really limits the training rows
    assert "from_scratch: true" in (out / "runs" / "scratch-4-lr0.01-s0" / "hftl_config.yaml").read_text()
    # and its card says so, rather than "a local checkpoint adapted to ..."
    assert "a randomly initialised model in the architecture of" in (out / "runs" / "scratch-4-lr0.01-s0" / "README.md").read_text()
    assert "Training examples: 8;" in (out / "runs" / "head-4-lr0.01-s1" / "README.md").read_text()
    assert "Training examples: 64;" in (out / "runs" / "head-all-lr0.01-s1" / "README.md").read_text()


def test_report_md_table(report):
    out, rep = report
    text = (out / "report.md").read_text()
    for mode in ("scratch", "head", "lora"):
        for budget in BUDGETS:
            g = next(g for g in rep["groups"] if g["mode"] == mode and g["budget"] == budget)
            rate = "solved (none)" if mode == "head" else "0.01"  # head's is solved (adapt.solve_head): no rate to choose
            row = f"| {mode} | {budget} | {rate} | {g['validation']['mean']:.4f} ± {g['validation']['sd']:.4f} | {g['trainable_params']:,} |"
            assert row in text
    assert "hftl compare --modes lora ..." in text and "Machine: CPU:" in text
    # no test split: the verdicts read validation, which also chose the rates, and the report says so
    assert rep["verdict_split"] == "validation" and "No test split" in text
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
                  if (r["mode"], r["budget"]) == (g["mode"], g["budget"])]
        assert g["validation"]["mean"] == pytest.approx(statistics.fmean(values))
        assert g["validation"]["sd"] == pytest.approx(statistics.stdev(values))


def test_verdict_in_every_transferred_card(report):
    out, rep = report
    for r in rep["runs"]:
        card = (out / r["folder"] / "README.md").read_text()
        if r["mode"] == "scratch":
            assert "`hftl compare` trained this configuration" not in card
        else:
            g = next(g for g in rep["groups"] if (g["mode"], g["budget"]) == (r["mode"], r["budget"]))
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
    again = compare(load_config(None, overrides), MODES, SEEDS, BUDGETS, out, command="hftl compare --modes lora ...", lr_scales=ONE_RATE)
    assert calls == [] and {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert again["runs"] == rep["runs"]
    for r in rep["runs"]:  # the card's section is replaced, not added twice
        assert (out / r["folder"] / "README.md").read_text().count("## Transfer check") == (r["mode"] != "scratch")
    # an interrupted compare: only the missing run trains
    shutil.rmtree(out / "runs" / "lora-4-lr0.01-s1")
    compare(load_config(None, overrides), MODES, SEEDS, BUDGETS, out, lr_scales=ONE_RATE)
    assert calls == [str(out / "runs" / "lora-4-lr0.01-s1")]
    # a finished run of another configuration is not passed off as this one
    with pytest.raises(ConfigError, match=r"scratch-4-lr0.01-s0' is a finished run of another configuration \(train.max_steps: 6 there, 7 now"):
        compare(load_config(None, [*overrides, "train.max_steps=7"]), MODES, SEEDS, BUDGETS, out, lr_scales=ONE_RATE)


def test_verdicts():
    from scipy.stats import ttest_rel

    better = verdict([0.90, 0.91, 0.93], [0.60, 0.62, 0.61])
    assert better["verdict"] == BETTER and better["text"].startswith("better: 0.9133 ± 0.0153 vs scratch 0.6100 ± 0.0100 over 3 seed(s)")
    # the interval is the paired t-interval of the mean difference (scipy's own, computed another way)
    ci = ttest_rel([0.90, 0.91, 0.93], [0.60, 0.62, 0.61]).confidence_interval(0.95)
    assert (better["low"], better["high"]) == (pytest.approx(ci.low), pytest.approx(ci.high)) and better["gain"] == pytest.approx(0.3033, abs=1e-4)
    assert f"95% confidence interval [{ci.low:+.4f}, {ci.high:+.4f}] (paired by seed, t-distribution)" in better["text"]
    worse = verdict([0.50, 0.52, 0.51], [0.60, 0.62, 0.63])
    assert worse["verdict"] == WORSE and worse["text"].startswith("worse (negative transfer): ") and worse["high"] < 0
    # above scratch on average, but by less than the noise: neither better nor negative transfer
    noisy = verdict([0.80, 0.62, 0.75], [0.66, 0.70, 0.60])
    assert noisy["verdict"] == INCONCLUSIVE and noisy["gain"] > 0 and noisy["low"] < 0 < noisy["high"]
    assert noisy["text"].startswith("inconclusive: ") and noisy["text"].endswith("; more seeds narrow it")
    # one seed: no verdict, however large the difference
    one = verdict([0.95], [0.10])
    assert one["verdict"] == NEEDS_SEEDS == "needs at least 2 seeds" and one["low"] is None
    assert one["text"] == "no verdict, it needs at least 2 seeds (ran 1): 0.9500 ± 0.0000 vs scratch 0.1000 ± 0.0000 over 1 seed(s), gain +0.8500"
    assert verdict([0.20, 0.21, 0.19], [0.50, 0.52, 0.55], greater_is_better=False)["verdict"] == BETTER  # a loss: lower is better
    assert verdict([0.90, 0.90], [0.50, 0.50])["verdict"] == BETTER  # the same gain at every seed: no spread
    assert verdict([0.50, 0.60], [0.50, 0.60])["verdict"] == INCONCLUSIVE
    with pytest.raises(ValueError, match="pair by seed"):
        verdict([0.5, 0.6], [0.5])


def test_negative_verdict_lands_in_card(report, tmp_path):
    out, rep = report
    folder = shutil.copytree(out / "runs" / "head-4-lr0.01-s0", tmp_path / "run")
    old = next(g["transfer_check"] for g in rep["groups"] if (g["mode"], g["budget"]) == ("head", "4"))
    text = verdict([0.50, 0.52, 0.51], [0.60, 0.62, 0.63])["text"]
    write_card_check(folder, f"on validation accuracy, {text}.")
    card = (folder / "README.md").read_text()
    assert f"on validation accuracy, worse (negative transfer): 0.5100 ± 0.0100" in card and card.count("## Transfer check") == 1
    assert old in (out / "runs" / "head-4-lr0.01-s0" / "README.md").read_text() and old not in card  # replaced, not added
    assert card.startswith("---\n") and "pipeline_tag: text-classification" in card.split("---")[1]  # metadata kept


def test_scratch_is_fair(overrides, tmp_path):
    """Same architecture, random weights, every weight trainable, full mode: none of the options that presume pretrained weights."""
    presumes = ["adapt.freeze_feature_encoder=true", "adapt.l2sp=0.01", "adapt.layer_lr_decay=0.8", "adapt.pretrain=mlm",
                "adapt.pooling=mean", "adapt.layer=1"]
    base = load_config(None, [*overrides, "adapt.mode=lora", *presumes])
    cfg, changed = scratch_config(base)
    assert (cfg.model.from_scratch, cfg.adapt.mode) == (True, "full")
    a = cfg.adapt
    assert (a.freeze_feature_encoder, a.l2sp, a.layer_lr_decay, a.pretrain, a.pooling, a.layer) == (False, 0.0, 1.0, None, "auto", None)
    assert changed == ["model.from_scratch=true (the config: false)", "adapt.mode=full (the config: lora)",
                       "adapt.freeze_feature_encoder=false (the config: true)", "adapt.l2sp=0.0 (the config: 0.01)",
                       "adapt.layer_lr_decay=1.0 (the config: 0.8)", "adapt.pretrain=null (the config: mlm)",
                       "adapt.pooling=auto (the config: mean)", "adapt.layer=null (the config: 1)"]
    assert len(changed) == 2 + len(PRETRAINED_ONLY)
    # the transferred modes keep them; the rest of the config is the same for both
    lora = run_config(base, "lora", None, 0, 0.01, tmp_path / "lora")
    assert (lora.adapt.freeze_feature_encoder, lora.adapt.l2sp, lora.adapt.layer) == (True, 0.01, 1)
    scratch = run_config(base, "scratch", None, 0, 0.01, tmp_path / "scratch")
    assert (scratch.train, scratch.data) == (lora.train, lora.data)


def test_rate_grid_choice_and_widening():
    grid = [0.003, 0.01, 0.03, 0.1]  # 0.01 x 0.3, 1, 3, 10
    assert widen(grid, 0.1) == 0.3 and widen(grid, 0.003) == 0.0009  # one step beyond the edge the best sits on
    assert widen(grid, 0.01) is None and widen([0.01], 0.01) is None
    assert choose({0.003: 0.6, 0.01: 0.7, 0.03: 0.65}, True) == 0.01
    assert choose({0.003: 0.7, 0.01: 0.7}, True) == 0.003  # a tie keeps the smaller rate
    assert choose({0.003: 0.4, 0.01: 0.3}, False) == 0.01  # e.g. loss: lower is better
    assert choose({0.003: 0.6, 0.01: None}, True) == 0.003 and choose({0.01: None}, True) is None  # a diverged rate is no choice


def test_each_rate_is_chosen_on_validation_and_the_verdict_reads_test(overrides, tmp_path, monkeypatch):
    """Scratch's rate from a grid where one rate diverges (recorded, not retried); head solved, with no rate; the verdict on
    the test split; one seed: no verdict."""
    import hftl.compare

    test = write_rows(tmp_path / "test.csv", toy_rows(24, seed=2))
    base = load_config(None, [*overrides, f"data.test_file={test}", "adapt.pooling=mean"])
    out = tmp_path / "report"
    rep = compare(base, [], [0], ["all"], out, lr_scales=[1, 1e8])  # 0.01 and 1e6, which diverges
    scratch, head = rep["groups"]
    search = scratch["lr_search"]
    assert (search["how"], search["widened"]) == ("grid", 1e-10)  # 0.01, the best left, sat at the grid's lower edge
    runs = {r["learning_rate"]: r for r in rep["runs"] if r["mode"] == "scratch"}
    assert sorted(runs) == [1e-10, 0.01, 1e6] and runs[1e6]["diverged"].startswith("non-finite training loss")
    assert (out / "runs" / "scratch-all-lr1e+06-s0.diverged.json").is_file() and not (out / "runs" / "scratch-all-lr1e+06-s0").exists()
    val = {lr: read_json(out / r["folder"] / "results.json")["results"]["validation"]["accuracy"] for lr, r in runs.items() if lr != 1e6}
    assert search["validation"] == {"1e-10": val[1e-10], "0.01": val[0.01], "1e+06": None}
    assert search["chosen"] == scratch["learning_rate"] == choose(val, True)
    assert search["at_edge"] == (search["chosen"] == 1e-10)  # above 0.01 lies 1e6, which diverged: that edge is bounded
    assert [r["chosen"] for r in rep["runs"] if r["mode"] == "scratch"] == [lr == search["chosen"] for lr in sorted(runs)]
    # head: solved on the features, one run, no rate
    assert head["lr_search"]["how"] == "solved" and [r["folder"] for r in rep["runs"] if r["mode"] == "head"] == ["runs/head-all-lr0.01-s0"]
    # the verdict reads test, which chose nothing; one seed gives none
    assert rep["verdict_split"] == "test" and head["verdict"]["verdict"] == NEEDS_SEEDS
    chosen = next(r for r in rep["runs"] if r["mode"] == "scratch" and r["chosen"])
    assert scratch["test"]["mean"] == chosen["results"]["test"]["accuracy"]
    text = (out / "report.md").read_text()
    assert "| head | all | solved (none) |" in text and "No test split" not in text
    assert f"- scratch, all: 1e-10: {val[1e-10]:.4f}, 0.01: {val[0.01]:.4f}, 1e+06: diverged; chosen {search['chosen']:g}" in text
    assert "- head, all labels/class: no verdict, it needs at least 2 seeds (ran 1)" in text
    assert "on test accuracy, no verdict, it needs at least 2 seeds (ran 1)" in (out / "runs" / "head-all-lr0.01-s0" / "README.md").read_text()
    # the fair baseline: a pooling chosen for pretrained features; scratch ran with the architecture's own, and the report says so
    assert "`adapt.pooling=auto (the config: mean)`" in text and "`model.from_scratch=true (the config: false)`" in text
    assert load_config(out / chosen["folder"] / "hftl_config.yaml").adapt.pooling == "auto"
    assert load_config(out / "runs" / "head-all-lr0.01-s0" / "hftl_config.yaml").adapt.pooling == "mean"
    # a rerun trains nothing: finished runs are read back, the diverged one is not tried again
    monkeypatch.setattr(hftl.compare, "train", lambda cfg: pytest.fail(f"trained {cfg.output.dir}"))
    assert compare(base, [], [0], ["all"], out, lr_scales=[1, 1e8])["groups"] == rep["groups"]


def test_rates_from_the_tuner(overrides, tmp_path, monkeypatch):
    pytest.importorskip("optuna")
    import hftl.compare

    base = load_config(None, overrides)
    rep = compare(base, [], [0], ["all"], tmp_path, lr_scales=[1, 10], lr_trials=2)
    search = rep["groups"][0]["lr_search"]
    rates = sorted(float(r) for r in search["validation"])
    assert search["how"] == "tuner" and len(rates) == 2 and all(0.01 <= r <= 0.1 for r in rates)
    assert search["chosen"] == choose({float(r): v for r, v in search["validation"].items()}, True)
    assert "2 Optuna TPE trials over 0.01 to 0.1 (log scale" in (tmp_path / "report.md").read_text()
    # the sampler is seeded: a rerun proposes the same rates and reuses their runs
    monkeypatch.setattr(hftl.compare, "train", lambda cfg: pytest.fail(f"trained {cfg.output.dir}"))
    assert compare(base, [], [0], ["all"], tmp_path, lr_scales=[1, 10], lr_trials=2)["groups"] == rep["groups"]


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
               "--lr-scales", "1", "--out", str(tmp_path), "train.batch_size=8"])
    printed, err = capsys.readouterr()
    assert rc == 0, err
    assert "| scratch | all |" in printed and "## Transfer check" in printed and "| lora |" not in printed
    assert f"hftl compare {preset} --modes head --seeds 0 1 --labels-per-class all --lr-scales 1 --out {tmp_path} train.batch_size=8 train.max_steps=6" \
        in (tmp_path / "report.md").read_text()
    # another configuration is refused, not passed off as these runs
    assert main(["compare", str(preset), "--modes", "head", "--seeds", "0", "--labels-per-class", "all", "--lr-scales", "1", "--out",
                 str(tmp_path), "train.max_steps=7"]) == 2
    assert "train.max_steps: 6 there, 7 now" in capsys.readouterr().err
    assert main(["compare", "--modes", "nope", "--out", str(tmp_path), *overrides]) == 2
    assert "--modes nope: unknown mode" in capsys.readouterr().err
    assert main(["compare", "--labels-per-class", "0", "--out", str(tmp_path), *overrides]) == 2
    assert "--labels-per-class '0'" in capsys.readouterr().err
    assert main(["compare", "--lr-scales", "0", "1", "--out", str(tmp_path), *overrides]) == 2
    assert "--lr-scales 0 1: give one or more positive numbers" in capsys.readouterr().err
    assert main(["compare", "--lr-scales", "x", "--out", str(tmp_path), *overrides]) == 2
    assert "--lr-scales x: give positive numbers" in capsys.readouterr().err


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


def test_few_shot_without_validation(overrides, tmp_path, monkeypatch):
    """data.validation_fraction=0 (every labelled row trains): one rate runs and the verdict reads test; a rate grid, which
    would need validation to choose on, is refused before any run."""
    import hftl.compare

    test = write_rows(tmp_path / "test.csv", toy_rows(24, seed=2))
    base = load_config(None, [*overrides, "data.validation_file=null", "data.validation_fraction=0", f"data.test_file={test}"])
    with monkeypatch.context() as m:
        m.setattr(hftl.compare, "train", lambda cfg: pytest.fail("a run started"))
        with pytest.raises(ConfigError, match=r"no validation split to choose each mode's learning rate on; give --lr-scales 1"):
            compare(base, ["lora"], [0, 1], ["4"], tmp_path / "grid", lr_scales=[0.3, 1, 3])
    rep = compare(base, [], [0, 1], ["4"], tmp_path / "one", lr_scales=[1])
    assert rep["verdict_split"] == "test" and rep["splits"] == ["test"]
    assert {g["mode"] for g in rep["groups"]} == {"scratch", "head"}
    assert all("validation" not in r["results"] for r in rep["runs"])
    assert "nothing was chosen" in (tmp_path / "one" / "report.md").read_text()
