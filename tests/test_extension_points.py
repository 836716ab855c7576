"""The typed extension points: modes say what they are, hooks have one interface and an explicit order."""
from __future__ import annotations

import re

import pytest
from torch import nn

from conftest import REPO_ROOT
from hftl import adapt
from hftl.hooks import Hook


def test_modes_declare_what_they_are():
    modes = adapt.MODES
    assert [m for m in modes if modes[m].frozen_backbone] == ["head"]
    assert {m for m in modes if modes[m].peft} == {"lora", "ia3", "adalora", "loha", "lokr"}
    assert {m for m in modes if modes[m].staged} == {"lpft", "contrastive"}
    # a head fitted on frozen features somewhere: adapt.pooling=auto reads the checkpoint's own pooling, the cache may serve it
    assert {m for m in modes if modes[m].frozen_features} == {"head", "lpft", "contrastive"}


def test_a_mode_or_an_option_registered_twice_is_refused():
    with pytest.raises(ValueError, match="'full' is registered twice"):
        adapt.register_mode("full", lambda model, cfg, head: model)
    assert adapt.MODES["full"].help.startswith("Train every parameter")
    with pytest.raises(ValueError, match="'l2sp' is registered twice"):
        adapt.register_option("l2sp", lambda model, ctx: None)
    with pytest.raises(ValueError, match="'mine' is registered twice or is missing from OPTION_ORDER"):
        adapt.register_option("mine", lambda model, ctx: None)


def test_hooks_run_in_the_declared_order(make_cfg, tmp_path):
    """The mode's hooks first, then the options in OPTION_ORDER, whatever order their files were imported in."""
    cfg = make_cfg(tmp_path, adapt__mode="gradual", adapt__layer_lr_decay=0.5, adapt__l2sp=0.01)
    model = nn.Module()
    built = []
    mode = adapt.Mode("probe", lambda m, c, h: m, lambda m: m, "", hooks=lambda m, ctx: [Hook()])
    original = dict(adapt.OPTIONS)
    try:
        for name in reversed(adapt.OPTION_ORDER):  # registered backwards
            adapt.OPTIONS.pop(name)
        for name in reversed(adapt.OPTION_ORDER):
            adapt.OPTIONS[name] = lambda m, ctx, name=name: built.append(name) or type(name, (Hook,), {})()
        hooks = adapt.build_hooks(model, mode, adapt.Context(cfg, [], None, None, None))
    finally:
        adapt.OPTIONS.clear()
        adapt.OPTIONS.update(original)
    assert built == list(adapt.OPTION_ORDER)
    assert [type(h).__name__ for h in hooks] == ["Hook", *adapt.OPTION_ORDER]
    assert all(isinstance(h, Hook) for h in hooks)


def test_no_side_tables_of_mode_names_and_no_probing_of_hooks():
    sources = {p.relative_to(REPO_ROOT): p.read_text() for p in (REPO_ROOT / "hftl").rglob("*.py")}
    for path, text in sources.items():
        assert not re.search(r"\b(FROZEN|CACHING|PEFT)_MODES\b", text), path
        assert not re.search(r"hasattr\(h, ", text), path
