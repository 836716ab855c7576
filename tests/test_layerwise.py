"""Layer-wise adaptation: partial fine-tuning, layer-wise learning-rate decay, gradual unfreezing, L2-SP,
the slanted triangular schedule. Training runs go through the whole text recipe on the tiny BERT (2 layers)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import read_json
from hftl import adapt, models, train
from hftl.adapt import gradual, layers
from hftl.config import AdaptConfig, ConfigError, ModelConfig, TrainConfig

LR = 0.005


def run_text(cfg):
    from hftl.recipe import train as main

    return main(cfg)


def saved_backbone(out: Path, checkpoint: Path) -> tuple[dict, dict]:
    """(checkpoint tensors, the saved model's tensors under the same names)."""
    original = load_file(str(checkpoint / "model.safetensors"))
    saved = load_file(str(out / "model.safetensors"))
    return original, {k: saved["bert." + k] for k in original}


def distance(a: dict, b: dict) -> float:
    return sum(float((a[k].float() - b[k].float()).pow(2).sum()) for k in a)


# ---------------------------------------------------------------- the layer stack and depths


def tiny_models():
    from transformers import (BertConfig, BertForSequenceClassification, DistilBertConfig, DistilBertForSequenceClassification,
                              ViTConfig, ViTForImageClassification, Wav2Vec2Config, Wav2Vec2ForSequenceClassification)

    speech = dict(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32, conv_dim=(16, 16, 16),
                  conv_kernel=(10, 3, 3), conv_stride=(5, 4, 4), num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4,
                  classifier_proj_size=8)
    return {
        # (model, stack name, a parameter at each depth 0, 1, L, L + 1)
        "bert": (BertForSequenceClassification(BertConfig(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32)),
                 "bert.encoder.layer", ["bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.output.dense.weight",
                                        "bert.encoder.layer.2.output.dense.weight", "bert.pooler.dense.weight"]),
        "vit": (ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=3,
                                                    num_attention_heads=2, intermediate_size=32)),
                "vit.layers", ["vit.embeddings.cls_token", "vit.layers.0.mlp.fc1.weight", "vit.layers.2.mlp.fc1.weight", "vit.layernorm.weight"]),
        "distilbert": (DistilBertForSequenceClassification(DistilBertConfig(dim=16, n_layers=3, n_heads=2, hidden_dim=32)),
                       "distilbert.transformer.layer", ["distilbert.embeddings.word_embeddings.weight",
                                                        "distilbert.transformer.layer.0.ffn.lin1.weight",
                                                        "distilbert.transformer.layer.2.ffn.lin1.weight", "pre_classifier.weight"]),
        # post-norm wav2vec2: the encoder's layer_norm runs before the stack
        "wav2vec2": (Wav2Vec2ForSequenceClassification(Wav2Vec2Config(**speech)), "wav2vec2.encoder.layers",
                     ["wav2vec2.feature_extractor.conv_layers.0.conv.weight", "wav2vec2.encoder.layers.0.feed_forward.output_dense.weight",
                      "wav2vec2.encoder.layers.2.feed_forward.output_dense.weight", "projector.weight"]),
        # pre-norm ("stable") wav2vec2: the same layer_norm, registered before the stack, runs after it
        "wav2vec2-stable": (Wav2Vec2ForSequenceClassification(Wav2Vec2Config(do_stable_layer_norm=True, feat_extract_norm="layer", **speech)),
                            "wav2vec2.encoder.layers", ["wav2vec2.encoder.pos_conv_embed.conv.bias",
                                                        "wav2vec2.encoder.layers.0.feed_forward.output_dense.weight",
                                                        "wav2vec2.encoder.layers.2.feed_forward.output_dense.weight",
                                                        "wav2vec2.encoder.layer_norm.weight"]),
    }


def test_layer_stack_and_depths_per_architecture():
    for kind, (model, stack_name, at_depth) in tiny_models().items():
        name, stack = layers.layer_stack(model)
        assert name == stack_name, kind
        depth, n_layers = layers.depths(model)
        assert n_layers == 3 and len(stack) == 3
        params = dict(model.named_parameters())
        assert [depth[params[n]] for n in at_depth] == [0, 1, 3, 4], kind
        assert depth[params["classifier.weight"]] == 4
        assert set(depth) == set(model.parameters())  # every parameter has a depth


