"""Continued self-supervised pretraining of speech and image checkpoints (adapt.pretrain=wav2vec2 / mim).

The speech and image counterparts of the masked-LM stage (hftl/pretrain.py): keep training the checkpoint's own
kind of self-supervised objective on unlabelled in-domain inputs (a new speaker's clips, the target domain's images),
then classify from that checkpoint.

- wav2vec2 (Baevski et al. 2020): transformers' `Wav2Vec2ForPreTraining`, its masked contrastive loss plus the
  codebook diversity loss, with spans masked by transformers' `_compute_mask_indices` and distractors drawn by its
  `_sample_negative_indices` from the other masked frames of the same clip, and the Gumbel temperature decayed per
  step, as transformers' examples/pytorch/speech-pretraining/run_wav2vec2_pretraining_no_trainer.py does (its
  defaults: mask_time_prob 0.65, spans of 10 frames, temperature 2.0 * 0.999995^step, at least 0.5). The loss is per
  masked frame, as that script's gradient scaling makes it.
- mim (SimMIM, Xie et al. 2022): `AutoModelForMaskedImageModeling` (ViT, DeiT, Swin), a random share of square
  mask patches replaced by the mask token and their pixels regressed (L1), as transformers'
  examples/pytorch/image-pretraining/run_mim.py does (its MaskGenerator: 60% of 32-pixel squares).

The stage runs on the shared loop (`hftl.train.fit`: checkpoints in <train.checkpoint_dir>/pretrain, train.resume,
stop signals, the non-finite-loss guard, many processes) through a module whose forward draws the masks and returns
the loss. Masks are drawn in that forward from numpy's global RNG, which every checkpoint saves per process, not in
the data loader, which reads a batch ahead: a resumed stage draws exactly the masks the uninterrupted one would.
5% of the inputs are held out, with masks drawn once, to give the self-supervised loss before and after.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import torch
from accelerate.utils import set_seed
from datasets import ClassLabel, DatasetDict
from huggingface_hub import ModelCard
from torch import nn
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoModel
from transformers.modeling_outputs import ModelOutput
from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices, _sample_negative_indices

from . import checkpoint, hub, train
from .config import Config, ConfigError
from .data import FORMATS, DataError, _load_file
from .hooks import Hook
from .tasks import Task

OBJECTIVES = ("wav2vec2", "mim")
TASKS = {"wav2vec2": "audio-classification", "mim": "image-classification"}
COLUMN = {"wav2vec2": "audio_column", "mim": "image_column"}
# Checkpoint types each objective continues: transformers has Wav2Vec2ForPreTraining for wav2vec2 only (HuBERT and
# WavLM were pretrained on k-means targets of an earlier model, which a checkpoint does not ship), and a masked image
# modelling head (AutoModelForMaskedImageModeling) for these.
SPEECH_TYPES = ("wav2vec2",)
IMAGE_TYPES = ("vit", "deit", "swin", "swinv2")
TEXT_TASK = "text-classification"
HELDOUT = 0.05  # share of the inputs that only measure the self-supervised loss
HELDOUT_PASSES = 4  # the held-out inputs, each masked this many times (other masks each pass): a steadier mean
# run_wav2vec2_pretraining_no_trainer.py's defaults.
MASK_TIME_PROB, MASK_TIME_LENGTH = 0.65, 10
MAX_GUMBEL, MIN_GUMBEL, GUMBEL_DECAY = 2.0, 0.5, 0.999995
# run_mim.py's defaults.
MASK_RATIO, MASK_PATCH_SIZE = 0.6, 32


class PretrainRefused(ConfigError):
    """A checkpoint whose self-supervised objective hftl cannot continue."""


def objective_for(cfg: Config, path: str) -> str:
    """adapt.pretrain resolved for the checkpoint at `path` (auto: by what it was pretrained with), refused in one line
    when that objective is not available for it."""
    wanted = cfg.adapt.pretrain
    if cfg.task == TEXT_TASK:
        if wanted in OBJECTIVES:
            raise PretrainRefused(f"adapt.pretrain={wanted} is for {TASKS[wanted].split('-')[0]} checkpoints; task={cfg.task} "
                                  "continues masked-language-model pretraining: set adapt.pretrain=mlm (or auto).")
        return "mlm"
    if wanted == "mlm":
        return "mlm"  # hftl/pretrain.py refuses it for this task
    model_type = AutoConfig.from_pretrained(path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code).model_type
    objective = {"audio-classification": "wav2vec2", "image-classification": "mim"}[cfg.task]
    if wanted != "auto" and wanted != objective:
        raise PretrainRefused(f"adapt.pretrain={wanted} is for {TASKS[wanted].split('-')[0]} checkpoints; task={cfg.task} "
                              f"continues with adapt.pretrain={objective} (or auto).")
    if objective == "wav2vec2" and model_type not in SPEECH_TYPES:
        raise PretrainRefused(f"adapt.pretrain={wanted}: '{path}' is a {model_type} checkpoint; continued self-supervised "
                              "pretraining of speech is wav2vec2's masked contrastive objective (Wav2Vec2ForPreTraining), for "
                              f"wav2vec2 checkpoints only ({model_type} was pretrained on targets its checkpoint does not ship). "
                              "Set adapt.pretrain=null.")
    if objective == "mim" and model_type not in IMAGE_TYPES:
        raise PretrainRefused(f"adapt.pretrain={wanted}: '{path}' is a {model_type} checkpoint; masked image modelling "
                              f"(SimMIM) continues {', '.join(IMAGE_TYPES)} checkpoints only. Set adapt.pretrain=null.")
    return objective


# ---------------------------------------------------------------- the objectives as modules whose forward returns the loss


def speech_masks(model, input_values: torch.Tensor, attention_mask: torch.Tensor | None, prob: float, length: int):
    """(mask_time_indices, sampled_negative_indices) for a batch, as the example's DataCollatorForWav2Vec2Pretraining
    draws them (numpy's global RNG). Padding frames are never masked; a clip with fewer than two masked frames (shorter
    than a span) is left unmasked, since its masked frames would have no distractor."""
    frames = int(model._get_feat_extract_output_lengths(input_values.shape[-1]))
    shape = (input_values.shape[0], frames)
    valid = None if attention_mask is None else model._get_feature_vector_attention_mask(frames, attention_mask).cpu().numpy()
    mask = _compute_mask_indices(shape, prob, min(length, frames), attention_mask=None if valid is None else torch.from_numpy(valid))
    if valid is not None:
        mask &= valid.astype(bool)
    mask[mask.sum(1) < 2] = False
    negatives = np.zeros((*shape, model.config.num_negatives), dtype=np.int64)
    rows = np.flatnonzero(mask.sum(1) >= 2)
    if len(rows):
        drawn = _sample_negative_indices((len(rows), frames), model.config.num_negatives, mask_time_indices=mask[rows])
        # transformers offsets each row's indices by its place in the batch it was given: move them to the row's own.
        negatives[rows] = drawn - (np.arange(len(rows)) * frames)[:, None, None] + (rows * frames)[:, None, None]
    device = input_values.device
    return torch.tensor(mask, device=device), torch.tensor(negatives, device=device)


class Wav2Vec2Objective(nn.Module):
    """Wav2Vec2ForPreTraining's loss (contrastive + diversity_loss_weight * diversity) per masked frame."""

    def __init__(self, model, prob: float, length: int):
        super().__init__()
        self.model, self.prob, self.length = model, prob, length

    def forward(self, input_values, attention_mask=None, mask_time_indices=None, sampled_negative_indices=None, **_) -> ModelOutput:
        if mask_time_indices is None:
            mask_time_indices, sampled_negative_indices = speech_masks(self.model, input_values, attention_mask, self.prob, self.length)
        out = self.model(input_values, attention_mask=attention_mask, mask_time_indices=mask_time_indices,
                         sampled_negative_indices=sampled_negative_indices)
        masked = mask_time_indices.sum()
        # No masked frame at all (every clip shorter than two frames): a zero loss that still touches the weights.
        loss = out.loss / masked if masked else sum(p.sum() for p in self.model.parameters()) * 0.0
        return ModelOutput(loss=loss, logits=loss)  # 'logits': what SelfSupervised hands the loop as the loss


