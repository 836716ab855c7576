"""Speech: any AutoModelForAudioClassification checkpoint (wav2vec2, HuBERT, WavLM, ...); decoding, resampling and
windows are in hftl/data/audio.py.

    hftl train recipes/configs/audio/wav2vec2_fsdd_lora.yaml [key=value ...]
"""
from __future__ import annotations

from transformers import AutoFeatureExtractor, AutoModelForAudioClassification

from .. import models
from ..config import Config
from ..data import audio
from . import Modality


def load_feature_extractor(path: str, cfg: Config):
    return AutoFeatureExtractor.from_pretrained(path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)


def pipeline_inputs(rows, cfg: Config) -> list:
    return audio.inputs_for_pipeline(rows, cfg.data, load_feature_extractor(models.resolve(cfg.model)[0], cfg))


MODALITY = AUDIO = Modality(
    pipeline_tag="audio-classification",
    auto_class=AutoModelForAudioClassification,
    load_processor=load_feature_extractor,
    prepare=lambda splits, feature_extractor, cfg: audio.prepare(splits, feature_extractor, cfg.data, cfg.train.eval_batch_size),
    pipeline_inputs=pipeline_inputs,
    input_keys=("audio_column",),
    check=lambda splits, cfg: audio.check(splits, cfg.data),
)
