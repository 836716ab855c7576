"""Domain mismatch between the training rows and data.target (hftl/domain.py): the measures on synthetic
features, then through `hftl train` with a target identical to the training rows and one from another vocabulary."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from conftest import LETTERS, read_json, write_rows
from hftl import domain


def features(n: int, seed: int, shift: float = 0.0, dim: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)) + shift


def test_identical_features_give_zero():
    x = features(200, 0)
    g = domain.gap(x, x.copy())
    assert g["a_distance"] < 0.2 and g["mmd"] < 1e-6
    assert g["rows"] == 200 and "little domain shift" in g["reading"]


def test_same_distribution_is_near_zero_even_with_unequal_counts():
    # 400 vs 100 rows: always guessing "source" is right 80% of the time; the balanced error is not fooled.
    g = domain.gap(features(400, 1), features(100, 2))
    assert g["a_distance"] < 0.5 and g["mmd"] < 0.3, g


def test_shifted_features_give_near_two():
    g = domain.gap(features(200, 3), features(200, 4, shift=3.0))
    assert g["a_distance"] > 1.9 and g["domain_classifier_error"] < 0.05 and g["mmd"] > 0.8, g
    assert "large domain shift" in g["reading"]


def test_a_moderate_shift_lies_between():
    g = domain.gap(features(300, 5), features(300, 6, shift=0.3))
    assert 0.3 < g["a_distance"] < 1.7, g
    near, far = domain.mmd(features(300, 5), features(300, 6, shift=0.3)), domain.mmd(features(300, 5), features(300, 6, shift=3.0))
    assert 0 < near < far


def letter_rows(n: int, seed: int) -> list[dict]:
    """Unlabelled rows of letter strings: words the toy sentiment rows never use."""
    rng = random.Random(seed)
    return [{"text": " ".join("".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6))) for _ in range(rng.randint(1, 3)))}
            for _ in range(n)]


@pytest.fixture(scope="module")
def runs(make_cfg, toy_rows_train, tmp_path_factory) -> dict[str, Path]:
    """Output folders of the same run without data.target, with the training rows as target, and with letter rows."""
    from hftl.recipe import train as main

    folder = tmp_path_factory.mktemp("domain")
    targets = {"none": None,
               "same": write_rows(folder / "same.csv", [{"text": r["text"]} for r in toy_rows_train]),
               "letters": write_rows(folder / "letters.csv", letter_rows(64, 0))}
    out = {}
    for name, target in targets.items():
        cfg = make_cfg(folder / name, adapt__mode="full", train__epochs=2, data__target=str(target) if target else None)
        main(cfg)
        out[name] = Path(cfg.output.dir)
    return out


def test_train_measures_the_gap_before_training(runs):
    same, letters = (read_json(runs[n] / "results.json")["domain_gap"] for n in ("same", "letters"))
    # The same 64 rows as target: identical features, nothing to tell apart.
    assert same["rows"] == 64 and same["a_distance"] < 0.2 and same["mmd"] < 1e-4, same
    # Another vocabulary: the pretrained features separate it.
    assert letters["rows"] == 64 and letters["a_distance"] > 1.2 and letters["mmd"] > same["mmd"] + 0.2, letters
    card = (runs["letters"] / "README.md").read_text()
    line = next(l for l in card.splitlines() if l.startswith("- Domain mismatch"))
    assert f"proxy A-distance {letters['a_distance']:.2f}" in line and "(64 of each" in line and letters["reading"] in line
    assert read_json(runs["none"] / "results.json")["domain_gap"] is None
    assert "Domain mismatch" not in (runs["none"] / "README.md").read_text()


def test_the_estimate_leaves_training_unchanged(runs):
    """It draws no random numbers training would see: an unlabelled target (no alignment) trains exactly as without."""
    base = read_json(runs["none"] / "results.json")
    for name in ("same", "letters"):
        got = read_json(runs[name] / "results.json")
        assert got["history"] == base["history"] and got["step_log"] == base["step_log"], name
        assert read_json(runs[name] / "predictions_validation.json") == read_json(runs["none"] / "predictions_validation.json")


def test_too_few_rows_are_reported_not_measured():
    from types import SimpleNamespace

    said = []
    assert domain.estimate(None, [], list(range(50)), list(range(3)), None, 8, SimpleNamespace(print=said.append), 0) is None
    assert said == ["domain mismatch not measured: it needs at least 5 training and 5 data.target rows, got 50 and 3."]


def test_a_large_shift_advises_adaptation_only_to_a_run_that_does_not_adapt():
    assert "consider adapt.align" in domain.reading(1.9)
    adapting = domain.reading(1.9, adapting=True)
    assert "large domain shift" in adapting and "consider" not in adapting and "labelled target rows" in adapting


def test_the_card_states_each_transfer_option_with_its_settings():
    from hftl import cards
    from hftl.config import Config, to_dict

    adapt = {**to_dict(Config())["adapt"], "align": "dann", "align_weight": 0.5, "layer_lr_decay": 0.8}
    options = cards.transfer_options(adapt, "full")
    assert options[0].startswith("adapt.layer_lr_decay=0.8") and options[1].startswith("adapt.align=dann, adapt.align_weight=0.5")
    assert cards.transfer_options(to_dict(Config())["adapt"], "full") == []