class SelfSupervised(Task):
    """The stage's task for the shared loop: the objective module computes its own loss (its masks and negatives are
    drawn inside forward) and returns it as its output, so the task's loss is that output; the rows' labels are a
    placeholder. The stage never evaluates through the loop, so it predicts nothing."""
    name = "self_supervised"

    def loss(self, logits, labels, reduction="mean"):
        return logits


class Gumbel(Hook):
    """fit hook: the quantizer's Gumbel-softmax temperature, decayed per optimizer step as the example does."""

    def on_step(self, model, step, epoch):
        model.model.set_gumbel_temperature(max(MAX_GUMBEL * GUMBEL_DECAY ** step, MIN_GUMBEL))


def image_masks(config, batch_size: int, ratio: float, patch: int) -> torch.Tensor:
    """(batch, patches) bool: run_mim.py's MaskGenerator per image: ceil(ratio * squares) random `patch`-pixel squares of
    the image masked, each covering (patch / model patch size)^2 model patches (numpy's global RNG)."""
    side, scale = config.image_size // patch, patch // config.patch_size
    count = side * side
    masks = []
    for _ in range(batch_size):
        mask = np.zeros(count, dtype=bool)
        mask[np.random.permutation(count)[:math.ceil(count * ratio)]] = True
        masks.append(mask.reshape(side, side).repeat(scale, 0).repeat(scale, 1).flatten())
    return torch.tensor(np.stack(masks))


