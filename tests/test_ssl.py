"""adapt.pretrain=wav2vec2 / mim: continued self-supervised pretraining of speech and image checkpoints
(hftl/pretrain_media.py) on tiny models built from config, then classification from that checkpoint."""
from __future__ import annotations

import itertools
import math
import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import read_json
from hftl import pretrain_media
from test_audio import FILE_RATE, audio_cfg, tiny_speech_model
from test_image import image_cfg, tiny_vit, write_images

SPEECH = {"adapt.pretrain": "auto", "adapt.pretrain_epochs": 4, "adapt.pretrain_learning_rate": 0.005, "data.audio_decoder": "soundfile",
          "adapt.mask_span": 3, "train.epochs": 1, "train.min_steps": None, "output.verify_reload": 0}
IMAGE = {"adapt.pretrain": "auto", "adapt.pretrain_epochs": 8, "adapt.pretrain_learning_rate": 0.003, "adapt.mask_span": 4,
         "train.epochs": 1, "train.min_steps": None, "output.verify_reload": 0}
MELODY = (300, 800, 1500, 2400)  # Hz: a clip is a few notes of these, 40 ms each (8 frames of the tiny wav2vec2)


def write_clips(folder: Path, name: str, n: int, seed: int) -> Path:
    """n clips of 0.1 s (one window: no random crop) labelled by their first note, listed in folder/name: frames that
    differ along a clip, so a masked frame's note is told from its distractors' by its context."""
    import csv

    import soundfile as sf

    rng = np.random.default_rng(seed)
    (folder / "audio").mkdir(parents=True, exist_ok=True)
    note = int(0.04 * FILE_RATE)
    rows = []
    for i in range(n):
        freqs = rng.choice(MELODY, 3)
        t = np.arange(int(0.1 * FILE_RATE)) / FILE_RATE
        wave = 0.5 * np.sin(2 * np.pi * freqs[np.minimum(np.arange(len(t)) // note, 2)] * t) + 0.02 * rng.standard_normal(len(t))
        path = f"audio/{Path(name).stem}_{i}.wav"
        sf.write(folder / path, wave.astype(np.float32), FILE_RATE)
        rows.append({"path": path, "label": "low" if freqs[0] < 1000 else "high"})
    with open(folder / name, "w", newline="") as f:
        writer = csv.DictWriter(f, ["path", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return folder / name


def tiny_wav2vec2(folder: Path) -> Path:
    """tests/test_audio.py's tiny wav2vec2 with a codebook and negatives to its size (2 x 16 codes, 20 distractors)."""
    import json

    tiny_speech_model(folder)
    config = read_json(folder / "config.json")
    config.update(num_codevectors_per_group=16, codevector_dim=32, proj_codevector_dim=32, num_negatives=20)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("ssl_clips")
    return {"train": write_clips(folder, "train.csv", 32, seed=0), "validation": write_clips(folder, "validation.csv", 8, seed=1),
            "target": write_clips(folder, "target.csv", 48, seed=2)}


@pytest.fixture(scope="module")
def w2v(tmp_path_factory) -> Path:
    return tiny_wav2vec2(tmp_path_factory.mktemp("ssl_w2v"))


@pytest.fixture(scope="module")
def vit(tmp_path_factory) -> Path:
    return tiny_vit(tmp_path_factory.mktemp("ssl_vit"))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ssl_stripes")
    write_images(folder / "train", 32, seed=0)
    write_images(folder / "validation", 8, seed=1)
    write_images(folder / "target", 48, seed=2)
    return folder


def recorded_run(main, cfg) -> dict:
    """Run the recipe, recording the path the classifier loaded from, its new keys and its initial state."""
    import hftl.models

    loaded, original = {}, hftl.models.load_classifier

    def recording(auto_cls, path, *args, **kwargs):
        model, new_keys = original(auto_cls, path, *args, **kwargs)
        loaded.update(path=path, new_keys=new_keys, state={k: v.detach().clone() for k, v in model.state_dict().items()})
        return model, new_keys

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hftl.models, "load_classifier", recording)
        main(cfg)
    out = Path(cfg.output.dir)
    return {"out": out, "pretrained": Path(f"{out}.pretrained"), "loaded": loaded}


@pytest.fixture(scope="module")
def speech_run(w2v, clips, tmp_path_factory):
    from hftl.recipe import train as main

    cfg = audio_cfg(tmp_path_factory.mktemp("ssl_speech") / "out", w2v, clips["train"], clips["validation"],
                    **{**SPEECH, "data.target": clips["target"]})
    return recorded_run(main, cfg)


@pytest.fixture(scope="module")
def image_run(vit, images, tmp_path_factory):
    from hftl.recipe import train as main

    cfg = image_cfg(tmp_path_factory.mktemp("ssl_image") / "out", vit, data__data_dir=images / "train",
                    **{**IMAGE, "data.validation_file": None, "adapt.pretrain_file": images / "target"})
    return recorded_run(main, cfg)


# ---------------------------------------------------------------- the losses fall; the classifier starts from the stage


def test_wav2vec2_contrastive_loss_falls_on_the_target_clips(speech_run):
    info = read_json(speech_run["pretrained"] / "pretrain.json")
    assert info == read_json(speech_run["out"] / "results.json")["pretrain"]
    assert info["objective"] == "wav2vec2" and info["source"] == "the training inputs and data.target's"
    assert info["inputs"] + info["heldout_inputs"] == 32 + 48 and info["heldout_inputs"] == 4
    assert info["heldout_loss_after"] < 0.9 * info["heldout_loss_before"], info
    assert info["steps"] == 4 * math.ceil(76 / 8)


def test_mim_loss_falls_on_the_target_images(image_run):
    info = read_json(image_run["pretrained"] / "pretrain.json")
    assert info["objective"] == "mim" and info["source"].endswith("target")
    assert info["inputs"] + info["heldout_inputs"] == 48
    assert info["heldout_loss_after"] < 0.9 * info["heldout_loss_before"], info


def test_mim_stage_on_two_processes_scores_as_one_process_before_training_and_learns(image_run, vit, images, tmp_path):
    """The stage on the shared loop with two real CPU processes (torchrun, gloo, as `accelerate launch` on GPUs): each
    process trains on its share of every batch, so an epoch takes half the optimizer steps; every process scores the
    same held-out batches with the same seeded masks, so before training the held-out loss is the one-process run's,
    and it falls; the classifier stage then starts from the folder the main process wrote."""
    from test_multiprocess import torchrun
    from test_resume import cli_overrides

    cfg = image_cfg(tmp_path / "out", vit, data__data_dir=images / "train",
                    **{**IMAGE, "data.validation_file": None, "adapt.pretrain_file": images / "target"})
    done = torchrun(["-m", "hftl", "train", f"task={cfg.task}", *cli_overrides(cfg)])
    assert done.returncode == 0, done.stderr[-4000:]
    one, two = read_json(image_run["pretrained"] / "pretrain.json"), read_json(tmp_path / "out.pretrained" / "pretrain.json")
    assert (two["inputs"], two["heldout_inputs"]) == (one["inputs"], one["heldout_inputs"])
    batch, epochs = 8, IMAGE["adapt.pretrain_epochs"]
    assert one["steps"] == epochs * math.ceil(one["inputs"] / batch)
    assert two["steps"] == epochs * math.ceil(one["inputs"] / (2 * batch)) < one["steps"]
    assert two["heldout_loss_before"] == pytest.approx(one["heldout_loss_before"], rel=1e-5)
    assert two["heldout_loss_after"] < 0.9 * two["heldout_loss_before"], two
    assert read_json(tmp_path / "out" / "results.json")["pretrain"] == two


@pytest.mark.parametrize("which, base, architecture, head", [
    ("speech_run", "wav2vec2", "Wav2Vec2ForPreTraining", ["classifier.bias", "classifier.weight", "projector.bias", "projector.weight"]),
    ("image_run", "vit", "ViTForMaskedImageModeling", ["classifier.bias", "classifier.weight"]),
])
def test_classifier_starts_from_the_stage_with_every_backbone_weight(which, base, architecture, head, request, w2v, vit):
    run = request.getfixturevalue(which)
    loaded, folder = run["loaded"], run["pretrained"]
    assert loaded["path"] == str(folder)
    assert loaded["new_keys"] == head  # only the head is new
    config = read_json(folder / "config.json")
    assert config["architectures"] == [architecture]
    if base == "wav2vec2":  # the fine-tuning SpecAugment settings of the checkpoint, not the stage's masking
        assert (config["mask_time_prob"], config["apply_spec_augment"]) == (0.0, True)
    from transformers import AutoModel, AutoModelForMaskedImageModeling, Wav2Vec2ForPreTraining

    # In-memory names on both sides (transformers may rename a checkpoint's keys when it loads them).
    stage = (Wav2Vec2ForPreTraining if base == "wav2vec2" else AutoModelForMaskedImageModeling).from_pretrained(folder).state_dict()
    original = AutoModel.from_pretrained(w2v if base == "wav2vec2" else vit, **({} if base == "wav2vec2" else {"add_pooling_layer": False})).state_dict()
    assert not [k for k in load_file(str(folder / "model.safetensors")) if "pooler" in k]  # none in the checkpoint: none made up
    backbone = [k for k in loaded["state"] if k.startswith(base + ".")]
    assert {k[len(base) + 1:] for k in backbone} == set(original)  # the classifier's backbone is the checkpoint's architecture
    assert all(torch.equal(loaded["state"][k], stage[k]) for k in backbone)  # every weight from the stage's folder
    assert any(not torch.equal(stage[k], original[k[len(base) + 1:]]) for k in backbone)  # which the stage trained
    card = (run["out"] / "README.md").read_text()
    assert f"adapt.pretrain={'wav2vec2' if base == 'wav2vec2' else 'mim'}" in card and "held-out self-supervised loss" in card


# ---------------------------------------------------------------- what the objectives define


def test_masked_spans_and_negatives_are_what_wav2vec2_defines():
    from transformers import Wav2Vec2Config, Wav2Vec2ForPreTraining

    torch.manual_seed(0)
    np.random.seed(0)
    config = Wav2Vec2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, conv_dim=(16, 16),
                            conv_kernel=(10, 4), conv_stride=(5, 4), num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4,
                            num_negatives=7, mask_time_prob=0.5, num_codevectors_per_group=16, codevector_dim=32,
                            proj_codevector_dim=32)
    model = Wav2Vec2ForPreTraining(config)
    values = torch.randn(4, 2000)  # 99 frames
    attention = torch.ones(4, 2000, dtype=torch.long)
    attention[1, 1000:] = 0  # about half the frames are padding
    attention[2, 60:] = 0  # 2 frames: shorter than a span
    frames = int(model._get_feat_extract_output_lengths(2000))
    valid = model._get_feature_vector_attention_mask(frames, attention).bool()
    mask, negatives = pretrain_media.speech_masks(model, values, attention, 0.5, 5)
    assert mask.shape == (4, frames) and negatives.shape == (4, frames, 7)
    assert not (mask & ~valid).any()  # never a padding frame
    assert not mask[2].any()  # too short for two masked frames: no distractors, so not masked
    for row in (0, 1, 3):
        m = mask[row].tolist()
        runs = [len(list(g)) for k, g in itertools.groupby(m) if k]
        assert runs and all(r >= 5 for r in runs)  # whole spans of mask_span frames (overlapping ones merge)
        assert sum(m) >= 0.5 * valid[row].sum() * 0.5  # about mask_probability x span frames start spans (overlaps)
        for t in np.flatnonzero(m):
            drawn = negatives[row, t]
            assert ((drawn >= row * frames) & (drawn < (row + 1) * frames)).all()  # from the same clip
            assert (drawn != row * frames + t).all()  # never the position itself
            assert mask[row][drawn - row * frames].all()  # only masked frames are distractors
    # The loss is per masked frame, and falls under a few optimizer steps on this one batch.
    objective = pretrain_media.Wav2Vec2Objective(model, 0.5, 5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = objective(values, attention_mask=attention, mask_time_indices=mask, sampled_negative_indices=negatives).loss
        losses.append(loss.item())
        loss.backward(), optimizer.step(), optimizer.zero_grad()
    assert losses[-1] < 0.8 * losses[0], losses
    assert losses[0] < math.log(8) + 1  # ~log(1 + negatives) per frame at the start (plus the diversity term), not a sum


def test_simmim_masks_are_whole_squares_in_the_mask_ratio():
    from transformers import ViTConfig

    np.random.seed(0)
    config = ViTConfig(image_size=32, patch_size=4)
    masks = pretrain_media.image_masks(config, 5, 0.6, 16)
    assert masks.shape == (5, 64) and masks.dtype == torch.bool
    for m in masks.reshape(5, 8, 8):
        squares = m.reshape(2, 4, 2, 4).permute(0, 2, 1, 3).reshape(4, 16)
        assert all(s.all() or not s.any() for s in squares)  # each 16-pixel square is masked whole (4x4 patches)
        assert int(squares.all(1).sum()) == math.ceil(4 * 0.6)
    assert len({tuple(m.tolist()) for m in masks}) > 1  # drawn per image


# ---------------------------------------------------------------- resume


def stage_only(cfg) -> Path:
    """The stage on its own, as hftl/recipe.py calls it."""
    from hftl.modalities.audio import AUDIO
    from hftl.pretrain import continue_pretraining
    from hftl.recipe import load_checked
    from hftl.train import make_accelerator

    accelerator = make_accelerator(cfg.train)
    splits, _, _, _ = load_checked(cfg, AUDIO)
    processor = AUDIO.load_processor(cfg.model.name_or_path, cfg)
    return Path(continue_pretraining(cfg, cfg.model.name_or_path, splits, processor, accelerator, None, AUDIO))


def test_stage_stopped_by_a_signal_resumes_exactly(w2v, clips, tmp_path, monkeypatch, capsys):
    from hftl.checkpoint import EXIT_PREEMPTED

    extra = {**SPEECH, "adapt.pretrain_epochs": 2, "train.save_every": 3}  # 8 steps

    def cfg(folder, **more):
        return audio_cfg(tmp_path / folder / "out", w2v, clips["train"], clips["validation"], **{**extra, **more})

    reference = stage_only(cfg("whole"))
    build, forwards = pretrain_media.build, itertools.count(1)

    def signalling(*args):
        model, objective, hooks, restore = build(*args)

        def hook(module, inputs):
            if module.training and next(forwards) == 5:  # step 5: after the checkpoint of step 3
                os.kill(os.getpid(), signal.SIGUSR1)

        objective.register_forward_pre_hook(hook)
        return model, objective, hooks, restore

    with monkeypatch.context() as m:
        m.setattr(pretrain_media, "build", signalling)
        with pytest.raises(SystemExit) as stopped:
            stage_only(cfg("stopped"))
    assert stopped.value.code == EXIT_PREEMPTED
    checkpoints = tmp_path / "stopped" / "out.checkpoints" / "pretrain"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-3", "step-5"]
    assert not (tmp_path / "stopped" / "out.pretrained").exists()
    resumed = stage_only(cfg("stopped", **{"train.resume": "auto"}))
    assert f"Resumed from {checkpoints}/step-5: step 5 of 8" in capsys.readouterr().out
    want, got = read_json(reference / "pretrain.json"), read_json(resumed / "pretrain.json")
    for key in ("steps", "heldout_loss_before", "heldout_loss_after", "train_loss_first", "train_loss_last"):
        assert got[key] == want[key], key
    a, b = load_file(str(reference / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("case, match", [
    ("hubert", r"'.*' is a hubert checkpoint; continued self-supervised pretraining of speech is wav2vec2's .* Set adapt\.pretrain=null\."),
    ("mim-on-speech", r"adapt\.pretrain=mim is for image checkpoints; task=audio-classification continues with adapt\.pretrain=wav2vec2"),
    ("wav2vec2-on-text", r"adapt\.pretrain=wav2vec2 is for audio checkpoints; task=text-classification continues masked-language"),
])
def test_refusals_are_one_line(case, match, w2v, clips, tiny_bert, toy_data, tmp_path, capsys):
    from hftl import cli

    if case == "wav2vec2-on-text":
        argv = [f"model.name_or_path={tiny_bert}", f"data.train_file={toy_data['train']}", "adapt.pretrain=wav2vec2"]
    else:
        model = tiny_speech_model(tmp_path / "hubert", "hubert") if case == "hubert" else w2v
        argv = ["task=audio-classification", f"model.name_or_path={model}", f"data.train_file={clips['train']}",
                f"data.validation_file={clips['validation']}", "data.audio_column=path", "data.max_duration=0.1",
                f"adapt.pretrain={'auto' if case == 'hubert' else 'mim'}"]
    assert cli.main(["train", *argv, f"output.dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "hftl: error: " in line]  # (the rest is progress bars)
    assert len(lines) == 1 and lines[0].startswith("hftl: error: ") and "Traceback" not in err, err
    assert re.search(match, lines[0]), lines[0]
    assert not (tmp_path / "out.pretrained").exists()
