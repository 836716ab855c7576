"""Model-card pictures (hftl/plots.py) and the card's overfitting check (hftl/cards)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

from conftest import read_json
from hftl import plots, trust
from hftl.cards import LOSS_RISE, overfitting_check

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check_png(path: Path, min_size: tuple[int, int] = (300, 300)) -> None:
    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 5000, f"{path}: {len(data)} bytes; an empty figure is smaller"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        w, h = image.size
        assert min_size[0] <= w <= 4000 and min_size[1] <= h <= 4000, image.size
        # Something was drawn: not a single flat colour.
        assert len(image.convert("L").getcolors(maxcolors=1 << 16) or range(2)) > 1


def test_confusion_counts_match_a_hand_count():
    labels = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    predicted = [0, 1, 0, 1, 2, 2, 2, 0, 2]
    by_hand = [[0] * 4 for _ in range(4)]  # 4 classes: class 3 has no rows and is never predicted
    for y, p in zip(labels, predicted):
        by_hand[y][p] += 1
    counts = plots.confusion_counts(labels, predicted, 4)
    assert counts.tolist() == by_hand == [[2, 1, 0, 0], [0, 1, 1, 0], [1, 0, 3, 0], [0, 0, 0, 0]]


def test_confusion_png_with_many_classes_and_an_empty_row(tmp_path):
    names = [f"class {i}" for i in range(40)]  # above MAX_ANNOTATED: colour only
    counts = plots.confusion_counts(list(range(39)) * 2, list(range(39)) + [0] * 39, len(names))
    out = plots.confusion_matrix_png(counts, names, tmp_path / "cm.png")
    assert out == tmp_path / "cm.png"
    check_png(out)


def history(points: list[tuple[float, float, float]]) -> list[dict]:
    """(train loss, validation loss, validation accuracy) per evaluation, 10 steps apart."""
    return [{"step": 10 * (i + 1), "epoch": i + 1, "train_loss": t, "eval_loss": v, "eval_accuracy": a}
            for i, (t, v, a) in enumerate(points)]


def test_overfitting_check_fires_when_validation_loss_rises_after_the_best():
    h = history([(0.70, 0.60, 0.70), (0.40, 0.40, 0.85), (0.20, 0.45, 0.84), (0.08, 0.52, 0.83)])
    text = overfitting_check(h, "accuracy")
    assert text.startswith("Signs of overfitting")
    assert "step 20 of 40" in text and "rose 30%" in text and "0.4000 -> 0.5200" in text
    assert "is 6.5x the training loss" in text  # 0.52 vs 0.08 at the end, too


def test_overfitting_check_fires_on_a_final_gap_alone():
    h = history([(0.70, 0.65, 0.70), (0.30, 0.60, 0.80), (0.10, 0.58, 0.82)])  # validation loss still falling
    text = overfitting_check(h, "accuracy")
    assert text.startswith("Signs of overfitting") and "rose" not in text and "5.8x the training loss" in text


def test_overfitting_check_stays_silent_on_a_healthy_run():
    h = history([(0.70, 0.60, 0.70), (0.45, 0.42, 0.80), (0.35, 0.36, 0.86), (0.30, 0.34, 0.88)])
    assert overfitting_check(h, "accuracy").startswith("No sign of overfitting")
    # A small rise (below LOSS_RISE) after the best, with the losses close, is noise, not overfitting.
    h = history([(0.50, 0.40, 0.80), (0.40, 0.40 * (1 + LOSS_RISE / 2), 0.79)])
    assert overfitting_check(h, "accuracy").startswith("No sign")
    # Lower-is-better metric: the best evaluation is the last, so a rise before it does not count.
    h = [dict(e, eval_error=1 - e["eval_accuracy"]) for e in history([(0.5, 0.4, 0.8), (0.45, 0.5, 0.9)])]
    assert overfitting_check(h, "error", greater_is_better=False).startswith("No sign")
    assert overfitting_check(h[:1], "accuracy").startswith("Not assessed")


@pytest.fixture(scope="module")
def run_out(make_cfg, tmp_path_factory) -> tuple[Path, list]:
    """The output folder of a run, and the (counts, label names) its confusion matrix was drawn from."""
    from hftl.recipe import train as main

    cfg = make_cfg(tmp_path_factory.mktemp("plots"), adapt__mode="full", train__epochs=3, train__evals_per_epoch=2)
    drawn, original = [], plots.confusion_matrix_png
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plots, "confusion_matrix_png", lambda counts, names, path, title="": drawn.append((counts, names)) or original(counts, names, path))
        main(cfg)
    return Path(cfg.output.dir), drawn


def test_train_writes_both_pictures_and_the_card_links_them(run_out, toy_rows_validation):
    run_out, drawn = run_out
    for name in (plots.CONFUSION_PNG, plots.CURVES_PNG):
        check_png(run_out / name)
    with Image.open(run_out / plots.CURVES_PNG) as image:
        assert image.width > image.height  # two panels side by side
    card = (run_out / "README.md").read_text()
    links = re.findall(r"!\[[^\]]+\]\(([^)]+)\)", card)
    assert links == [plots.CONFUSION_PNG, trust.RELIABILITY_PNG, plots.CURVES_PNG]  # relative: the Hub resolves them in the repo
    check_png(run_out / trust.RELIABILITY_PNG)
    assert "- Overfitting check: " in card and ("No sign" in card or "Signs of overfitting" in card)
    assert "Domain mismatch" not in card and "## Transfer check" not in card  # no data.target, no compare
    # The matrix drawn is the hand count of the saved predictions against the validation file's labels, row by row.
    predicted = read_json(run_out / "predictions_validation.json")
    names = ["negative", "positive"]
    by_hand = [[0, 0], [0, 0]]
    for row, p in zip(toy_rows_validation, predicted, strict=True):
        by_hand[names.index(row["label"])][names.index(p)] += 1
    (counts, drawn_names), = drawn
    assert counts.tolist() == by_hand and drawn_names == names
    results = read_json(run_out / "results.json")
    assert results["domain_gap"] is None
    assert abs(results["results"]["validation"]["accuracy"] - (by_hand[0][0] + by_hand[1][1]) / 16) < 1e-9
    assert len(results["history"]) == 6 and len(results["step_log"]) == results["history"][-1]["step"]


def test_card_renders_the_transfer_check_only_when_given():
    from hftl.cards import CardData, render

    data = CardData(model_name="m", base_model=None, dataset_name="d", dataset_id=None, pipeline_tag="text-classification",
                    mode="full", mode_help="h", labels=["a", "b"], trainable_params=1, total_params=2, hyperparameters={},
                    results={"validation": {"accuracy": 0.9}}, split_sizes={"train": 10, "validation": 5},
                    history=history([(0.5, 0.4, 0.8), (0.4, 0.35, 0.9)]))
    plain = str(render(data, ["accuracy"]))
    assert "## Transfer check" not in plain and "this run did not compare against such a baseline" in plain
    assert "- Overfitting check: No sign" in plain and "![" not in plain
    data.transfer_check = "Pretrained 0.90 vs from scratch 0.60 validation accuracy: transfer helped (+0.30)."
    card = str(render(data, ["accuracy"]))
    section = card.split("## Transfer check\n\n", 1)[1]
    assert section.startswith(data.transfer_check + "\n") and "see the transfer check above" in card
    assert "did not compare" not in card


def test_errorbar_png_with_ticks_log_scale_and_notes(tmp_path):
    series = {"head": ([0, 1, 2], [0.6, 0.7, 0.8], [0.05, 0.02, 0.0]), "full": ([0, 1, 2], [0.5, 0.75, 0.9], [0.1, 0.05, 0.01])}
    check_png(plots.errorbar_png(series, tmp_path / "labels.png", "labels per class", "accuracy", xticks=[4, 16, "all"]))
    by_params = {m: ([10, 1000, 100000][: len(v[0])], *v[1:]) for m, v in series.items()}
    out = plots.errorbar_png(by_params, tmp_path / "params.png", "trainable parameters", "accuracy", logx=True, connect=False,
                             notes={m: ["4/class", "16/class", "all"] for m in series})
    check_png(out)


def test_the_training_loss_trend_is_a_trailing_mean():
    assert plots.moving_average([4.0, 2.0, 6.0, 0.0], 2) == [4.0, 3.0, 4.0, 3.0]
    assert plots.moving_average([1.0, 2.0], 5) == [1.0, 1.5]


def test_no_text_of_a_picture_is_cut_off_and_a_single_evaluation_is_a_marker(tmp_path, monkeypatch):
    """Every label, tick and title of the confusion matrix (long class names) and of the learning curves lies inside
    the saved figure (constrained layout), and one evaluation is drawn as a visible marker, not an invisible line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.lines import Line2D
    from matplotlib.text import Text

    drawn, save = [], plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: (drawn.append(fig), save(fig, path))[1])
    names = ["a rather long class name", "short", "another quite long label"]
    plots.confusion_matrix_png(plots.confusion_counts([0, 1, 2, 1], [0, 2, 2, 1], 3), names, tmp_path / "cm.png")
    step_log = [{"step": s, "loss": 1 / s} for s in range(1, 41)]
    plots.learning_curves_png(step_log, history([(0.5, 0.4, 0.8)])[:1], "accuracy", tmp_path / "curves.png")
    assert len(drawn) == 2
    for fig in drawn:
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        # everything drawn (labels, tick labels, titles, the colour bar), in inches, against the figure's own box
        drawn_box, page = fig.get_tightbbox(canvas.get_renderer()), fig.bbox_inches
        assert page.x0 - 0.01 <= drawn_box.x0 and drawn_box.x1 <= page.x1 + 0.01, (drawn_box, page)
        assert page.y0 - 0.01 <= drawn_box.y0 and drawn_box.y1 <= page.y1 + 0.01, (drawn_box, page)
    assert "true label" in [t.get_text() for t in drawn[0].findobj(Text)]
    single = [ln for ln in drawn[1].findobj(Line2D) if len(ln.get_xdata()) == 1 and ln.get_label() == "validation accuracy"]
    assert single and single[0].get_marker() == "o" and single[0].get_markersize() > 0