class MimObjective(nn.Module):
    """The masked image modelling head's L1 loss over the masked pixels."""

    def __init__(self, model, ratio: float, patch: int):
        super().__init__()
        self.model, self.ratio, self.patch = model, ratio, patch

    def forward(self, pixel_values, bool_masked_pos=None, **_) -> ModelOutput:
        if bool_masked_pos is None:
            bool_masked_pos = image_masks(self.model.config, len(pixel_values), self.ratio, self.patch).to(pixel_values.device)
        loss = self.model(pixel_values, bool_masked_pos=bool_masked_pos).loss
        return ModelOutput(loss=loss, logits=loss)


def build(objective: str, path: str, cfg: Config):
    """(the pretraining model, its objective module, fit hooks, the config values to put back before saving)."""
    a, m = cfg.adapt, cfg.model
    load = {"revision": m.revision, "trust_remote_code": m.trust_remote_code, "use_safetensors": None if m.allow_pickle else True}
    if objective == "wav2vec2":
        from transformers import Wav2Vec2ForPreTraining

        prob, length = a.mask_probability or MASK_TIME_PROB, a.mask_span or MASK_TIME_LENGTH
        config = AutoConfig.from_pretrained(path, revision=m.revision, trust_remote_code=m.trust_remote_code)
        # The masked frames are replaced by the learnt mask embedding, which exists only with mask_time_prob > 0 and
        # is applied only with apply_spec_augment; the fine-tuning SpecAugment settings are put back before saving.
        restore = {"mask_time_prob": config.mask_time_prob, "apply_spec_augment": config.apply_spec_augment}
        model = Wav2Vec2ForPreTraining.from_pretrained(path, mask_time_prob=prob, apply_spec_augment=True, **load)
        model.set_gumbel_temperature(MAX_GUMBEL)
        return model, Wav2Vec2Objective(model, prob, length), [Gumbel()], restore
    from transformers import AutoModelForMaskedImageModeling

    config = AutoConfig.from_pretrained(path, revision=m.revision, trust_remote_code=m.trust_remote_code)
    size, own = config.image_size, config.patch_size
    patch = a.mask_span or (MASK_PATCH_SIZE if size % MASK_PATCH_SIZE == 0 and MASK_PATCH_SIZE % own == 0 else own)
    if size % patch or patch % own:
        raise ConfigError(f"adapt.mask_span={patch}: a SimMIM mask square must be a multiple of the model's patch size ({own}) "
                          f"that divides its image size ({size}); e.g. adapt.mask_span={own}.")
    # The decoder turns each patch back into pixels by a pixel shuffle of the patch's size (encoder_stride); the saved
    # config keeps it, so the folder loads as the masked image model it holds (a classifier does not read it).
    model = AutoModelForMaskedImageModeling.from_pretrained(path, encoder_stride=own, **load)
    return model, MimObjective(model, a.mask_probability or MASK_RATIO, patch), [], {}


