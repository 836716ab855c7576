"""Unknown keys that transformers' Trainer users type are answered with hftl's key (and the value translated)."""
from __future__ import annotations

import pytest

from hftl import cli
from hftl.config import ConfigError, all_keys, load_config

TABLE = [
    # (what a Trainer user types, what the error must suggest)
    ("push_to_hub=true", "hub.push=true"),
    ("fp16=true", "train.mixed_precision=fp16"),
    ("bf16=true", "train.mixed_precision=bf16"),
    ("fp16=false", "train.mixed_precision=no"),
    ("save_total_limit=3", "train.keep_last=3"),
    ("num_train_epochs=3", "train.epochs=3"),
    ("per_device_train_batch_size=16", "train.batch_size=16"),
    ("per_device_eval_batch_size=64", "train.eval_batch_size=64"),
    ("lr_scheduler_type=cosine", "train.scheduler=cosine"),
    ("logging_steps=50", "train.log_every=50"),
    ("save_steps=500", "train.save_every=500"),
    ("resume_from_checkpoint=auto", "train.resume=auto"),
    ("metric_for_best_model=eval_f1", "train.metric_for_best=f1"),
    ("metric_for_best_model=accuracy", "train.metric_for_best=accuracy"),
    ("learning_rate=2e-5", "train.learning_rate=2e-5"),
    ("warmup_ratio=0.1", "train.warmup_ratio=0.1"),
    ("weight_decay=0.0", "train.weight_decay=0.0"),
    ("gradient_accumulation_steps=4", "train.gradient_accumulation_steps=4"),
    ("max_grad_norm=0.5", "train.max_grad_norm=0.5"),
    ("seed=7", "train.seed=7"),
    ("output_dir=outputs/x", "output.dir=outputs/x"),
    ("report_to=tensorboard", "train.report_to=[tensorboard]"),
    ("optim=adafactor", "train.optimizer=adafactor"),
    ("gradient_checkpointing=true", "train.gradient_checkpointing=true"),
    ("torch_compile=true", "train.compile=true"),
    # with a section in front, right or wrong
    ("train.num_train_epochs=3", "train.epochs=3"),
    ("hub.push_to_hub=true", "hub.push=true"),
    ("train.fp16=true", "train.mixed_precision=fp16"),
]


@pytest.mark.parametrize("typed, suggestion", TABLE)
def test_trainer_key_suggests_hftls(typed, suggestion):
    with pytest.raises(ConfigError) as e:
        load_config(None, [typed])
    msg = str(e.value)
    assert f"unknown config key '{typed.split('=')[0]}'" in msg
    assert suggestion in msg, msg
    key = suggestion.split("=")[0]
    assert key in all_keys()
    # The suggestion itself loads.
    load_config(None, [suggestion])


@pytest.mark.parametrize("option, suggestion", [
    ("--num_train_epochs=3", "train.epochs=3"),
    ("--per_device_train_batch_size=16", "train.batch_size=16"),
    ("--fp16", "train.mixed_precision=fp16"),  # a Trainer flag: true
    ("--push_to_hub", "hub.push=true"),
    ("--learning_rate=3e-5", "train.learning_rate=3e-5"),
])
def test_trainer_option_on_the_command_line_exits_2_with_hftls_key(option, suggestion, capsys):
    assert cli.main(["train", option]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hftl: error:") and len(err.strip().splitlines()) == 1
    assert f"'{option}'" in err and "key=value" in err and suggestion in err


def test_an_unknown_option_of_no_trainer_name_still_exits_2(capsys):
    assert cli.main(["train", "--no-such-thing"]) == 2
    assert "key=value" in capsys.readouterr().err


@pytest.mark.parametrize("key", ["hub.token", "token", "hub_token", "--hub_token"])
def test_token_keys_say_why_there_is_none(key, capsys):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{key.lstrip('-')}=hf_abc"])
    msg = str(e.value)
    assert "HF_TOKEN" in msg and "hf auth login" in msg and "never stores" in msg
    assert "hf_abc" not in msg  # the token is not echoed


def test_eval_prefixed_metric_is_refused_with_the_plain_name():
    with pytest.raises(ConfigError, match=r"train\.metric_for_best=f1"):
        load_config(None, ["train.metric_for_best=eval_f1"])
