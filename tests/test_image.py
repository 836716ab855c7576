"""The image recipe on a tiny ViT built from config and images drawn here.

Class 'h' is horizontal stripes, 'v' vertical stripes, at random sizes and in every PIL mode a data
set may hold (grayscale L, palette P, RGB, RGBA). The training and validation images are an
imagefolder (`data.data_dir`); one run per mode (module-scoped), the tests read what it wrote.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file

from conftest import read_json
from hftl.config import ConfigError, DataConfig, load_config
from hftl.data import DataError

MODES = ("L", "P", "RGB", "RGBA")


def stripes(label: str, size: int, mode: str, rng: np.random.Generator) -> PIL.Image.Image:
    period = int(rng.integers(2, 4))
    line = (np.arange(size) // period) % 2 * 200 + rng.integers(0, 40, size)
    grid = np.tile(line[:, None], (1, size)) if label == "h" else np.tile(line[None, :], (size, 1))
    gray = PIL.Image.fromarray(grid.astype(np.uint8))
    if mode == "RGBA":  # colour in RGB, a varying alpha the RGB conversion drops
        return PIL.Image.merge("RGBA", (gray, gray.point(lambda v: v // 2), gray, gray.point(lambda v: 255 - v)))
    return gray.convert(mode)


def write_images(folder: Path, n: int, seed: int) -> list[tuple[Path, str]]:
    """n images alternating h/v in folder/<label>/, cycling through the PIL modes; returns (path, label)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        label = ("h", "v")[i % 2]
        (folder / label).mkdir(parents=True, exist_ok=True)
        path = folder / label / f"{i}.png"
        stripes(label, int(rng.integers(12, 25)), MODES[(i // 2) % len(MODES)], rng).save(path)
        out.append((path, label))
    return out


def tiny_vit(folder: Path, channels: int = 3) -> Path:
    """A 2-layer, 16-wide ViT for 16x16 images (4x4 patches), no head, and its image processor."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(image_size=16, patch_size=4, num_channels=channels, hidden_size=16, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=32, initializer_range=0.2)
    ViTModel(config, add_pooling_layer=False).save_pretrained(str(folder))
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def vit(tmp_path_factory) -> Path:
    return tiny_vit(tmp_path_factory.mktemp("tiny_vit"))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("stripes")
    write_images(folder / "train", 32, seed=0)
    write_images(folder / "validation", 12, seed=1)
    return folder


def image_cfg(out: Path, model: Path, **overrides):
    values = {
        "task": "image-classification",
        "model.name_or_path": str(model),
        "output.dir": str(out),
        "train.batch_size": 8,
        "train.eval_batch_size": 8,
        "train.epochs": 4,
        "train.log_every": 1000,
    }
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load_config(None, [f"{k}={'null' if v is None else v}" for k, v in values.items()])


def write_csv(path: Path, rows: list[tuple[Path, str]]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "label"])
        writer.writerows((str(p), label) for p, label in rows)
    return path


# ---------------------------------------------------------------- one run per mode


LEARNING_RATES = {"head": 0.05, "full": 0.005, "lora": 0.02}


class Run:
    def __init__(self, mode, cfg, out, initial):
        self.mode, self.cfg, self.out, self.initial = mode, cfg, out, initial


@pytest.fixture(scope="module", params=list(LEARNING_RATES))
def run(request, vit, images, tmp_path_factory) -> Run:
    import hftl.models
    from hftl.recipe import train as main

    mode = request.param
    cfg = image_cfg(tmp_path_factory.mktemp(f"image_{mode}") / "out", vit, data__data_dir=images, adapt__mode=mode,
                    train__learning_rate=LEARNING_RATES[mode], data__augment="[flip]")
    initial, original = {}, hftl.models.load_classifier

    def recording(*args, **kwargs):  # keep a copy of the freshly initialised head
        model, new_keys = original(*args, **kwargs)
        initial.update({k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("classifier.")})
        return model, new_keys

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hftl.models, "load_classifier", recording)
        main(cfg)
    return Run(mode, cfg, Path(cfg.output.dir), initial)


def test_training_loss_fell(run):
    history = read_json(run.out / "results.json")["history"]
    assert len(history) >= 2
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_classifier_trained_and_saved(run, vit):
    saved = load_file(str(run.out / "model.safetensors"))
    assert set(run.initial) == {"classifier.weight", "classifier.bias"}
    assert not torch.equal(run.initial["classifier.weight"], saved["classifier.weight"])
    assert not [k for k in saved if "lora_" in k or "modules_to_save" in k]
    original = load_file(str(vit / "model.safetensors"))
    changed = {k for k in original if not torch.equal(original[k], saved["vit." + k])}
    assert not changed if run.mode == "head" else any(".encoder." in f".{k}" for k in changed)


def test_pipeline_reading_the_files_predicts_what_evaluation_predicted(run, images):
    from datasets import Image, load_dataset
    from transformers import pipeline

    predictions = read_json(run.out / "predictions_validation.json")
    rows = load_dataset(str(images), split="validation").cast_column("image", Image(decode=False))
    paths = [r["path"] for r in rows["image"]]
    assert {PIL.Image.open(p).mode for p in paths} == set(MODES)
    clf = pipeline("image-classification", model=str(run.out), device=-1)
    assert [r[0]["label"] for r in clf(paths)] == predictions
    assert set(predictions) <= {"h", "v"} and len(predictions) == 12


def test_model_card(run):
    from huggingface_hub import ModelCard

    card = ModelCard.load(str(run.out / "README.md"))
    assert card.data.to_dict()["pipeline_tag"] == "image-classification"
    assert f"`{run.mode}`" in card.content


# ---------------------------------------------------------------- decoding and transforms


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_becomes_rgb_as_the_pipeline_sees_it(mode, tmp_path):
    from hftl.data import image

    picture = stripes("h", 10, mode, np.random.default_rng(0))
    picture.save(tmp_path / "a.png")
    got = image.decode({"path": str(tmp_path / "a.png"), "bytes": None})
    assert got.mode == "RGB" and got.size == (10, 10)
    assert np.array_equal(np.asarray(got), np.asarray(picture.convert("RGB")))  # RGBA: alpha dropped, colour kept
    assert np.array_equal(np.asarray(image.decode({"path": None, "bytes": (tmp_path / "a.png").read_bytes()})), np.asarray(got))


def test_16_bit_grayscale_is_scaled_to_8_bits_not_clipped(vit, tmp_path):
    from datasets import ClassLabel, Dataset
    from transformers import AutoImageProcessor
    from transformers.image_utils import load_image

    from hftl.data import image

    deep = np.random.default_rng(0).integers(0, 65536, (16, 16)).astype(np.uint16)  # a 16-bit scan: values to 65535
    PIL.Image.fromarray(deep).save(tmp_path / "deep.png")
    PIL.Image.fromarray(np.round(deep / 257).astype(np.uint8)).save(tmp_path / "eight.png")  # the same picture in 8 bits
    assert PIL.Image.open(tmp_path / "deep.png").mode == "I;16"
    assert (np.asarray(load_image(str(tmp_path / "deep.png"))) == 255).mean() > 0.99  # PIL's RGB conversion alone: white
    eight = np.asarray(image.decode({"path": str(tmp_path / "eight.png"), "bytes": None}))
    for value in ({"path": str(tmp_path / "deep.png"), "bytes": None}, {"path": None, "bytes": (tmp_path / "deep.png").read_bytes()}):
        got = image.decode(value)
        assert got.mode == "RGB" and np.array_equal(np.asarray(got), eight)
    # What training and evaluation feed the model, and what the reload check hands pipeline(): the scaled image.
    rows = Dataset.from_dict({"image": [str(tmp_path / "deep.png"), str(tmp_path / "eight.png")], "labels": [0, 1]},
                             features=None).cast_column("labels", ClassLabel(names=["a", "b"]))
    encoded, _ = image.prepare({"validation": rows}, AutoImageProcessor.from_pretrained(str(vit)), DataConfig())
    assert torch.equal(encoded["validation"][0]["pixel_values"], encoded["validation"][1]["pixel_values"])
    deep_in, eight_in = image.inputs_for_pipeline(rows, DataConfig())
    assert np.array_equal(np.asarray(deep_in), eight)
    assert np.array_equal(np.asarray(image.read(PIL.Image.open(tmp_path / "deep.png"))), eight)  # the README's serving line


def test_training_transform_augments_evaluation_transform_does_not(vit, images):
    from datasets import Image, load_dataset
    from transformers import AutoImageProcessor

    from hftl.data import image, media

    processor = AutoImageProcessor.from_pretrained(str(vit))
    splits = load_dataset(str(images)).rename_column("label", "labels")
    cfg = load_config(None, ["task=image-classification", "data.augment=[crop, flip]", "data.crop_scale=0.3"]).data
    encoded, collator = image.prepare(splits, processor, cfg)
    torch.manual_seed(0)
    train = [encoded["train"][0]["pixel_values"] for _ in range(4)]
    assert all(t.shape == (3, 16, 16) for t in train)
    assert any(not torch.equal(train[0], t) for t in train[1:])
    evals = [encoded["validation"][0]["pixel_values"] for _ in range(2)]
    assert torch.equal(evals[0], evals[1])
    raw = media.as_file_column(splits["validation"], "image", Image)[0]["image"]
    expected = processor(images=[image.decode(raw)], return_tensors="pt")["pixel_values"][0]
    assert torch.equal(evals[0], expected)
    batch = collator([encoded["train"][i] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, 16, 16) and batch["labels"].tolist() == splits["train"]["labels"][:3]


def test_augmentation_settings_checked(vit):
    from hftl.data import image

    # load_config refuses both first (tests/test_bad_inputs.py); a DataConfig built in code reaches image.prepare.
    with pytest.raises(ConfigError, match=r"data.augment has \['speed'\].*crop, flip"):
        image.prepare({}, None, DataConfig(augment=["speed"]))
    with pytest.raises(ConfigError, match="data.crop_scale=0.0"):
        image.prepare({}, None, DataConfig(augment=["crop"], crop_scale=0.0))


def test_single_channel_checkpoint_refused(tmp_path):
    from hftl.modalities.image import load_image_processor

    path = tiny_vit(tmp_path / "gray", channels=1)
    with pytest.raises(ConfigError, match="expects 1-channel images.*RGB.*3-channel checkpoint"):
        load_image_processor(str(path), load_config(None, []))


def test_builtin_sklearn_digits():
    from hftl.data import load_splits

    splits, source = load_splits(load_config(None, ["data.builtin=sklearn_digits"]).data, 0, ("image_column",))
    assert source == "sklearn_digits"
    assert len(splits["train"]) + len(splits["validation"]) == 1797
    assert splits["train"].features["labels"].names == [str(i) for i in range(10)]
    picture = splits["train"][0]["image"]
    assert picture.size == (8, 8) and picture.mode == "L" and np.asarray(picture).max() > 200


# ---------------------------------------------------------------- bad media


BAD = {
    "zero": lambda good: b"",
    "truncated": lambda good: good[: len(good) // 2],
    "not_image": lambda good: b"hello, this is text and not a picture\n" * 20,
}


def with_bad_files(folder: Path, images: Path, split: str, kinds: list[str]) -> Path:
    """A csv of a split's images whose rows 1, 2, ... point at bad files of the given kinds."""
    rows = [(p, p.parent.name) for p in sorted((images / split).glob("*/*.png"), key=lambda p: int(p.stem))]
    folder.mkdir(parents=True, exist_ok=True)
    for i, kind in enumerate(kinds, start=1):
        (folder / f"{kind}.png").write_bytes(BAD[kind](rows[i][0].read_bytes()))
        rows[i] = (folder / f"{kind}.png", rows[i][1])
    return write_csv(folder / f"{split}.csv", rows)


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_file_stops_before_training(kind, vit, images, tmp_path):
    from hftl.recipe import train as main

    cfg = image_cfg(tmp_path / "out", vit, data__train_file=with_bad_files(tmp_path / "d", images, "train", [kind]),
                    data__validation_file=with_bad_files(tmp_path / "v", images, "validation", []), data__image_column="file")
    with pytest.raises(DataError, match=rf"train split, row 1: cannot read image file '.*{kind}\.png'.*data.on_bad_sample=skip"):
        main(cfg)
    assert not (tmp_path / "out").exists()


def test_bad_files_skipped_counted_and_named(vit, images, tmp_path, capsys):
    from huggingface_hub import ModelCard

    from hftl.recipe import train as main

    cfg = image_cfg(tmp_path / "out", vit, data__train_file=with_bad_files(tmp_path / "d", images, "train", list(BAD)),
                    data__validation_file=with_bad_files(tmp_path / "v", images, "validation", ["truncated"]),
                    data__image_column="file", data__on_bad_sample="skip", train__max_steps=2)
    main(cfg)
    skipped = read_json(tmp_path / "out" / "skipped_rows.json")
    assert [s.split(":")[0] for s in skipped["train"]] == ["train row 1", "train row 2", "train row 3"]
    assert all(f"{kind}.png" in s for kind, s in zip(BAD, skipped["train"]))
    assert "truncated.png" in skipped["validation"][0] and "truncated" in skipped["validation"][0].split("(", 1)[1]
    card = ModelCard.load(str(tmp_path / "out" / "README.md")).content
    assert "train 3, validation 1" in card and "Training examples: 29" in card
    assert "left out 3 train row(s)" in capsys.readouterr().out