def test_depths_through_peft_wrapper():
    model, _, at_depth = tiny_models()["bert"]
    wrapped = adapt.get_mode("lora").apply(model, AdaptConfig(), ["classifier"])  # LoRA on query/value
    depth, n_layers = layers.depths(wrapped)
    assert n_layers == 3
    named = dict(wrapped.named_parameters())
    assert [depth[named["base_model.model." + n]] for n in at_depth] == [0, 1, 3, 4]
    lora_a = [n for n in named if ".layer.1." in n and "lora_A" in n]
    assert lora_a and all(depth[named[n]] == 2 for n in lora_a)
    assert depth[named["base_model.model.classifier.modules_to_save.default.weight"]] == 4


def test_no_layer_stack_is_a_config_error():
    with pytest.raises(ConfigError, match=r"Sequential has no encoder layer stack.*adapt.mode=partial"):
        layers.depths(nn.Sequential(nn.Linear(2, 2)))


# ---------------------------------------------------------------- partial


def test_partial_trains_only_top_layers_and_head(make_cfg, tiny_bert, tmp_path):
    cfg = make_cfg(tmp_path, extra={"adapt.mode": "partial", "adapt.top_layers": 1, "train.epochs": 2})
    run_text(cfg)
    original, saved = saved_backbone(Path(cfg.output.dir), tiny_bert)
    changed = {k for k in original if not torch.equal(original[k], saved[k])}
    top = {k for k in original if k.startswith(("encoder.layer.1.", "pooler."))}
    assert changed and changed <= top  # everything below the top layer: bit for bit the checkpoint
    assert any(k.startswith("encoder.layer.1.attention.") for k in changed)
    assert "pooler.dense.weight" in changed
    info = read_json(Path(cfg.output.dir) / "results.json")
    assert info["trainable_params"] == sum(original[k].numel() for k in top) + 32 * 2 + 2  # + classifier


# ---------------------------------------------------------------- layer-wise learning-rate decay


def build(make_cfg, tmp_path, mode: str, **adapt_keys):
    """(model, hooks, cfg) as run() builds them, without training."""
    from transformers import AutoModelForSequenceClassification

    cfg = make_cfg(tmp_path, extra={"adapt.mode": mode, **{f"adapt.{k}": v for k, v in adapt_keys.items()}})
    model, new_keys = models.load_classifier(AutoModelForSequenceClassification, cfg.model.name_or_path, ["a", "b"], ModelConfig())
    head = adapt.head_modules(model, new_keys)
    mode_ = adapt.get_mode(mode)
    model = mode_.apply(model, cfg.adapt, head)
    ctx = adapt.Context(cfg, head, {"train": range(64)}, None, None)
    return model, adapt.build_hooks(model, mode_, ctx), cfg


