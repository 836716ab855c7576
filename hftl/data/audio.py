"""Audio modality: decode, mix to mono, resample to the model's rate, at most `data.max_duration` per model input.

Training takes a random window of `data.max_duration` seconds (at the feature extractor's sampling
rate) of a longer clip. Evaluation cuts a longer clip into windows half a window apart (the last one
ends where the clip ends), whose logits `hftl.train.evaluate` averages (`num_windows` in the batch);
with data.eval_window=false a longer clip is fed whole instead.

A shorter clip is padded in one of two ways, decided by the feature extractor:
- it gives an attention mask (wav2vec2-large-lv60 / layer-norm style, HuBERT, WavLM): padding is masked
  out, so a clip is padded only to the longest clip of its batch, and batches group clips of similar
  length (each row's `num_samples`, read from the file's header, drives `hftl.train`'s length grouping
  and length-sorted evaluation) — no time spent on silence;
- it gives none (wav2vec2-base style: group-norm feature encoder): the model's outputs change with
  zero padding, so every clip is padded with silence to the full window; equal-length inputs need no
  padding inside a batch, so a prediction never depends on its batch neighbours and matches what
  pipeline("audio-classification") says for the same padded clip.

Decoding is torchcodec (FFmpeg; what datasets' Audio feature uses) or soundfile (libsndfile), chosen
by data.audio_decoder; resampling is torchaudio's (as in transformers' audio-classification pipeline).
The pipeline check is handed clips already at the model's rate and padded, so it sees what evaluation saw.
"""
from __future__ import annotations

import functools
import io
import random
import re

import numpy as np
import torch
from accelerate import PartialState
from datasets import Audio, DatasetDict

from ..config import ConfigError, DataConfig
from ..extras import require
from . import DataError, media

# The audio extra (pip install 'hftl[audio]'); torchaudio checked against torch before it loads.
sf = require("soundfile", "audio", "audio data")
torchaudio = require("torchaudio", "audio", "audio data")
AF = require("torchaudio.functional", "audio", "audio data")

DECODERS = ("auto", "torchcodec", "soundfile")
AUGMENTS = ("speed", "gain", "noise")
SPEEDS = (0.9, 1.0, 1.1)  # the usual speed-perturbation factors (Ko et al. 2015)


def _torchcodec(value: dict) -> tuple[torch.Tensor, int]:
    AudioDecoder = require("torchcodec.decoders", "audio", "data.audio_decoder=torchcodec").AudioDecoder

    samples = AudioDecoder(value["bytes"] if value.get("bytes") is not None else value["path"]).get_all_samples()
    return samples.data, samples.sample_rate


def _soundfile(value: dict) -> tuple[torch.Tensor, int]:
    data, rate = sf.read(_file(value), dtype="float32", always_2d=True)
    return torch.from_numpy(data.T), rate


def _file(value: dict):
    return io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value["path"]


@functools.cache
def torchcodec_problem() -> str | None:
    """Why torchcodec cannot decode on this machine (usually: no FFmpeg libraries), or None when it can."""
    wav = io.BytesIO()
    sf.write(wav, np.zeros(160, np.float32), 16000, format="WAV")
    try:
        _torchcodec({"bytes": wav.getvalue()})
    except Exception as e:  # ImportError, RuntimeError from loading FFmpeg: anything means "not here"
        return media.reason(e)
    return None


def decoder(name: str):
    """(decode function: row value -> (channels x samples tensor, rate), a line saying which one and why)."""
    if name not in DECODERS:
        raise ConfigError(f"data.audio_decoder='{name}'; expected one of {', '.join(DECODERS)}.")
    if name == "soundfile":
        return _soundfile, "soundfile (data.audio_decoder=soundfile)"
    problem = torchcodec_problem()
    if problem is None:
        return _torchcodec, "torchcodec (FFmpeg)"
    if name == "torchcodec":
        raise ConfigError(f"data.audio_decoder=torchcodec, but torchcodec cannot decode here ({problem}). "
                          "Install FFmpeg (apt-get install ffmpeg) or set data.audio_decoder=soundfile.")
    return _soundfile, f"soundfile, because torchcodec cannot decode here ({problem}); install FFmpeg to use it"


