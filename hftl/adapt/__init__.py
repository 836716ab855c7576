"""Adaptation modes by name. Each mode is one file that calls `register_mode` once.

A mode gets the freshly loaded classification model and the names of the modules that make up
its task head (newly initialised or known head layers), and returns the model to train with the
right parameters trainable. `export` turns the trained model into a plain transformers model for
saving (LoRA merges its weights; the others return it unchanged).

A mode declares what it is (`Mode`: its backbone frozen, a peft method, stages of its own), so the rest of
hftl asks the mode instead of keeping lists of mode names.

What a mode or an option adds to the training loop goes through hooks (`hftl.hooks.Hook`): a mode may
return some from `hooks` (gradual unfreezing), and each option file (layer-wise rates, L2-SP, domain
alignment, reweighting) registers a builder with `register_option` that returns a hook when its config key
is on. Hooks run in an explicit order: the mode's, then the options in OPTION_ORDER. A mode with stages of
its own (lpft, contrastive) supplies `fit`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from ..config import AdaptConfig, Config, ConfigError
from ..hooks import Hook  # noqa: F401  (what hooks subclass; re-exported for the mode and option files)
from ..modes import HELP

# Layers that classification heads in transformers are called by (BERT/ViT 'classifier',
# decoder models 'score', wav2vec2/HuBERT 'projector' + 'classifier', DistilBERT 'pre_classifier').
HEAD_NAMES = ("classifier", "score", "projector", "pre_classifier")


@dataclass
class Mode:
    name: str
    apply: Callable[[nn.Module, AdaptConfig, list[str]], nn.Module]
    export: Callable[[nn.Module], nn.Module]
    help: str
    hooks: Callable[[nn.Module, "Context"], list] | None = None  # (model, ctx) -> hooks for hftl.train.fit
    fit: Callable[[nn.Module, "Context", list], dict] | None = None  # (model, ctx, hooks) -> fit's result; replaces the default
    # Its head is fitted on frozen features (head; lpft's probe; contrastive's head): adapt.pooling=auto then reads the
    # checkpoint's own pooling (hftl/pooling.py), where it matters most; modes that fine-tune from a fresh head keep the
    # architecture's, whose folder transformers.pipeline loads. Such a mode's frozen stage can train on the feature cache.
    frozen_features: bool = False
    # The backbone never trains: the whole run trains the head on what the backbone computes once (hftl/cache.py), and
    # options that move the features (adapt.align) have nothing to act on.
    frozen_backbone: bool = False
    # The trained model is a peft model: adapt.save_adapter writes its unmerged adapter to OUTPUT/adapter.
    peft: bool = False
    # The tasks (hftl/tasks/ names) it can train; None: every task. Checked once the labels are read, before the model loads.
    tasks: tuple[str, ...] | None = None
    why_not: str = ""  # what a refused task is told

    def check_task(self, task) -> None:
        if self.tasks is not None and task.name not in self.tasks:
            raise ConfigError(f"adapt.mode={self.name} {self.why_not}, which {task.name} labels do not define; "
                              "use adapt.mode=head, lora or full (or lpft).")

    @property
    def staged(self) -> bool:
        """It runs stages of its own (`fit`) instead of the one training loop."""
        return self.fit is not None


@dataclass
class Context:
    """What hooks and staged modes may need besides the model."""
    cfg: Config
    head: list[str]  # module names of the task head
    encoded: Any  # DatasetDict: train/validation[/test/target] model inputs with 'labels'
    collator: Any
    accelerator: Any
    target: Any = None  # data.target's rows as model inputs (unlabelled), or None
    task: Any = None  # what the labels are (hftl/tasks/): the loss, what a prediction is, the metrics


MODES: dict[str, Mode] = {}
# The options' hooks run in this order, after the mode's: layer-wise rates first (the first hook that lays out the
# optimizer's groups wins), then the terms added to the loss, reweighting last (it swaps the task's loss for the
# weighted one and keeps what the others added). A new option file adds its name here.
OPTION_ORDER = ("layer_lr_decay", "l2sp", "align", "reweight")
OPTIONS: dict[str, Callable[[nn.Module, Context], Any]] = {}


def register_mode(name: str, apply, export=lambda model: model, hooks=None, fit=None, frozen_features: bool = False,
                  frozen_backbone: bool = False, peft: bool = False, tasks: tuple[str, ...] | None = None, why_not: str = "") -> Mode:
    """A mode's name and help are declared in hftl/modes.py (read without torch by `hftl modes`)."""
    if name not in HELP:
        raise KeyError(f"adaptation mode '{name}' has no entry in hftl/modes.py HELP; add its one-line help there.")
    if name in MODES:  # two files claiming one name: whichever imported last would silently win
        raise ValueError(f"hftl bug: adaptation mode '{name}' is registered twice")
    MODES[name] = Mode(name, apply, export, HELP[name], hooks, fit, frozen_features or frozen_backbone, frozen_backbone, peft, tasks, why_not)
    return MODES[name]


def register_option(name: str, build: Callable[[nn.Module, Context], Any]) -> None:
    """`build(model, ctx)` returns a `Hook` for hftl.train.fit when its config key is on, else None."""
    if name in OPTIONS or name not in OPTION_ORDER:
        raise ValueError(f"hftl bug: option '{name}' is registered twice or is missing from OPTION_ORDER")
    OPTIONS[name] = build


def build_hooks(model: nn.Module, mode: Mode, ctx: Context) -> list[Hook]:
    hooks = list(mode.hooks(model, ctx)) if mode.hooks else []
    return hooks + [h for name in OPTION_ORDER if name in OPTIONS and (h := OPTIONS[name](model, ctx)) is not None]


def get_mode(name: str) -> Mode:
    if name not in MODES:
        raise ConfigError(f"adapt.mode='{name}' is unknown; choose one of {', '.join(sorted(MODES))} (`hftl modes` says what each trains).")
    return MODES[name]


def head_modules(model: nn.Module, missing_keys) -> list[str]:
    """Module names of the task head: whatever the checkpoint did not provide, plus known head layers."""
    names = {k.rsplit(".", 1)[0] for k in missing_keys if "." in k}
    names |= {n for n, _ in model.named_children() if n in HEAD_NAMES}
    # Keep outermost modules only ('classifier' covers 'classifier.dense').
    return sorted(n for n in names if not any(n.startswith(o + ".") for o in names if o != n))


def freeze_feature_encoder(model: nn.Module) -> None:
    """Speech models: keep the convolutional waveform encoder (wav2vec2/HuBERT `feature_extractor`) as pretrained."""
    if not hasattr(model, "freeze_feature_encoder"):  # a peft model forwards the attribute to the model it wraps
        raise ConfigError(f"adapt.freeze_feature_encoder=true, but {type(model).__name__} has no waveform feature encoder "
                          "(speech models such as wav2vec2 and HuBERT do); set adapt.freeze_feature_encoder=false.")
    model.freeze_feature_encoder()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def set_trainable(model: nn.Module, module_names: list[str]) -> None:
    """Freeze everything, then unfreeze the named modules."""
    model.requires_grad_(False)
    for name in module_names:
        model.get_submodule(name).requires_grad_(True)


from . import adapters, align, contrastive, full, gradual, head, l2sp, layers, lora, lpft, partial, reweight  # noqa: E402,F401  (each registers itself)