def optimizer_rates(model, cfg, hooks) -> dict[str, tuple[float, float]]:
    """{parameter name: (lr, weight_decay)} in the optimizer fit builds."""
    optimizer = train._optimizer(model, cfg.train, hooks)
    by_param = {p: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(by_param)  # each parameter once
    return {n: by_param[p] for n, p in model.named_parameters() if p in by_param}


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_layer_lr_decay_rates(make_cfg, tmp_path, mode):
    model, hooks, cfg = build(make_cfg, tmp_path, mode, layer_lr_decay=0.5)
    rates = optimizer_rates(model, cfg, hooks)
    assert set(rates) == {n for n, p in model.named_parameters() if p.requires_grad}
    expected_depth = {"embeddings.": 0, "encoder.layer.0.": 1, "encoder.layer.1.": 2, "pooler.": 3, "classifier.": 3}
    seen = set()
    for name, (lr, wd) in rates.items():
        (depth,) = [d for part, d in expected_depth.items() if part in name]
        assert lr == LR * 0.5 ** (3 - depth), name  # L = 2: head at train.learning_rate, embeddings at lr / 8
        assert wd == (0.0 if name.endswith("bias") or "LayerNorm" in name else cfg.train.weight_decay), name
        seen.add(depth)
    assert seen == ({0, 1, 2, 3} if mode == "full" else {1, 2, 3})  # lora: adapters in both layers, no embeddings
    # fit logs the first group's rate: the head's, i.e. train.learning_rate's schedule
    assert train._optimizer(model, cfg.train, hooks).param_groups[0]["lr"] == LR


@pytest.mark.parametrize("mode, keys, message", [
    ("head", {"layer_lr_decay": 0.8}, r"adapt.layer_lr_decay=0.8 does nothing with adapt.mode=head"),
    ("head", {"l2sp": 0.1}, r"adapt.l2sp=0.1 does nothing with adapt.mode=head"),
    ("lora", {"l2sp": 0.1}, r"adapt.l2sp=0.1 does nothing with adapt.mode=lora"),
    ("partial", {"top_layers": 3}, r"adapt.top_layers=3: BertForSequenceClassification has 2 encoder layers; choose 1 to 2"),
])
def test_config_errors(make_cfg, tmp_path, mode, keys, message):
    # (Values no mode can use, such as adapt.layer_lr_decay=1.5 or adapt.top_layers=0, are refused when the config is
    # read: tests/test_bad_inputs.py.)
    with pytest.raises(ConfigError, match=message):
        build(make_cfg, tmp_path, mode, **keys)


def test_config_error_through_the_recipe(make_cfg, tmp_path):
    cfg = make_cfg(tmp_path, extra={"adapt.mode": "partial", "adapt.top_layers": 5})
    with pytest.raises(ConfigError, match="adapt.top_layers=5"):
        run_text(cfg)
    assert not Path(cfg.output.dir).exists()


# ---------------------------------------------------------------- gradual unfreezing


def test_gradual_unfreezes_top_down_on_schedule(make_cfg, tiny_bert, tmp_path, capsys):
    # 64 rows / batch 8 = 8 steps in the one epoch; a stage every 1/4 epoch = every 2 steps, one layer at a time:
    # steps 0-1 head + pooler, 2-3 + layer 1, 4-5 + layer 0, 6-7 + embeddings.
    cfg = make_cfg(tmp_path, extra={"adapt.mode": "gradual", "adapt.unfreeze_every": 0.25, "adapt.top_layers": 1,
                                    "adapt.layer_lr_decay": 0.5, "train.epochs": 1, "train.scheduler": "slanted_triangular"})
    watched = {"embeddings.word_embeddings.weight": 3, "encoder.layer.0.attention.self.query.weight": 2,
               "encoder.layer.1.attention.self.query.weight": 1, "pooler.dense.weight": 0}  # name: its stage
    seen, optimizers = {}, []
    original_on_step, original_optimizer = gradual.GradualUnfreezing.on_step, train._optimizer

    def on_step(self, model, step, epoch):  # record the weights the step starts from, and what trains in it
        original_on_step(self, model, step, epoch)
        params = dict(model.named_parameters())
        seen[step] = {n: (params["bert." + n].detach().cpu().clone(), params["bert." + n].requires_grad) for n in watched}

    def optimizer(model, t, hooks=()):
        optimizers.append((original_optimizer(model, t, hooks), dict(model.named_parameters())))
        return optimizers[-1][0]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gradual.GradualUnfreezing, "on_step", on_step)
        mp.setattr(train, "_optimizer", optimizer)
        run_text(cfg)
    assert sorted(seen) == list(range(8))
    checkpoint = load_file(str(tiny_bert / "model.safetensors"))
    for name, stage in watched.items():
        start = 2 * stage  # the first step this parameter trains in
        assert [seen[s][name][1] for s in range(8)] == [s >= start for s in range(8)], name
        if name in checkpoint:  # frozen until its stage: bit for bit the checkpoint; then it moves
            assert all(torch.equal(seen[s][name][0], checkpoint[name]) for s in range(start + 1)), name
        assert not torch.equal(seen[start][name][0], seen[start + 1][name][0]), name
    _, saved = saved_backbone(Path(cfg.output.dir), tiny_bert)
    assert not torch.equal(saved["embeddings.word_embeddings.weight"], checkpoint["embeddings.word_embeddings.weight"])
    # The optimizer held every parameter from the start, each depth at its decayed rate.
    (opt, params), = optimizers
    held = {p: g["initial_lr"] for g in opt.param_groups for p in g["params"]}
    assert set(held) == set(params.values())
    assert held[params["bert.embeddings.word_embeddings.weight"]] == LR * 0.5 ** 3
    assert held[params["classifier.weight"]] == LR
    out = capsys.readouterr().out
    assert "stage 1: training encoder layers 2-2 of 2 and above" in out
    assert "stage 3: training everything" in out