# ---------------------------------------------------------------- the unlabelled inputs


def inputs(cfg: Config, objective: str, splits, target, modality) -> tuple[datasets.Dataset, str]:
    """The unlabelled inputs (the media column only, checked as training rows are): adapt.pretrain_file's (a
    csv/tsv/json/jsonl/parquet file or an audiofolder/imagefolder), else the training rows plus data.target's."""
    d, file = cfg.data, cfg.adapt.pretrain_file
    column = getattr(d, COLUMN[objective])
    if file:
        p = Path(file)
        if p.is_dir():
            try:
                found = datasets.load_dataset(str(p))
            except Exception as e:  # EmptyDatasetError, a builder's parse error
                raise DataError(f"adapt.pretrain_file: could not read folder '{file}': {type(e).__name__}: "
                                f"{(str(e).strip().splitlines() or [''])[0]}.") from e
            rows = datasets.concatenate_datasets(list(found.values()))
        elif not p.is_file():
            raise DataError(f"adapt.pretrain_file: '{file}' does not exist.")
        elif p.suffix.lower() not in FORMATS:
            raise DataError(f"adapt.pretrain_file: '{file}' has suffix '{p.suffix}'; expected a folder of "
                            f"{'audio' if objective == 'wav2vec2' else 'images'} or one of {', '.join(FORMATS)} with data.{COLUMN[objective]}.")
        else:
            rows = _load_file(file, "pretrain_file", [column])
        if column not in rows.column_names:
            raise DataError(f"adapt.pretrain_file '{file}' has no column '{column}' (data.{COLUMN[objective]}); its columns are "
                            f"{rows.column_names}.")
        rows, _ = modality.check(DatasetDict(train=rows.select_columns([column])), cfg)
        rows, source = rows["train"], file
    else:
        parts = [splits["train"]] + ([target] if target is not None else [])
        rows = datasets.concatenate_datasets([ds.select_columns([column]) for ds in parts])
        source = "the training inputs" + (" and data.target's" if target is not None else "")
    if len(rows) < 2:
        raise DataError(f"adapt.pretrain={objective}: {source} give(s) {len(rows)} input(s); it needs at least two (one is held "
                        "out to measure the stage).")
    # The modality's preparation expects a label column: a placeholder, never read.
    return rows.add_column("labels", [0] * len(rows), feature=ClassLabel(names=["unlabelled"])), source


# ---------------------------------------------------------------- the stage


def stage_config(cfg: Config) -> Config:
    """The config a pretraining stage trains with on the shared loop: its epochs and rate (adapt.pretrain_*), a linear
    schedule, its checkpoints beside the classifier's (<checkpoints>/pretrain; train.resume applies when it names
    none of the classifier's), no validation split, nothing selected, nothing pushed."""
    a, t = cfg.adapt, cfg.train
    root = checkpoint.root(cfg) / "pretrain"
    resume = t.resume if t.resume in (None, "auto") or Path(t.resume).resolve().is_relative_to(root.resolve()) else None
    return replace(cfg, train=replace(t, epochs=a.pretrain_epochs, max_steps=None, min_steps=None, learning_rate=a.pretrain_learning_rate,
                                      scheduler="linear", checkpoint_dir=str(root), resume=resume, early_stopping_patience=None,
                                      metrics=[], metric_for_best="loss", greater_is_better=False),
                   hub=replace(cfg.hub, strategy="end"))


