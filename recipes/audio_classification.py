"""Recipe: audio classification (any AutoModelForAudioClassification checkpoint: wav2vec2, HuBERT, WavLM, ...).

    hftl train recipes/configs/audio/wav2vec2_fsdd_lora.yaml [key=value ...]
    hftl train recipes/configs/audio/wav2vec2_fsdd_head.yaml data.data_dir=my_audiofolder

What is audio-specific lives here and in hftl/data/audio.py; the path every recipe shares is hftl/run.py.
"""
from __future__ import annotations

from transformers import AutoFeatureExtractor, AutoModelForAudioClassification

from hftl import models
from hftl.config import Config
from hftl.data import audio
from hftl.run import Modality, run


def load_feature_extractor(path: str, cfg: Config):
    return AutoFeatureExtractor.from_pretrained(path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)


def pipeline_inputs(rows, cfg: Config) -> list:
    return audio.inputs_for_pipeline(rows, cfg.data, load_feature_extractor(models.resolve(cfg.model)[0], cfg))


AUDIO = Modality(
    pipeline_tag="audio-classification",
    auto_class=AutoModelForAudioClassification,
    load_processor=load_feature_extractor,
    prepare=lambda splits, feature_extractor, cfg: audio.prepare(splits, feature_extractor, cfg.data, cfg.train.eval_batch_size),
    pipeline_inputs=pipeline_inputs,
    input_keys=("audio_column",),
    check=lambda splits, cfg: audio.check(splits, cfg.data),
)


def main(cfg: Config) -> dict:
    return run(cfg, AUDIO)