def test_gradual_stage_from_step_after_resume():
    """The stage depends only on the step, so a resumed run freezes the same layers."""
    from types import SimpleNamespace

    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32))
    model = gradual.apply(model, AdaptConfig(mode="gradual"), ["classifier"])
    from hftl.config import Config

    cfg = Config()
    cfg.adapt.top_layers, cfg.adapt.unfreeze_every, cfg.train.batch_size = 2, 0.5, 10
    ctx = SimpleNamespace(cfg=cfg, encoded={"train": range(100)})  # 10 steps per epoch, a stage every 5
    hook = gradual.GradualUnfreezing(model, ctx)
    hook.setup(SimpleNamespace(num_processes=1, print=lambda *a: None), 40, 10)
    layer = lambda i: model.bert.encoder.layer[i].output.dense.weight.requires_grad  # noqa: E731
    hook.on_step(model, 12, 1)  # as a run resumed at step 12 does: stage 2, layers 3-4 (stage 1) and 1-2 (stage 2)
    assert [layer(i) for i in range(4)] == [True] * 4 and not model.bert.embeddings.word_embeddings.weight.requires_grad
    hook.on_step(model, 9, 0)
    assert [layer(i) for i in range(4)] == [False, False, True, True] and model.classifier.weight.requires_grad
    hook.on_step(model, 15, 1)
    assert model.bert.embeddings.word_embeddings.weight.requires_grad


# ---------------------------------------------------------------- slanted triangular


def test_slanted_triangular_schedule():
    p = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([p], lr=1.0)
    scheduler = train.make_scheduler(optimizer, TrainConfig(scheduler="slanted_triangular", warmup_ratio=0.1), 100)
    rates = []
    for _ in range(101):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step(), scheduler.step()
    peak = rates.index(max(rates))
    assert peak == 10 and rates[peak] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(rates[:peak], rates[1:peak + 1]))  # rises
    assert all(a > b for a, b in zip(rates[peak:100], rates[peak + 1:101]))  # falls
    assert rates[0] == pytest.approx(1 / 32) and rates[100] == pytest.approx(1 / 32)


# ---------------------------------------------------------------- L2-SP


def test_l2sp_keeps_weights_near_pretrained(make_cfg, tiny_bert, tmp_path):
    distances = {}
    for l2sp in (0.0, 10.0):
        cfg = make_cfg(tmp_path / str(l2sp), extra={"adapt.mode": "full", "adapt.l2sp": l2sp, "train.epochs": 2})
        run_text(cfg)
        distances[l2sp] = distance(*saved_backbone(Path(cfg.output.dir), tiny_bert))
    assert 0 < distances[10.0] < distances[0.0] / 4, distances


def test_l2sp_penalty_counts_only_trainable_backbone(make_cfg, tmp_path):
    model, hooks, _ = build(make_cfg, tmp_path, "partial", l2sp=2.0, top_layers=1)
    (hook,) = hooks
    names = {p: n for n, p in model.named_parameters()}
    assert {names[p].split(".")[1] for p, _ in hook.pairs} == {"encoder", "pooler"}  # not the classifier, nothing frozen
    with torch.no_grad():
        model.bert.pooler.dense.bias.add_(1.0)  # 32 entries, each 1 from pretrained
    loss = hook.loss(model, {}, None, torch.tensor(0.5), 0.0)
    assert loss.item() == pytest.approx(0.5 + 2.0 * 32)


# ---------------------------------------------------------------- CLI


def test_cli_lists_new_modes(capsys):
    from hftl.cli import main

    assert main(["modes"]) == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert {"partial", "gradual"} <= listed