def heldout_batches(encoded, collator, objective_module, cfg: Config) -> list[dict]:
    """The held-out batches with their masks (and negatives) drawn once, from a seeded RNG that leaves the global one
    as it was: before and after see the same masks."""
    state = np.random.get_state()
    np.random.seed(cfg.train.seed)
    batches = []
    try:
        for _ in range(HELDOUT_PASSES):
            for batch in DataLoader(encoded, batch_size=cfg.train.eval_batch_size, collate_fn=collator):
                batch = {k: v for k, v in batch.items() if k not in ("labels", "num_windows")}
                if isinstance(objective_module, Wav2Vec2Objective):
                    batch["mask_time_indices"], batch["sampled_negative_indices"] = speech_masks(
                        objective_module.model, batch["input_values"], batch.get("attention_mask"), objective_module.prob,
                        objective_module.length)
                else:
                    batch["bool_masked_pos"] = image_masks(objective_module.model.config, len(batch["pixel_values"]),
                                                           objective_module.ratio, objective_module.patch)
                batches.append(batch)
    finally:
        np.random.set_state(state)
    return batches


def heldout_loss(objective_module, batches: list[dict], accelerator) -> float:
    """Mean self-supervised loss over the held-out batches (eval mode: no dropout, the quantizer's hard choice)."""
    objective_module.eval()
    losses = []
    with torch.inference_mode(), accelerator.autocast():
        for batch in batches:
            losses.append(objective_module(**{k: v.to(accelerator.device) for k, v in batch.items()}).loss.float().item())
    objective_module.train()
    return sum(losses) / len(losses)


def continue_pretraining(cfg: Config, objective: str, path: str, splits, processor, accelerator, target, modality) -> str:
    """Train `path` with its self-supervised objective on unlabelled inputs; return the folder the classifier loads."""
    a, t = cfg.adapt, cfg.train
    if cfg.model.from_scratch:
        raise ConfigError("model.from_scratch=true re-initialises every weight after adapt.pretrain has trained them; "
                          "set one of them to false/null.")
    out = Path(str(Path(cfg.output.dir)) + ".pretrained")
    settings = {"objective": objective, "base": path, "revision": cfg.model.revision, "pretrain_file": a.pretrain_file,
                "target": cfg.data.target, "epochs": a.pretrain_epochs, "learning_rate": a.pretrain_learning_rate,
                "mask_probability": a.mask_probability, "mask_span": a.mask_span, "max_duration": cfg.data.max_duration,
                "batch_size": t.batch_size, "seed": t.seed}
    if out.exists():
        info = out / "pretrain.json"
        if t.resume and info.is_file() and json.loads(info.read_text()).get("settings") == settings:
            accelerator.print(f"adapt.pretrain: train.resume is set and {out} was written with these settings; reusing it.")
            return str(out)
        if not cfg.output.overwrite:
            raise hub.OutputError(f"'{out}' (adapt.pretrain's checkpoint for output.dir={cfg.output.dir}) exists; choose another "
                                  "output.dir, delete that folder, or set output.overwrite=true to replace it.")

    with accelerator.main_process_first():  # one process reads the inputs, the others its cache
        rows, source = inputs(cfg, objective, splits, target, modality)
        parts = rows.train_test_split(test_size=HELDOUT, seed=t.seed)
        # The held-out share is prepared as evaluation rows are (whole clips in windows, no augmentation).
        encoded, collator = modality.prepare(DatasetDict(train=parts["train"], validation=parts["test"]), processor, cfg)
    model, objective_module, hooks, restore = build(objective, path, cfg)
    objective_module.to(accelerator.device).train()
    start = time.perf_counter()
    heldout = heldout_batches(encoded["validation"], collator, objective_module, cfg)
    before = heldout_loss(objective_module, heldout, accelerator)

    stage = stage_config(cfg)
    np.random.seed(t.seed + accelerator.process_index)  # each process its own masks (the loop saves and restores this state)
    accelerator.print(f"adapt.pretrain={objective}: {len(parts['train'])} unlabelled inputs from {source} "
                      f"({len(parts['test'])} held out)")
    result = train.fit(objective_module, DatasetDict(train=encoded["train"]), collator, stage, accelerator, hooks,
                       task=SelfSupervised(["unlabelled"]))
    objective_module = result["model"]
    after = heldout_loss(objective_module, heldout, accelerator)
    if not math.isfinite(after):
        raise train.NonFiniteLossError(f"adapt.pretrain: the held-out {objective} loss is {after} after {result['steps']} steps; "
                                       "lower adapt.pretrain_learning_rate or set train.max_grad_norm.")
    log = result["step_log"]
    info = {"objective": objective, "source": source, "inputs": len(parts["train"]), "heldout_inputs": len(parts["test"]),
            "heldout_batches": len(heldout), "steps": result["steps"], "heldout_loss_before": before, "heldout_loss_after": after,
            "train_loss_first": log[0]["loss"] if log else None, "train_loss_last": log[-1]["loss"] if log else None,
            "seconds": round(time.perf_counter() - start, 2), "folder": str(out), "settings": settings}
    accelerator.print(f"adapt.pretrain={objective}: held-out loss {before:.4f} -> {after:.4f} over {len(parts['test'])} held-out "
                      f"inputs; trained on {info['inputs']} inputs from {source}, {info['steps']} steps, {info['seconds']}s")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save(objective_module.model, path, processor, info, restore, cfg)
        accelerator.print(f"Saved {out}; the classifier starts from it")
    accelerator.wait_for_everyone()
    accelerator.free_memory(objective_module)
    set_seed(t.seed)  # the classifier stage draws its head and data order as a run without this stage would
    return str(out)