def truncation(value: dict) -> str | None:
    """libsndfile's own diagnosis of a WAV whose header promises more sample data than the file holds.

    Decoders read such a file without complaint and return the part that is there."""
    try:
        log = sf.info(_file(value)).extra_info
    except Exception:  # a format libsndfile does not read: the decoder alone judges it
        return None
    m = re.search(r"^data\s*:\s*(\d+) \(should be (\d+)\)", log, re.M)
    if m and int(m[1]) < 0xFFFFFFFF:  # 0xFFFFFFFF: a streamed WAV that never knew its length
        return f"truncated: its header promises {m[1]} bytes of samples, the file holds {m[2]}"
    return None


@functools.lru_cache(maxsize=16)
def _resampler(source_rate: int, rate: int) -> torchaudio.transforms.Resample:
    """torchaudio's resampler, its filter computed once per pair of rates (per clip it costs ~80x more)."""
    return torchaudio.transforms.Resample(source_rate, rate)


def load(value: dict, decode, rate: int) -> torch.Tensor:
    """A row's audio as one channel at `rate`: a 1-D float tensor."""
    wave, source_rate = decode(value)
    wave = wave.float().mean(0)  # mix channels to mono
    return _resampler(source_rate, rate)(wave) if source_rate != rate else wave


def _pad(wave: torch.Tensor, size: int) -> torch.Tensor:
    return torch.nn.functional.pad(wave, (0, size - len(wave))) if len(wave) < size else wave


