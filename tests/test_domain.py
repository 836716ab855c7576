"""Unlabelled target data (data.target), domain adaptation (adapt.align: dann, coral, mmd) and instance
reweighting (adapt.reweight), on the tiny BERT.

The target domain's texts carry the same sentiment words as the source's plus words the source never
uses (single letters), and labels, which give a 'target' evaluation. One run per alignment method
and one reweighted run (module-scoped); the tests read what they recorded and wrote. One run each on
tiny ViT and wav2vec2 models covers image and audio targets.
"""
from __future__ import annotations

import json

import math
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import NEGATIVE, POSITIVE, SPECIALS, read_json, toy_rows, write_rows
from hftl.config import ConfigError
from hftl.data import DataError

LETTERS = "qxzjkvw"
FIRST_LETTER_ID = len(SPECIALS + POSITIVE + NEGATIVE)  # token ids from here on are letters (see conftest.VOCAB)


def target_rows(n: int, seed: int) -> list[dict]:
    """toy rows with three to five letter words added: the target domain's vocabulary shift."""
    rng = random.Random(seed)
    return [{"text": " ".join([r["text"], *rng.choices(LETTERS, k=rng.randint(3, 5))]), "label": r["label"]}
            for r in toy_rows(n, seed)]


@pytest.fixture(scope="module")
def target_file(tmp_path_factory) -> Path:
    return write_rows(tmp_path_factory.mktemp("target") / "target.csv", target_rows(24, seed=7))


def train(make_cfg, folder, **overrides) -> tuple[dict, Path, SimpleNamespace]:
    """A run of cfg.task's recipe (make_cfg's tiny BERT and toy data unless overridden); also returns what
    build_hooks saw: the context, the hooks, and the DANN discriminator's weights before training."""
    import hftl.adapt
    from hftl.recipe import train as run_recipe

    seen = SimpleNamespace(ctx=None, hooks=[], initial={})
    original = hftl.adapt.build_hooks

    def build_hooks(model, mode, ctx):
        seen.ctx, seen.hooks = ctx, original(model, mode, ctx)
        for h in seen.hooks:
            if getattr(h, "discriminator", None) is not None:
                seen.initial = {k: v.detach().clone() for k, v in h.discriminator.state_dict().items()}
        return seen.hooks

    cfg = make_cfg(folder, extra={"train.epochs": 2, "output.verify_reload": 8, **overrides})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hftl.adapt, "build_hooks", build_hooks)
        results = run_recipe(cfg)
    return results, Path(cfg.output.dir), seen


# ---------------------------------------------------------------- the alignment terms


def test_gradient_reversal_is_identity_forward_and_negated_backward():
    from hftl.adapt.align import GradientReversal, dann_coefficient

    x = torch.randn(4, 3, requires_grad=True)
    y = GradientReversal.apply(x, 0.7)
    assert torch.equal(y, x)
    upstream = torch.randn(4, 3)
    (grad,) = torch.autograd.grad(y, x, upstream)
    assert torch.allclose(grad, -0.7 * upstream)
    assert dann_coefficient(0.0) == 0.0 and 0.98 < dann_coefficient(0.5) < dann_coefficient(1.0) < 1.0
    assert dann_coefficient(0.1) == pytest.approx(2 / (1 + math.exp(-1)) - 1)


@pytest.mark.parametrize("name", ["coral", "mmd"])
def test_alignment_terms_zero_for_same_features_positive_for_shifted(name):
    from hftl.adapt import align

    term = getattr(align, name)
    torch.manual_seed(0)
    a, b = torch.randn(32, 8), torch.randn(32, 8)
    same = a.clone().requires_grad_(True)
    zero = term(same, a)
    assert abs(zero.item()) < 1e-6
    zero.backward()  # identical rows (distance 0) must not give NaN gradients
    assert torch.isfinite(same.grad).all()
    shifted = term(a, 3 * b + 2)  # other mean (mmd) and other covariance (coral)
    assert shifted.item() > 0.05
    assert shifted.item() > 5 * abs(term(a, b).item())  # two samples of one distribution are far closer


# ---------------------------------------------------------------- data.target


def test_target_loader_labelled_and_unlabelled(tmp_path, target_file):
    from hftl.config import DataConfig
    from hftl.data import load_target

    names = ["negative", "positive"]
    splits, skipped = load_target(DataConfig(target=str(target_file)), names, ("text_column", "text_pair_column"))
    assert sorted(splits) == ["target", "train"] and skipped == {}
    rows = target_rows(24, seed=7)
    assert splits["target"]["labels"] == [names.index(r["label"]) for r in rows]
    assert splits["target"]["text"] == [r["text"] for r in rows]
    assert splits["train"]["labels"] == [0] * 24  # inputs only: their labels are never trained on
    unlabelled = write_rows(tmp_path / "unlabelled.jsonl", [{"text": r["text"]} for r in rows])
    splits, _ = load_target(DataConfig(target=str(unlabelled)), names, ("text_column", "text_pair_column"))
    assert list(splits) == ["train"] and splits["train"]["text"] == [r["text"] for r in rows]