def save(model, path: str, processor, info: dict, restore: dict, cfg: Config) -> None:
    """Write the folder atomically (hub.save_output): the pretraining model with its objective's head (for a further
    stage), the fine-tuning config values put back, and the checkpoint's weights the objective does not use (a ViT
    pooler), so the classifier finds everything the original checkpoint gave it."""
    model.config.update(restore)
    trained = model.base_model.state_dict()
    m = cfg.model
    base, loading = AutoModel.from_pretrained(path, revision=m.revision, trust_remote_code=m.trust_remote_code,
                                              use_safetensors=None if m.allow_pickle else True, output_loading_info=True)
    # Only weights the checkpoint has: AutoModel may add a pooler the checkpoint was saved without (random, not kept).
    kept = {k: v for k, v in base.state_dict().items() if k not in trained and k not in loading["missing_keys"]}
    state = {**model.state_dict(), **{f"{model.base_model_prefix}.{k}": v for k, v in kept.items()}}
    what = {"wav2vec2": "wav2vec2 masked contrastive pretraining (Baevski et al. 2020) continued",
            "mim": "SimMIM masked image modelling (Xie et al. 2022)"}[info["objective"]]
    card = ModelCard(
        "---\nlibrary_name: transformers\ntags: [hftl, continued-pretraining, self-supervised]\n---\n"
        f"# {Path(info['folder']).name}\n\n{what} from `{path}` on {info['inputs']} unlabelled inputs from {info['source']}: "
        f"{info['steps']} steps in {info['seconds']} s; held-out self-supervised loss {info['heldout_loss_before']:.4f} -> "
        f"{info['heldout_loss_after']:.4f} on {info['heldout_inputs']} held-out inputs. The first stage of the hftl run that "
        f"writes `{cfg.output.dir}`; details in pretrain.json.\n"
    )
    hub.save_output(info["folder"], model, processor, card, {"pretrain.json": info}, overwrite=cfg.output.overwrite,
                    export=lambda mdl: SimpleNamespace(save_pretrained=lambda folder: mdl.save_pretrained(folder, state_dict=state)))
