"""The audio recipe on tiny wav2vec2 / HuBERT checkpoints built from config and clips synthesised here.

The clips are 8 kHz (the model runs at 16 kHz), a third of them stereo, some shorter than a window
and, in validation, some longer (evaluated in several windows). Class 'low' is a 300 Hz tone, 'high'
a 2.4 kHz tone, both in noise. One run per mode (module-scoped); the tests read what it wrote.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from conftest import read_json
from hftl.config import ConfigError, DataConfig, load_config
from hftl.data import DataError

FILE_RATE = 8000  # the clips' rate; the feature extractor's is 16 kHz
WINDOW = 0.1  # data.max_duration in seconds: 1,600 samples at 16 kHz


def tone(label: str, seconds: float, rng: np.random.Generator, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * FILE_RATE)) / FILE_RATE
    wave = 0.5 * np.sin(2 * np.pi * (300 if label == "low" else 2400) * t + rng.uniform(0, 6.3))
    wave = wave + 0.05 * rng.standard_normal(len(t))
    if channels == 2:  # the channels differ, so mixing to mono is visible
        wave = np.stack([wave, 0.5 * wave], axis=1)
    return wave.astype(np.float32)


def write_clips(folder: Path, name: str, n: int, seed: int, long_every: int = 0) -> Path:
    """n clips alternating low/high, listed in folder/name (csv, paths relative to it) under audio/."""
    rng = np.random.default_rng(seed)
    (folder / "audio").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        label = ("low", "high")[i % 2]
        seconds = 0.28 if long_every and i % long_every == 0 else rng.uniform(0.03, 0.1)
        path = f"audio/{Path(name).stem}_{i}.wav"
        sf.write(folder / path, tone(label, seconds, rng, channels=2 if i % 3 == 0 else 1), FILE_RATE)
        rows.append({"path": path, "label": label})
    with open(folder / name, "w", newline="") as f:
        writer = csv.DictWriter(f, ["path", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return folder / name


def tiny_speech_model(folder: Path, kind: str = "wav2vec2") -> Path:
    """A 2-layer, 16-wide base model (no head) and its 16 kHz feature extractor, saved with save_pretrained.
    wav2vec2 and hubert: base style (group-norm feature encoder, no attention mask: clips padded to the window);
    wav2vec2-masked: large-lv60 style (layer norm, attention mask: clips padded per batch)."""
    from transformers import HubertConfig, HubertModel, Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    torch.manual_seed(0)
    config_cls, model_cls = {"wav2vec2": (Wav2Vec2Config, Wav2Vec2Model), "wav2vec2-masked": (Wav2Vec2Config, Wav2Vec2Model),
                             "hubert": (HubertConfig, HubertModel)}[kind]
    masked = kind == "wav2vec2-masked"
    config = config_cls(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        conv_dim=(16, 16, 16), conv_kernel=(10, 3, 3), conv_stride=(5, 4, 4),  # 80 samples per frame
        num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4, classifier_proj_size=8,
        mask_time_prob=0.0, layerdrop=0.0,
        **({"feat_extract_norm": "layer", "do_stable_layer_norm": True} if masked else {}),
    )
    model_cls(config).save_pretrained(str(folder))
    Wav2Vec2FeatureExtractor(sampling_rate=16000, return_attention_mask=masked).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def w2v(tmp_path_factory) -> Path:
    return tiny_speech_model(tmp_path_factory.mktemp("tiny_wav2vec2"))


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("clips")
    return {"train": write_clips(folder, "train.csv", 32, seed=0),
            "validation": write_clips(folder, "validation.csv", 12, seed=1, long_every=3)}


def audio_cfg(out: Path, model: Path, train: Path, validation: Path, **overrides):
    values = {
        "task": "audio-classification",
        "model.name_or_path": str(model),
        "data.train_file": str(train),
        "data.validation_file": str(validation),
        "data.audio_column": "path",
        "data.max_duration": WINDOW,
        "output.dir": str(out),
        "train.batch_size": 8,
        "train.eval_batch_size": 8,
        "train.epochs": 4,
        "train.learning_rate": 0.01,
        "train.log_every": 1000,
    }
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load_config(None, [f"{k}={'null' if v is None else v}" for k, v in values.items()])


# ---------------------------------------------------------------- one run per mode


class Run:
    def __init__(self, mode, cfg, out, initial, checkpoint):
        self.mode, self.cfg, self.out, self.initial, self.checkpoint = mode, cfg, out, initial, checkpoint

    @property
    def saved(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.out / "model.safetensors"))


RUNS = {  # mode -> (architecture, learning rate)
    "head": ("wav2vec2", 0.05),
    "full": ("wav2vec2", 0.01),
    "lora": ("wav2vec2", 0.02),
    "lora-hubert": ("hubert", 0.02),
    "full-masked": ("wav2vec2-masked", 0.01),  # clips padded per batch, grouped by length
}


@pytest.fixture(scope="module", params=list(RUNS))
def run(request, w2v, clips, tmp_path_factory) -> Run:
    import hftl.models
    from hftl.recipe import train as main

    kind, lr = RUNS[request.param]
    mode = request.param.split("-")[0]
    checkpoint = w2v if kind == "wav2vec2" else tiny_speech_model(tmp_path_factory.mktemp(f"tiny_{kind}"), kind)
    cfg = audio_cfg(tmp_path_factory.mktemp(f"audio_{request.param}") / "out", checkpoint, clips["train"], clips["validation"],
                    adapt__mode=mode, train__learning_rate=lr)
    initial, original = {}, hftl.models.load_classifier

    def recording(*args, **kwargs):  # keep a copy of the freshly initialised head
        model, new_keys = original(*args, **kwargs)
        initial.update({k: v.detach().clone() for k, v in model.state_dict().items() if k.split(".")[0] in ("projector", "classifier")})
        return model, new_keys

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hftl.models, "load_classifier", recording)
        main(cfg)
    return Run(mode, cfg, Path(cfg.output.dir), initial, checkpoint)


def test_training_loss_fell(run):
    results = read_json(run.out / "results.json")
    if run.mode == "head":  # solved, not trained (hftl/solver.py), through wav2vec2's projector and classifier
        assert results["history"] == [] and results["solver"]["C"] > 0
        return
    history = results["history"]
    assert len(history) >= 2
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_projector_and_classifier_trained_and_saved(run):
    saved = run.saved
    assert set(run.initial) == {k for k in saved if k.split(".")[0] in ("projector", "classifier")}
    for name in ("projector", "classifier"):  # peft adds only 'classifier' on its own: both must move
        assert any(not torch.equal(run.initial[k], saved[k]) for k in run.initial if k.startswith(name + ".")), name
    assert not [k for k in saved if "lora_" in k or "modules_to_save" in k]  # an ordinary transformers folder
    original = load_file(str(run.checkpoint / "model.safetensors"))
    prefix = "wav2vec2." if "wav2vec2.feature_extractor.conv_layers.0.conv.weight" in saved else "hubert."
    changed = {k for k in original if not torch.equal(original[k], saved[prefix + k])}
    if run.mode == "head":
        assert not changed  # the backbone is frozen bit for bit
    else:
        assert any(".encoder." in f".{k}" for k in changed)


def test_pipeline_reload_predicts_what_evaluation_predicted(run):
    from datasets import load_dataset
    from transformers import AutoFeatureExtractor, pipeline

    from hftl.data import audio

    predictions = read_json(run.out / "predictions_validation.json")
    rows = load_dataset("csv", data_files=str(run.cfg.data.validation_file), split="train")
    rows = rows.map(lambda r: {"path": str(Path(run.cfg.data.validation_file).parent / r["path"])})
    extractor = AutoFeatureExtractor.from_pretrained(str(run.out))
    inputs = audio.inputs_for_pipeline(rows, run.cfg.data, extractor)
    assert inputs.count(None) == 4  # the long clips: evaluated in several windows, which the pipeline does not do
    # A model that masks padding gets each clip as it is; one that does not, the clip padded to the window.
    size = round(WINDOW * 16000)
    assert all((len(x["raw"]) < size) == extractor.return_attention_mask for x in inputs if x is not None)
    clf = pipeline("audio-classification", model=str(run.out), device=-1)
    fits = [i for i, x in enumerate(inputs) if x is not None]
    got = [clf(inputs[i])[0]["label"] for i in fits]
    assert got == [predictions[i] for i in fits]
    assert set(predictions) <= {"low", "high"} and len(predictions) == 12


def test_model_card(run):
    from huggingface_hub import ModelCard

    card = ModelCard.load(str(run.out / "README.md"))
    assert card.data.to_dict()["pipeline_tag"] == "audio-classification"
    assert f"`{run.mode}`" in card.content
    assert "Rows left out" not in card.content  # nothing was skipped


# ---------------------------------------------------------------- decoding, resampling, windows


def decoders() -> list[str]:
    from hftl.data import audio

    return ["soundfile"] + (["torchcodec"] if audio.torchcodec_problem() is None else [])


@pytest.mark.parametrize("decoder", ["soundfile", "torchcodec"])
def test_stereo_8khz_clip_is_mixed_and_resampled(tmp_path, decoder):
    import torchaudio.functional as AF

    from hftl.data import audio

    if decoder not in decoders():
        pytest.skip(f"torchcodec cannot decode here: {audio.torchcodec_problem()}")
    wave = tone("low", 0.25, np.random.default_rng(0), channels=2)
    sf.write(tmp_path / "a.wav", wave, FILE_RATE)
    decode, how = audio.decoder(decoder)
    assert how.startswith(decoder)
    got = audio.load({"path": str(tmp_path / "a.wav"), "bytes": None}, decode, 16000)
    assert got.ndim == 1 and len(got) == 2 * len(wave)
    # 16-bit samples, mean of the two channels, then torchaudio's resampler
    mono = torch.from_numpy(sf.read(tmp_path / "a.wav", dtype="float32")[0]).mean(1)
    assert torch.allclose(got, AF.resample(mono, FILE_RATE, 16000), atol=1e-5)
    # bytes stored in the data set decode like the file
    from_bytes = audio.load({"path": None, "bytes": (tmp_path / "a.wav").read_bytes()}, decode, 16000)
    assert torch.equal(from_bytes, got)


def test_auto_decoder_falls_back_to_soundfile(monkeypatch):
    from hftl.data import audio

    monkeypatch.setattr(audio, "torchcodec_problem", lambda: "RuntimeError: Could not load libtorchcodec")
    decode, how = audio.decoder("auto")
    assert decode is audio._soundfile and "soundfile" in how and "libtorchcodec" in how
    with pytest.raises(ConfigError, match="apt-get install ffmpeg.*data.audio_decoder=soundfile"):
        audio.decoder("torchcodec")
    with pytest.raises(ConfigError, match="data.audio_decoder='ffmpeg'"):
        audio.decoder("ffmpeg")


def test_eval_windows_and_training_crops():
    from hftl.data import audio

    size = 100
    short = torch.arange(1, 31, dtype=torch.float32)
    padded = audio.eval_input(short, size, window=True)
    assert padded.shape == (1, size) and torch.equal(padded[0, :30], short) and not padded[0, 30:].any()
    long = torch.arange(1, 231, dtype=torch.float32)
    windows = audio.eval_input(long, size, window=True)
    assert [int(w[0]) for w in windows] == [1, 51, 101, 131]  # half a window apart; the last ends at the end
    assert windows.shape == (4, size) and int(windows[-1, -1]) == 230
    assert torch.equal(audio.eval_input(long, size, window=False), long[None])  # whole
    cfg = load_config(None, ["data.augment=[]"]).data
    crops = [audio.train_input(long, 16000, size, cfg) for _ in range(20)]
    assert all(len(c) == size and torch.equal(c, long[int(c[0]) - 1:int(c[0]) - 1 + size]) for c in crops)
    assert len({int(c[0]) for c in crops}) > 1  # a new random window each time
    assert torch.equal(audio.train_input(short, 16000, size, cfg), padded[0])
    # A model that masks padding: short clips stay as they are (the collator pads per batch)
    assert torch.equal(audio.eval_input(short, size, window=True, pad=False), short[None])
    assert torch.equal(audio.train_input(short, 16000, size, cfg, pad=False), short)
    assert torch.equal(audio.eval_input(long, size, window=True, pad=False), windows)  # long clips: windows as before


def test_batch_padding_groups_clips_by_length_and_does_not_change_predictions(tmp_path_factory, clips):
    """With an attention mask, a clip is padded only to its batch's longest, and the model's output for it is the
    same as alone: what makes padding per batch (instead of to the full window) safe."""
    from datasets import load_dataset
    from transformers import AutoFeatureExtractor, Wav2Vec2ForSequenceClassification

    from hftl.data import audio
    from hftl.train import _lengths, eval_dataloader, train_dataloader

    folder = tiny_speech_model(tmp_path_factory.mktemp("tiny_masked"), "wav2vec2-masked")
    extractor = AutoFeatureExtractor.from_pretrained(str(folder))
    assert audio.batch_padding(extractor)
    cfg = audio_cfg(tmp_path_factory.mktemp("unused"), folder, clips["train"], clips["validation"])
    splits = load_dataset("csv", data_files={s: str(clips[s]) for s in ("train", "validation")})
    splits = splits.map(lambda r: {"path": str(clips["train"].parent / r["path"]), "labels": int(r["label"] == "high")})
    encoded, collator = audio.prepare(splits.remove_columns("label"), extractor, cfg.data, 8)
    size = round(WINDOW * 16000)
    # num_samples: each clip's length at 16 kHz from its 8 kHz file header, capped at one window
    expected = [min(size, 2 * len(sf.read(clips["train"].parent / p)[0])) for p in splits["train"]["path"]]
    assert _lengths(encoded["train"]) == expected
    batches = list(train_dataloader(encoded["train"], collator, cfg.train))
    widths = [b["input_values"].shape[1] for b in batches]
    assert max(widths) <= size and min(widths) < max(widths)  # padded per batch, not to the window
    assert all("attention_mask" in b for b in batches if b["input_values"].shape[0] > 1)
    # length grouping: within a batch, lengths are close (the sorted megabatch's neighbours)
    assert sum(len(b["labels"]) for b in batches) == len(encoded["train"])

    torch.manual_seed(0)
    model = Wav2Vec2ForSequenceClassification.from_pretrained(str(folder), num_labels=2).eval()
    order, dl = eval_dataloader(encoded["validation"], collator, 8)
    assert [_lengths(encoded["validation"])[i] for i in order] == sorted(_lengths(encoded["validation"]))
    batch = next(iter(dl))
    assert batch["input_values"].shape[1] < size  # the shortest clips: no window of silence
    with torch.inference_mode():
        together = model(input_values=batch["input_values"], attention_mask=batch["attention_mask"]).logits
        for i, n in enumerate(batch["attention_mask"].sum(1).tolist()):
            alone = collator([{"input_values": batch["input_values"][i:i + 1, :n], "labels": 0}])
            assert torch.allclose(model(**{k: v for k, v in alone.items() if k != "labels"}).logits[0], together[i], atol=1e-5)


def test_average_windows():
    from hftl.train import average_windows

    logits = torch.tensor([[1.0, 0.0], [0.0, 3.0], [2.0, 2.0], [4.0, 0.0], [0.0, 0.0]])
    labels = torch.tensor([1, 1, 0, 0, 0])
    mean, per_example = average_windows(logits, labels, torch.tensor([2, 1, 2]))
    assert torch.equal(mean, torch.tensor([[0.5, 1.5], [2.0, 2.0], [2.0, 0.0]]))
    assert torch.equal(per_example, torch.tensor([1, 0, 0]))


def test_augmentation():
    from hftl.data import audio

    torch.manual_seed(0)
    wave = torch.from_numpy(tone("high", 0.2, np.random.default_rng(0))).repeat_interleave(2)
    plain = load_config(None, ["task=audio-classification", "data.augment=[]"]).data
    for name in ("speed", "gain", "noise"):
        cfg = load_config(None, ["task=audio-classification", f"data.augment=[{name}]", "data.noise_snr_db=10"]).data
        outs = [audio.train_input(wave, 16000, 4000, cfg) for _ in range(6)]
        assert all(o.shape == (4000,) for o in outs)
        assert any(not torch.equal(o, audio.train_input(wave, 16000, 4000, plain)) for o in outs), name
    cfg = load_config(None, ["task=audio-classification", "data.augment=[noise]", "data.noise_snr_db=10"]).data
    noisy = audio.train_input(wave, 16000, len(wave), cfg)
    snr = 10 * torch.log10(wave.pow(2).sum() / (noisy - wave).pow(2).sum())
    assert float(snr) == pytest.approx(10, abs=0.01)
    with pytest.raises(ConfigError, match=r"data.augment has \['flip'\].*speed, gain, noise"):  # as load_config does
        audio.prepare(None, None, DataConfig(augment=["flip"]), 8)


def test_whole_clip_evaluation_needs_unpadded_batches(w2v):
    from transformers import AutoFeatureExtractor

    from hftl.data import audio

    cfg = load_config(None, ["data.eval_window=false"]).data
    with pytest.raises(ConfigError, match="train.eval_batch_size=1, or data.eval_window=true"):
        audio.prepare(None, AutoFeatureExtractor.from_pretrained(str(w2v)), cfg, 8)


def test_whole_clip_evaluation_runs(w2v, clips, tmp_path):
    from hftl.recipe import train as main

    cfg = audio_cfg(tmp_path / "out", w2v, clips["train"], clips["validation"], data__eval_window="false",
                    train__eval_batch_size=1, train__max_steps=2)
    main(cfg)
    assert len(read_json(tmp_path / "out" / "predictions_validation.json")) == 12


# ---------------------------------------------------------------- bad media


BAD = {
    "zero": lambda good: b"",
    "truncated": lambda good: good[: len(good) // 3],
    "not_audio": lambda good: b"hello, this is text and not a recording\n" * 20,
}


def with_bad_files(folder: Path, clips: dict[str, Path], kinds: list[str], split: str = "train") -> Path:
    """A copy of a split's csv whose rows 2, 3, ... point at bad files of the given kinds."""
    rows = list(csv.DictReader(open(clips[split], newline="")))
    good = (clips[split].parent / rows[0]["path"]).read_bytes()
    folder.mkdir(parents=True, exist_ok=True)
    for i, kind in enumerate(kinds, start=2):
        (folder / f"{kind}.wav").write_bytes(BAD[kind](good))
        rows[i] = {"path": str(folder / f"{kind}.wav"), "label": rows[i]["label"]}
    for r in rows:
        r["path"] = str((clips[split].parent / r["path"]).resolve())
    out = folder / f"{split}.csv"
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, ["path", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return out


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_file_stops_before_training(kind, w2v, clips, tmp_path):
    from hftl.recipe import train as main

    train = with_bad_files(tmp_path / "data", clips, [kind])
    cfg = audio_cfg(tmp_path / "out", w2v, train, clips["validation"])
    with pytest.raises(DataError, match=rf"train split, row 2: cannot read audio file '.*{kind}\.wav'.*data.on_bad_sample=skip"):
        main(cfg)
    assert not (tmp_path / "out").exists()


def test_bad_files_skipped_counted_and_named(w2v, clips, tmp_path, capsys):
    from huggingface_hub import ModelCard

    from hftl.recipe import train as main

    train = with_bad_files(tmp_path / "train", clips, list(BAD))
    validation = with_bad_files(tmp_path / "validation", clips, ["truncated"], split="validation")
    cfg = audio_cfg(tmp_path / "out", w2v, train, validation, data__on_bad_sample="skip", train__max_steps=2)
    main(cfg)
    out = tmp_path / "out"
    skipped = read_json(out / "skipped_rows.json")
    assert [s.split(":")[0] for s in skipped["train"]] == ["train row 2", "train row 3", "train row 4"]
    assert all(kind in s for kind, s in zip(BAD, skipped["train"]))
    assert [s.split(":")[0] for s in skipped["validation"]] == ["validation row 2"] and "truncated.wav" in skipped["validation"][0]
    card = ModelCard.load(str(out / "README.md")).content
    assert "Rows left out because their file could not be decoded" in card and "train 3, validation 1" in card
    assert "Training examples: 29" in card
    printed = capsys.readouterr().out
    assert "left out 3 train row(s)" in printed and "zero.wav" in printed and "not_audio.wav" in printed
    assert len(read_json(out / "predictions_validation.json")) == 11


@pytest.mark.parametrize("decoder", ["soundfile", "torchcodec"])
def test_truncated_wav_is_caught_although_it_decodes(decoder, tmp_path):
    from datasets import Dataset

    from hftl.data import audio, media

    if decoder not in decoders():
        pytest.skip(f"torchcodec cannot decode here: {audio.torchcodec_problem()}")
    sf.write(tmp_path / "a.wav", tone("low", 0.2, np.random.default_rng(0)), FILE_RATE, subtype="PCM_16")
    whole = (tmp_path / "a.wav").read_bytes()
    cut = {"path": None, "bytes": whole[:44 + 2 * 500]}  # the 44-byte header, then 500 of the 1,600 samples
    decode, _ = audio.decoder(decoder)
    assert decode(cut)[0].shape[-1] == 500  # the decoders return what is there, silently
    assert audio.truncation(cut) == "truncated: its header promises 3200 bytes of samples, the file holds 1000"
    assert audio.truncation({"path": str(tmp_path / "a.wav"), "bytes": None}) is None
    splits = {"train": Dataset.from_dict({"audio": [{"path": None, "bytes": b} for b in (whole, cut["bytes"])]})}
    kept, skipped = audio.check(splits, load_config(None, ["data.on_bad_sample=skip", f"data.audio_decoder={decoder}"]).data)
    assert len(kept["train"]) == 1 and skipped == {"train": [
        f"train row 1: {media.name_of(cut)} (ValueError: truncated: its header promises 3200 bytes of samples, the file holds 1000)"]}


def test_file_broken_after_the_check_names_it(w2v, clips, tmp_path):
    from transformers import AutoFeatureExtractor

    from hftl.data import audio, load_splits

    train = with_bad_files(tmp_path / "data", clips, [])
    cfg = audio_cfg(tmp_path / "out", w2v, train, clips["validation"]).data
    splits, _ = load_splits(cfg, 0, ("audio_column",))
    splits, skipped = audio.check(splits, cfg)
    assert not skipped
    encoded, _ = audio.prepare(splits, AutoFeatureExtractor.from_pretrained(str(w2v)), cfg, 8)
    victim = Path(splits["train"][5]["path"]["path"])
    victim.write_bytes(b"")
    with pytest.raises(DataError, match=rf"cannot read audio file '{victim}'.*changed or removed"):
        encoded["train"][5]


# ---------------------------------------------------------------- modes on speech models


@pytest.mark.parametrize("kind", ["wav2vec2", "hubert"])
def test_head_modules_and_lora_targets(kind, tmp_path):
    from transformers import AutoModelForAudioClassification

    from hftl import adapt, models
    from hftl.config import AdaptConfig, ModelConfig

    path = tiny_speech_model(tmp_path / kind, kind)
    model, new_keys = models.load_classifier(AutoModelForAudioClassification, str(path), ["a", "b"], ModelConfig())
    head = adapt.head_modules(model, new_keys)
    assert head == ["classifier", "projector"]
    lora = adapt.get_mode("lora").apply(model, AdaptConfig(mode="lora"), head)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert {n.split(".modules_to_save.")[0].rsplit(".", 1)[-1] for n in trainable if "modules_to_save" in n} == {"projector", "classifier"}
    wrapped = {n.split(".lora_A.")[0].rsplit(".", 1)[-1] for n in trainable if ".lora_A." in n}
    assert {"q_proj", "k_proj", "v_proj", "out_proj", "intermediate_dense", "output_dense", "projection"} <= wrapped
    assert not [n for n in trainable if "conv" in n]  # the waveform encoder is not a Linear: frozen


def test_freeze_feature_encoder(w2v, tiny_bert):
    from transformers import AutoModelForAudioClassification, AutoModelForSequenceClassification

    from hftl import adapt

    model = AutoModelForAudioClassification.from_pretrained(str(w2v), num_labels=2)
    adapt.get_mode("full").apply(model, None, [])
    adapt.freeze_feature_encoder(model)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith("wav2vec2.feature_extractor.") for n in frozen)
    assert any(n.startswith("wav2vec2.feature_extractor.") for n, _ in model.named_parameters())
    assert len(frozen) == sum(1 for n, _ in model.named_parameters() if n.startswith("wav2vec2.feature_extractor."))
    text = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=2)
    with pytest.raises(ConfigError, match="adapt.freeze_feature_encoder=false"):
        adapt.freeze_feature_encoder(text)


def test_audiofolder_via_data_dir(w2v, tmp_path):
    """data.data_dir: datasets' audiofolder (class sub-folders), validation carved from train."""
    from hftl.recipe import train as main

    rng = np.random.default_rng(3)
    for i in range(20):
        label = ("low", "high")[i % 2]
        (tmp_path / "data" / "train" / label).mkdir(parents=True, exist_ok=True)
        sf.write(tmp_path / "data" / "train" / label / f"{i}.wav", tone(label, 0.06, rng), FILE_RATE)
    cfg = load_config(None, ["task=audio-classification", f"model.name_or_path={w2v}", f"data.data_dir={tmp_path / 'data'}",
                             "data.validation_fraction=0.2", f"data.max_duration={WINDOW}", f"output.dir={tmp_path / 'out'}",
                             "train.max_steps=2", "train.batch_size=8"])
    main(cfg)
    assert read_json(tmp_path / "out" / "config.json")["id2label"] == {"0": "high", "1": "low"}
    assert len(read_json(tmp_path / "out" / "predictions_validation.json")) == 4