# ---------------------------------------------------------------- alignment runs


@pytest.fixture(scope="module", params=["dann", "coral", "mmd"])
def aligned(request, make_cfg, target_file, tmp_path_factory):
    return request.param, *train(make_cfg, tmp_path_factory.mktemp(request.param),
                                 **{"adapt.align": request.param, "data.target": str(target_file)})


def test_align_trains_and_reports_target_metrics(aligned):
    name, results, out, seen = aligned
    assert set(results["target"]) >= {"accuracy", "f1", "loss"}
    assert read_json(out / "results.json")["results"]["target"] == results["target"]
    (hook,) = [h for h in seen.hooks if getattr(h, "name", None) == name]
    steps = len(read_json(out / "results.json")["step_log"])
    assert len(hook.history) == steps and all(math.isfinite(v) for v in hook.history)
    if name == "dann":  # a domain classifier's cross-entropy on two classes starts near log 2
        assert 0.3 < hook.history[0] < 1.2
    else:
        assert all(v >= -1e-6 for v in hook.history) and max(hook.history) > 0


@pytest.mark.parametrize("aligned", ["dann"], indirect=True)
def test_dann_discriminator_trains_and_is_not_saved(aligned):
    _, _, out, seen = aligned
    (hook,) = [h for h in seen.hooks if getattr(h, "name", None) == "dann"]
    after = hook.discriminator.state_dict()
    assert seen.initial and all(not torch.equal(seen.initial[k], after[k].cpu()) for k in seen.initial)
    from transformers import AutoModelForSequenceClassification

    saved = load_file(str(out / "model.safetensors"))
    model, info = AutoModelForSequenceClassification.from_pretrained(str(out), output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, nothing unexpected
    assert set(saved) == set(model.state_dict())
    assert not any(t.shape == after["0.weight"].shape and torch.equal(t, after["0.weight"].cpu()) for t in saved.values())


# ---------------------------------------------------------------- reweighting


def test_clipped_weights_have_mean_one_and_respect_the_clip():
    from hftl.adapt.reweight import clipped_weights

    assert np.allclose(clipped_weights(np.array([100.0, 1, 1, 1]), 2.0), [2, 2 / 3, 2 / 3, 2 / 3])
    assert np.allclose(clipped_weights(np.array([2.0, 1, 1]), 10.0), [1.5, 0.75, 0.75])  # the clip does not bind
    assert np.allclose(clipped_weights(np.array([5.0, 1, 3, 1]), 1.0), 1)


@pytest.fixture(scope="module")
def reweighted(make_cfg, target_file, tmp_path_factory):
    # The source: the toy rows, and 16 more that look like the target (its letter words).
    folder = tmp_path_factory.mktemp("reweight")
    train_file = write_rows(folder / "train.csv", toy_rows(64, seed=0) + target_rows(16, seed=3))
    return train(make_cfg, folder, **{"adapt.reweight": True, "adapt.reweight_clip": 3, "data.target": str(target_file),
                                      "data.train_file": str(train_file)})


def test_reweight_weights_favour_target_like_rows(reweighted):
    results, out, seen = reweighted
    assert "accuracy" in results["target"]
    (hook,) = [h for h in seen.hooks if hasattr(h, "weights")]
    w = hook.weights
    train = seen.ctx.encoded["train"]
    assert len(w) == len(train) == 80 and train["weight"] == pytest.approx(w.tolist())
    like = np.array([any(i >= FIRST_LETTER_ID for i in ids) for ids in train["input_ids"]])
    assert like.sum() == 16
    assert w[like].mean() > 3 * w[~like].mean()
    assert w.mean() == pytest.approx(1.0) and w.max() <= 3 + 1e-9 and w.min() > 0
    batch = seen.ctx.collator([train[i] for i in range(4)])  # the collator hands the weights to the loss hook
    assert batch["weight"].dtype == torch.float32 and batch["weight"].tolist() == pytest.approx(w[:4].tolist())
    # How much data the weighted loss is worth (Kish), in results.json and on the card's transfer options line
    ess = w.sum() ** 2 / (w ** 2).sum()
    assert 16 < ess < 80
    report = json.loads((out / "results.json").read_text())["options"]["reweight"]
    assert report == {"rows": 80, "effective_sample_size": round(ess, 1), "min": round(w.min(), 4), "max": round(w.max(), 4)}
    assert f"effective sample size {round(ess, 1):g} of 80 training rows" in (out / "README.md").read_text()


def test_weighted_loss_is_the_weighted_mean_cross_entropy(tiny_bert):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hftl.adapt.reweight import Reweight
    from hftl.tasks.single_label import SingleLabel

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=2)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_bert))
    batch = dict(tokenizer(["good", "bad awful", "nice x"], padding=True, return_tensors="pt"))
    labels, weight = torch.tensor([1, 0, 0]), torch.tensor([0.5, 2.0, 0.25])
    outputs = model(**batch, labels=labels)
    logits = outputs.logits.detach()
    by_hand = sum(weight[i] * -torch.log_softmax(logits[i], -1)[labels[i]] for i in range(3)) / 3
    hook = Reweight(weight.numpy(), SingleLabel(["negative", "positive"]))
    full = {**batch, "labels": labels, "weight": weight}
    assert hook.loss(model, full, outputs, outputs.loss, 0.0).item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert by_hand.item() != pytest.approx(outputs.loss.item(), rel=1e-3)
    # What an earlier hook added to the loss (a penalty) stays.
    assert hook.loss(model, full, outputs, outputs.loss + 5, 0.0).item() == pytest.approx(by_hand.item() + 5, rel=1e-5)


