"""Pretrain the small source checkpoints that speech and image transfer start from.

No pretrained wav2vec2 or ViT weights can be downloaded here, so the project makes its own: a tiny
model built from config, trained with hftl on a *source* data set, whose backbone is then transferred
to a different target (see scripts/transfer_evidence.py).

    .venv/bin/python scripts/pretrain_source.py image     # ViT on USPS (~5 min on 2 CPU cores)
    .venv/bin/python scripts/pretrain_source.py speech    # wav2vec2 on FSDD speakers george, jackson, lucas (~10 min)
    .venv/bin/python scripts/pretrain_source.py image --self-supervised    # the same source without its labels
    .venv/bin/python scripts/pretrain_source.py speech --self-supervised

--self-supervised trains the same from-config checkpoint on the same source inputs with no labels at all: hftl's
continued-pretraining stage alone (adapt.pretrain=auto: SimMIM for the ViT on USPS's training images, wav2vec2's
masked contrastive objective for the wav2vec2 on the three source speakers' clips, takes 0-49), as many epochs at the
batch size and learning rate of the supervised preset. Its backbone is the unsupervised source checkpoint,
vit-usps-ssl/ or wav2vec2-fsdd3-ssl/, beside the supervised one. For variety, the speech stage also reads spoken digits
synthesised by Debian's espeak-ng (`apt-get install espeak-ng`) in 7 English accents x 6 voices x 2 speeds (840 clips,
silence trimmed, 16 kHz; outputs/pretrained/espeak-ng/), and then runs as many optimizer steps as the supervised run
(fewer epochs over more clips); --no-voices leaves them out. The held-apart speaker nicolas is in neither.

Writes, under outputs/pretrained/ (git-ignored; every folder is an ordinary save_pretrained folder):

    <arch>-tiny-init/   the architecture randomly initialised, with its processor: the source run's
                        start and the 'scratch' baseline of the evidence
    <source run>/       the hftl run on the source task (recipes/configs/<modality>/*_source.yaml)
    vit-usps/, wav2vec2-fsdd3/
                        that run's backbone without its classification head: the checkpoint to transfer
    <source run>-ssl.pretrained/, vit-usps-ssl/, wav2vec2-fsdd3-ssl/
                        (--self-supervised) the stage's folder (with its objective's head and pretrain.json), and
                        its backbone: the unsupervised source checkpoint
    fsdd-splits/*.csv   (speech) FSDD file lists by speaker and take: source_{train,validation} for
                        george, jackson, lucas; target_{pool,validation,test} for nicolas. They list
                        paths into ../shared/data; no audio is copied.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny models gain nothing from a second thread, and on a busy machine OpenMP threads that wait for
# each other make a step up to 10x slower (measured here: 32 ms vs 342 ms). Set OMP_NUM_THREADS to change.
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)  # the presets' paths are relative to the repository root

SHARED_DATA = Path(os.environ.get("HFTL_SHARED_DATA", ROOT.parent / "shared" / "data"))  # as scripts/benchlib.py
FSDD = SHARED_DATA / "speech" / "fsdd"
SPLITS = ROOT / "outputs" / "pretrained" / "fsdd-splits"
SOURCE_SPEAKERS = ("george", "jackson", "lucas")
TARGET_SPEAKER = "nicolas"
# Takes of the held-apart speaker (50 per digit): test, validation (best-epoch selection), and the pool
# that label budgets are drawn from.
TARGET_TAKES = {"test": range(0, 15), "validation": range(15, 20), "pool": range(20, 50)}

MODALITIES = {
    "image": {"preset": "recipes/configs/image/vit_usps_source.yaml", "init": "vit-tiny-init", "backbone": "vit-usps"},
    "speech": {"preset": "recipes/configs/audio/wav2vec2_fsdd3_source.yaml", "init": "wav2vec2-tiny-init", "backbone": "wav2vec2-fsdd3"},
}
USPS_TRAIN = SHARED_DATA / "images" / "usps" / "train"  # an imagefolder (class sub-folders; labels unused)


def init_checkpoint(modality: str, folder: Path) -> Path:
    """The architecture from config, randomly initialised (seed 0), saved with its processor."""
    import torch

    torch.manual_seed(0)
    if modality == "image":
        from transformers import ViTConfig, ViTImageProcessor, ViTModel

        config = ViTConfig(image_size=16, patch_size=4, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                           intermediate_size=128)
        ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
        ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder)
    else:
        from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

        # wav2vec2's own layout (7 convolutions of kernel 10,3,..,2, group norm) learns next to nothing from
        # 1,350 clips at this size (30% validation accuracy where MFCCs + logistic regression get 98%). A wide
        # first filter (64 samples, 4 ms) and layer norm after every convolution (feat_extract_norm="layer",
        # as in wav2vec2-large-lv60) learn: 60% after 8 epochs and still rising.
        config = Wav2Vec2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                conv_dim=(64,) * 5, conv_kernel=(64, 3, 3, 3, 3), conv_stride=(8, 2, 2, 2, 2), conv_bias=True,
                                feat_extract_norm="layer", do_stable_layer_norm=True, num_conv_pos_embeddings=16,
                                num_conv_pos_embedding_groups=4, classifier_proj_size=32, apply_spec_augment=False, layerdrop=0.0,
                                # The self-supervised objective's quantizer, sized to this 64-wide model (read only by
                                # Wav2Vec2ForPreTraining: the base model's weights are the same). At wav2vec2-base's
                                # 2 x 320 codes of 128 the quantizer materialises (frames, 640, 128) per batch: 16 s a step.
                                num_codevectors_per_group=32, codevector_dim=64, proj_codevector_dim=64)
        Wav2Vec2Model(config).save_pretrained(folder)
        Wav2Vec2FeatureExtractor(sampling_rate=16000, return_attention_mask=True).save_pretrained(folder)
    return folder


def write_csv(path: Path, rows: list[dict]) -> Path:
    """An FSDD file list (written aside and renamed: evidence scripts running side by side rewrite these lists)."""
    from transfer_evidence import write_csv as write  # scripts/, beside this file

    return write(path, rows, ("path", "label", "speaker", "take"))


def fsdd_splits() -> dict[str, Path]:
    """FSDD's metadata.csv split by speaker and take (FSDD's own test convention is takes 0-4)."""
    with open(FSDD / "metadata.csv", newline="") as f:
        rows = [{"path": str((FSDD / r["file_name"]).resolve()), "label": r["label"], "speaker": r["speaker"], "take": int(r["take"])}
                for r in csv.DictReader(f)]
    source = [r for r in rows if r["speaker"] in SOURCE_SPEAKERS]
    target = [r for r in rows if r["speaker"] == TARGET_SPEAKER]
    parts = {
        "source_train": [r for r in source if r["take"] >= 5],
        "source_validation": [r for r in source if r["take"] < 5],
        **{f"target_{name}": [r for r in target if r["take"] in takes] for name, takes in TARGET_TAKES.items()},
    }
    return {name: write_csv(SPLITS / f"{name}.csv", part) for name, part in parts.items()}


# Spoken digits from espeak-ng (unlabelled inputs of the speech self-supervised stage): accents x voice variants x speeds.
ESPEAK_ACCENTS = ("en", "en-us", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029")
ESPEAK_VARIANTS = ("m1", "m3", "m5", "f1", "f3", "f5")
ESPEAK_SPEEDS = (130, 175)  # words per minute (espeak-ng's default is 175)
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def synthesised_voices(folder: Path) -> list[dict]:
    """The spoken digits in every accent, variant and speed, as 16 kHz mono files under `folder` (made once), trimmed
    to the speech (espeak-ng pads a word with about half a second of silence; FSDD's clips are trimmed)."""
    import shutil
    import subprocess

    import numpy as np
    import soundfile as sf
    from scipy.signal import resample_poly

    exe = shutil.which("espeak-ng")
    if exe is None:
        sys.exit("pretrain_source: speech --self-supervised adds spoken digits synthesised by Debian's espeak-ng, which is not "
                 "installed: apt-get install espeak-ng (or pass --no-voices to pretrain on the FSDD speakers alone).")
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for accent in ESPEAK_ACCENTS:
        for variant in ESPEAK_VARIANTS:
            for speed in ESPEAK_SPEEDS:
                for digit, word in enumerate(DIGITS):
                    path = folder / f"{accent}+{variant}-{speed}-{word}.wav"
                    if not path.is_file():
                        raw = folder / f"{path.stem}.{os.getpid()}.raw.wav"
                        subprocess.run([exe, "-v", f"{accent}+{variant}", "-s", str(speed), "-w", str(raw), word], check=True)
                        wave, rate = sf.read(raw, dtype="float32")
                        raw.unlink()
                        loud = np.flatnonzero(np.abs(wave) > 0.02 * np.abs(wave).max())
                        pad = rate // 50  # 20 ms either side
                        wave = wave[max(loud[0] - pad, 0):loud[-1] + pad]
                        wave = resample_poly(wave, 16000 // 50, rate // 50).astype(np.float32)  # 22,050 Hz -> 16 kHz
                        tmp = folder / f"{path.stem}.{os.getpid()}.tmp.wav"
                        sf.write(tmp, wave, 16000, subtype="PCM_16")
                        tmp.replace(path)
                    rows.append({"path": str(path), "label": str(digit), "speaker": f"espeak-ng {accent}+{variant}", "take": speed})
    return rows


def fsdd_data(side: str) -> list[str]:
    """The data.* overrides the speech presets need (they name no data: a preset must run from an installed wheel):
    'source' the three speakers' train/validation lists, 'target' nicolas's pool/validation/test. Writes the lists."""
    splits = fsdd_splits()
    if side == "source":
        return [f"data.train_file={splits['source_train']}", f"data.validation_file={splits['source_validation']}"]
    return [f"data.train_file={splits['target_pool']}", f"data.validation_file={splits['target_validation']}",
            f"data.test_file={splits['target_test']}"]


def backbone(run_dir: Path, out: Path) -> Path:
    """The trained classifier's base model (no head, no label names) and its processor, saved as a checkpoint."""
    from transformers import AutoFeatureExtractor, AutoImageProcessor, AutoModel

    model = AutoModel.from_pretrained(run_dir)  # the base model class: the classification head is left behind
    # The source labels belong to the head, not the backbone: transformers' defaults.
    model.config.id2label = {0: "LABEL_0", 1: "LABEL_1"}
    model.config.label2id = {"LABEL_0": 0, "LABEL_1": 1}
    model.save_pretrained(out)
    loader = AutoImageProcessor if model.config.model_type == "vit" else AutoFeatureExtractor
    loader.from_pretrained(run_dir).save_pretrained(out)
    return out


def pretrain(modality: str, overrides: list[str]) -> Path:
    from hftl import recipe
    from hftl.config import load_config

    spec = MODALITIES[modality]
    init = init_checkpoint(modality, ROOT / "outputs" / "pretrained" / spec["init"])
    print(f"from-config checkpoint: {init}")
    if modality == "speech":
        for name, path in fsdd_splits().items():
            print(f"{name}: {path}")
    # the presets name no data
    data = [f"data.data_dir={SHARED_DATA / 'images' / 'usps'}"] if modality == "image" else fsdd_data("source")
    cfg = load_config(spec["preset"], ["output.overwrite=true", *data, *overrides])  # a rerun replaces its own earlier output (no preset sets it)
    recipe.train(cfg)
    out = backbone(Path(cfg.output.dir), ROOT / "outputs" / "pretrained" / spec["backbone"])
    print(f"source checkpoint (backbone, no head): {out}")
    return out


def self_supervised(task: str, model: Path, inputs: Path, out: Path, overrides: list[str]) -> Path:
    """hftl's continued-pretraining stage alone (adapt.pretrain=auto) on the unlabelled `inputs` (a csv with a `path`
    column or a media folder), as `hftl train` runs it before classifying; returns its folder, `<out>.pretrained`."""
    from hftl import modalities
    from hftl.config import load_config
    from hftl.pretrain import continue_pretraining
    from hftl.train import make_accelerator

    modality = modalities.get(task)
    # A csv names the files in its `path` column; an imagefolder's column is `image`.
    column = [f"data.{'audio' if task == 'audio-classification' else 'image'}_column=path"] if inputs.suffix == ".csv" else []
    cfg = load_config(None, [f"task={task}", f"model.name_or_path={model}", "adapt.pretrain=auto", f"adapt.pretrain_file={inputs}",
                             *column, f"output.dir={out}", "output.overwrite=true", *overrides])
    accelerator = make_accelerator(cfg.train)
    processor = modality.load_processor(str(model), cfg)
    return Path(continue_pretraining(cfg, str(model), None, processor, accelerator, None, modality))


def pretrain_unsupervised(modality: str, overrides: list[str], voices: bool = True) -> Path:
    """The source checkpoint without labels: the stage on the source inputs, from the same from-config checkpoint."""
    import yaml

    spec = MODALITIES[modality]
    init = init_checkpoint(modality, ROOT / "outputs" / "pretrained" / spec["init"])
    preset = yaml.safe_load(Path(spec["preset"]).read_text())
    t = preset["train"]
    epochs = t["epochs"]
    if modality == "speech":
        splits = fsdd_splits()
        rows = [r for name in ("source_train", "source_validation") for r in csv.DictReader(open(splits[name], newline=""))]
        if voices:
            fsdd_rows = sum(1 for _ in csv.DictReader(open(splits["source_train"], newline="")))
            synthesised = synthesised_voices(ROOT / "outputs" / "pretrained" / "espeak-ng")
            print(f"espeak-ng: {len(synthesised)} synthesised clips beside {len(rows)} FSDD clips")
            # The supervised run's optimizer steps (its epochs over the source speakers' training takes), over more clips
            # (the stage holds out a share of its inputs to measure its loss).
            from hftl.pretrain_media import HELDOUT

            steps = t["epochs"] * math.ceil(fsdd_rows / t["batch_size"])
            epochs = round(steps / math.ceil((1 - HELDOUT) * (len(rows) + len(synthesised)) / t["batch_size"]), 3)
            rows += synthesised
        inputs = write_csv(SPLITS / "source_all.csv", rows)  # the source speakers' every take (+ the voices); labels unused
    budget = [f"adapt.pretrain_epochs={epochs}", f"adapt.pretrain_learning_rate={t['learning_rate']}",
              f"train.batch_size={t['batch_size']}", f"train.eval_batch_size={t['eval_batch_size']}",
              f"train.weight_decay={t['weight_decay']}"]
    if modality == "speech":
        task, budget = "audio-classification", budget + [f"data.max_duration={preset['data']['max_duration']}"]
    else:
        inputs, task = USPS_TRAIN, "image-classification"
    folder = self_supervised(task, init, inputs, ROOT / "outputs" / "pretrained" / f"{spec['backbone']}-ssl-run", budget + overrides)
    info = json.loads((folder / "pretrain.json").read_text())
    print(f"self-supervised ({info['objective']}): held-out loss {info['heldout_loss_before']:.4f} -> {info['heldout_loss_after']:.4f}, "
          f"{info['steps']} steps, {info['seconds']:.0f} s")
    out = backbone(folder, ROOT / "outputs" / "pretrained" / f"{spec['backbone']}-ssl")
    print(f"unsupervised source checkpoint (backbone, no head, no labels seen): {out}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("modality", choices=sorted(MODALITIES))
    ap.add_argument("overrides", nargs="*", help="key=value for the source run, e.g. train.epochs=2 (--self-supervised: "
                    "adapt.pretrain_epochs=2)")
    ap.add_argument("--self-supervised", action="store_true", help="pretrain without labels (see above)")
    ap.add_argument("--no-voices", action="store_true", help="speech --self-supervised: the FSDD source speakers alone, no "
                    "espeak-ng voices")
    args = ap.parse_intermixed_args()  # the flag before or after the overrides
    if args.self_supervised:
        pretrain_unsupervised(args.modality, args.overrides, voices=not args.no_voices)
    else:
        pretrain(args.modality, args.overrides)


if __name__ == "__main__":
    main()