def eval_input(wave: torch.Tensor, size: int, window: bool, pad: bool = True) -> torch.Tensor:
    """(windows x samples): one window for a short clip (padded to `size` when `pad`); overlapping windows (or the
    whole clip) for a long one."""
    if len(wave) <= size:
        return (_pad(wave, size) if pad else wave)[None]
    if not window:
        return wave[None]
    starts = [*range(0, len(wave) - size, size // 2), len(wave) - size]
    return torch.stack([wave[s:s + size] for s in starts])


def train_input(wave: torch.Tensor, rate: int, size: int, cfg: DataConfig, pad: bool = True) -> torch.Tensor:
    """A random window of at most `size` samples (padded to `size` when `pad`), augmented as data.augment says."""
    if "speed" in cfg.augment:
        wave = AF.speed(wave, rate, random.choice(SPEEDS))[0]
    if len(wave) > size:
        start = random.randrange(len(wave) - size + 1)
        wave = wave[start:start + size]
    if pad:
        wave = _pad(wave, size)
    if "gain" in cfg.augment:
        wave = AF.gain(wave, random.uniform(-cfg.gain_db, cfg.gain_db))
    if "noise" in cfg.augment:
        wave = AF.add_noise(wave[None], torch.randn(1, len(wave)), torch.tensor([cfg.noise_snr_db]))[0]
    return wave


def batch_padding(feature_extractor) -> bool:
    """Whether clips are padded per batch (the model masks padding) rather than each to the full window."""
    return bool(getattr(feature_extractor, "return_attention_mask", False))


def num_samples(value: dict, decode, rate: int) -> int:
    """A clip's length in samples at `rate`: from the file's header (soundfile), else by decoding it."""
    try:
        info = sf.info(_file(value))
        frames, source_rate = info.frames, info.samplerate
    except Exception:  # a format libsndfile cannot read (torchcodec decodes it)
        wave, source_rate = decode(value)
        frames = wave.shape[-1]
    return round(frames * rate / source_rate)


def window_size(cfg: DataConfig, rate: int) -> int:
    if cfg.max_duration <= 0:
        raise ConfigError(f"data.max_duration={cfg.max_duration}; give the seconds per model input, e.g. 1.0.")
    return round(cfg.max_duration * rate)


def check(splits: DatasetDict, cfg: DataConfig) -> tuple[DatasetDict, dict[str, list[str]]]:
    """Decode every clip once before training: an empty, truncated or non-audio file stops the run or is left out."""
    decode, how = decoder(cfg.audio_decoder)
    PartialState().print(f"audio decoding: {how}")

    def probe(value):
        wave, _ = decode(value)
        if wave.numel() == 0:
            raise ValueError("it holds no samples")
        problem = truncation(value)
        if problem:
            raise ValueError(problem)

    return media.check(media.as_files(splits, cfg.audio_column, Audio), cfg.audio_column, probe, cfg.on_bad_sample, "audio")


def _transform(batch: dict, column: str, decode, rate: int, size: int, cfg: DataConfig, train: bool, pad: bool) -> dict:
    inputs = []
    for value in batch[column]:
        try:
            wave = load(value, decode, rate)
        except Exception as e:  # checked before training, so the file changed since
            raise DataError(f"cannot read audio file '{media.name_of(value)}' ({media.reason(e)}); it could be read "
                            "before training started: was it changed or removed?") from e
        inputs.append(train_input(wave, rate, size, cfg, pad)[None] if train else eval_input(wave, size, cfg.eval_window, pad))
    # adapt.reweight adds a per-row loss weight to the training rows; it passes through to the collator.
    return {"input_values": inputs, "labels": batch["labels"], **({"weight": batch["weight"]} if "weight" in batch else {})}


def collate(rows: list[dict], feature_extractor) -> dict:
    """Every window of every row through the feature extractor; `num_windows` when a row has several."""
    counts = [len(r["input_values"]) for r in rows]
    waves = [w.numpy() for r in rows for w in r["input_values"]]
    # Equal lengths (always for a model without attention mask, except data.eval_window=false): called exactly as the
    # pipeline calls it for one clip.
    padding = "longest" if len({len(w) for w in waves}) > 1 else False
    batch = dict(feature_extractor(waves, sampling_rate=feature_extractor.sampling_rate, padding=padding, return_tensors="pt"))
    batch["labels"] = torch.tensor([r["labels"] for r, n in zip(rows, counts) for _ in range(n)])
    if "weight" in rows[0]:  # adapt.reweight: per-row loss weights, per window as the labels
        batch["weight"] = torch.tensor([float(r["weight"]) for r, n in zip(rows, counts) for _ in range(n)])
    if max(counts) > 1:
        batch["num_windows"] = torch.tensor(counts)
    return batch


def prepare(splits: DatasetDict, feature_extractor, cfg: DataConfig, eval_batch_size: int):
    """Splits that decode, resample, crop or window and augment on the fly (`with_transform`), and their collator."""
    unknown = sorted(set(cfg.augment) - set(AUGMENTS))
    if unknown:
        raise ConfigError(f"data.augment has {unknown}, which audio does not know; choose from {', '.join(AUGMENTS)}.")
    if not cfg.eval_window and eval_batch_size > 1 and not feature_extractor.return_attention_mask:
        raise ConfigError(
            "data.eval_window=false feeds long clips whole, so evaluation batches hold clips of different lengths, and this "
            "model's feature extractor gives no attention mask (wav2vec2-base style): its outputs change with zero padding. "
            "Set train.eval_batch_size=1, or data.eval_window=true."
        )
    decode, _ = decoder(cfg.audio_decoder)
    rate = feature_extractor.sampling_rate
    size = window_size(cfg, rate)
    pad = not batch_padding(feature_extractor)
    splits = media.as_files(splits, cfg.audio_column, Audio)
    if not pad:  # each row's input length (a long clip's windows: one window), for length-grouped batches
        splits = splits.map(lambda b: {"num_samples": [min(size, num_samples(v, decode, rate)) for v in b[cfg.audio_column]]},
                            batched=True, desc="Reading clip lengths")
    encoded = DatasetDict({
        split: ds.with_transform(functools.partial(_transform, column=cfg.audio_column, decode=decode, rate=rate, size=size,
                                                   cfg=cfg, train=split == "train", pad=pad))
        for split, ds in splits.items()
    })
    return encoded, functools.partial(collate, feature_extractor=feature_extractor)


def inputs_for_pipeline(rows, cfg: DataConfig, feature_extractor) -> list:
    """What pipeline("audio-classification") is given to reproduce evaluation: a clip that fits one window,
    at the model's rate and padded as evaluation pads it (the model masks any padding: as it is); None for a
    longer clip, which evaluation cuts into windows (or batches with padding) where the pipeline would feed it whole."""
    decode, _ = decoder(cfg.audio_decoder)
    rate = feature_extractor.sampling_rate
    size, pad = window_size(cfg, rate), not batch_padding(feature_extractor)
    waves = (load(v, decode, rate) for v in media.as_file_column(rows, cfg.audio_column, Audio)[cfg.audio_column])
    return [{"raw": eval_input(w, size, cfg.eval_window, pad)[0].numpy(), "sampling_rate": rate} if len(w) <= size else None
            for w in waves]