# ---------------------------------------------------------------- errors


def test_align_needs_target(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"adapt.align=coral .*data.target"):
        train(make_cfg, tmp_path, **{"adapt.align": "coral"})


def test_reweight_needs_target(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"adapt.reweight=true .*data.target"):
        train(make_cfg, tmp_path, **{"adapt.reweight": True})


def test_align_needs_a_trained_backbone(make_cfg, tmp_path, target_file):
    with pytest.raises(ConfigError, match=r"adapt.mode=head trains no backbone"):
        train(make_cfg, tmp_path, **{"adapt.align": "dann", "adapt.mode": "head", "data.target": str(target_file)})


def test_align_unknown_name(make_cfg, tmp_path, target_file):
    with pytest.raises(ConfigError, match=r"adapt.align='cmd' is unknown; choose one of dann, coral, mmd"):
        train(make_cfg, tmp_path, **{"adapt.align": "cmd", "data.target": str(target_file)})


def test_target_without_text_column(make_cfg, tmp_path):
    bad = write_rows(tmp_path / "bad_target.csv", [{"sentence": "good x", "label": "positive"}])
    with pytest.raises(DataError, match=r"bad_target.csv.* has no column 'text' \(data.text_column\)"):
        train(make_cfg, tmp_path, **{"adapt.align": "mmd", "data.target": str(bad)})


def test_target_with_unknown_label(make_cfg, tmp_path):
    rows = target_rows(4, seed=1)
    rows[2]["label"] = "neutral"
    bad = write_rows(tmp_path / "odd_target.csv", rows)
    with pytest.raises(DataError, match=r"odd_target.csv.* has label\(s\) \['neutral'\] \(first at row 2\)"):
        train(make_cfg, tmp_path, **{"adapt.align": "mmd", "data.target": str(bad)})


def test_target_file_missing_or_empty(make_cfg, tmp_path):
    with pytest.raises(DataError, match=r"data.target: file '.*nowhere.csv' does not exist"):
        train(make_cfg, tmp_path, **{"adapt.align": "mmd", "data.target": str(tmp_path / "nowhere.csv")})
    (tmp_path / "empty.csv").write_text("text,label\n")
    with pytest.raises(DataError, match=r"data.target: '.*empty.csv' is empty"):
        train(make_cfg, tmp_path, **{"adapt.align": "mmd", "data.target": str(tmp_path / "empty.csv")})


# ---------------------------------------------------------------- images and audio


@pytest.mark.parametrize("task", ["image", "audio"])
def test_media_target_align_and_reweight(task, make_cfg, tmp_path):
    """Both options in one run: images with an imagefolder target (class sub-folders give its labels), audio with
    a csv target whose relative paths are relative to it. The weights pass through the media transforms and
    collators; the aligned features are the classifier's input (ViT's token, wav2vec2's projected mean)."""
    if task == "image":
        from test_image import tiny_vit, write_images

        write_images(tmp_path / "data" / "train", 32, seed=0)
        write_images(tmp_path / "data" / "validation", 8, seed=1)
        write_images(tmp_path / "target", 12, seed=2)
        values = {"task": "image-classification", "model.name_or_path": tiny_vit(tmp_path / "model"), "data.augment": "[flip]",
                  "data.data_dir": tmp_path / "data", "data.train_file": None, "data.target": tmp_path / "target"}
    else:
        from test_audio import WINDOW, tiny_speech_model, write_clips

        values = {"task": "audio-classification", "model.name_or_path": tiny_speech_model(tmp_path / "model"),
                  "data.train_file": write_clips(tmp_path, "train.csv", 32, seed=0), "data.audio_column": "path",
                  "data.validation_file": write_clips(tmp_path, "validation.csv", 8, seed=1), "data.max_duration": WINDOW,
                  "data.target": write_clips(tmp_path / "elsewhere", "target.csv", 12, seed=2)}
    results, out, seen = train(make_cfg, tmp_path, **{"adapt.align": "mmd", "adapt.reweight": True, **values})
    assert set(results["target"]) >= {"accuracy", "loss"} and len(seen.ctx.target) == 12
    align, reweight = (next(h for h in seen.hooks if hasattr(h, key)) for key in ("history", "weights"))
    assert all(math.isfinite(v) for v in align.history) and len(align.history) == len(read_json(out / "results.json")["step_log"])
    batch = seen.ctx.collator([seen.ctx.encoded["train"][i] for i in range(3)])  # through the transform and the collator
    assert batch["weight"].tolist() == pytest.approx(reweight.weights[:3].tolist())
