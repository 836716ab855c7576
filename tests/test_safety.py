"""Safety: weights load as safetensors unless the config opts in to pickles, code shipped with a
checkpoint runs only with model.trust_remote_code=true, and no hftl source unpickles unsafely.

(The HF_TOKEN canary test is in test_hub.py, where a run pushes to the loopback Hub.)
"""
from __future__ import annotations

import ast
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from hftl.config import Config, ConfigError, ModelConfig
from hftl.models import load_classifier

REPO_ROOT = Path(__file__).resolve().parents[1]
LABELS = ["negative", "positive"]


class WritesCanary:
    """Unpickling this runs code: it creates the file at `path`."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').close()",)


def pickled_checkpoint(tiny_bert: Path, folder: Path, payload) -> Path:
    """An old-style checkpoint folder: the tiny BERT's config.json and `payload` saved as pytorch_model.bin."""
    folder.mkdir()
    shutil.copy(tiny_bert / "config.json", folder / "config.json")
    torch.save(payload, folder / "pytorch_model.bin")
    return folder


def test_pickle_that_runs_code_is_never_unpickled(tiny_bert, tmp_path):
    canary = tmp_path / "canary"
    folder = pickled_checkpoint(tiny_bert, tmp_path / "evil", {"bert.embeddings.word_embeddings.weight": WritesCanary(canary)})

    with pytest.raises(ConfigError, match=rf"its weights are a pickle \({folder / 'pytorch_model.bin'}\).* model\.allow_pickle=true"):
        load_classifier(AutoModelForSequenceClassification, str(folder), LABELS, ModelConfig(name_or_path=str(folder)))
    assert not canary.exists()
    # Opting in reads the pickle with torch.load(weights_only=True), which still refuses to run code: one line naming the file.
    with pytest.raises(ConfigError, match=rf"model\.allow_pickle=true, but torch\.load\(weights_only=True\) refuses "
                                          rf"'{re.escape(str(folder / 'pytorch_model.bin'))}' \(Unsupported global: GLOBAL exec\)"):
        load_classifier(AutoModelForSequenceClassification, str(folder), LABELS, ModelConfig(name_or_path=str(folder), allow_pickle=True))
    assert not canary.exists()
    # Control: the payload is live, plain unpickling runs it.
    torch.load(folder / "pytorch_model.bin", weights_only=False)
    assert canary.exists()


def test_pickled_weights_load_only_with_opt_in(tiny_bert, tmp_path):
    from transformers import BertModel

    weights = {f"bert.{k}": v for k, v in BertModel.from_pretrained(tiny_bert).state_dict().items()}
    folder = pickled_checkpoint(tiny_bert, tmp_path / "old", weights)
    assert Config().model.allow_pickle is False
    with pytest.raises(ConfigError, match=r"model\.allow_pickle=true"):
        load_classifier(AutoModelForSequenceClassification, str(folder), LABELS, ModelConfig(name_or_path=str(folder)))
    model, new_keys = load_classifier(AutoModelForSequenceClassification, str(folder), LABELS,
                                      ModelConfig(name_or_path=str(folder), allow_pickle=True))
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, weights["bert.embeddings.word_embeddings.weight"])
    assert new_keys == ["classifier.bias", "classifier.weight"]


def test_checkpoint_code_runs_only_with_trust_remote_code(tiny_bert, tmp_path):
    canary = tmp_path / "canary"
    folder = tmp_path / "custom"
    folder.mkdir()
    shutil.copy(tiny_bert / "model.safetensors", folder / "model.safetensors")
    config = json.loads((tiny_bert / "config.json").read_text())
    config.update(model_type="hftl-custom", auto_map={"AutoConfig": "custom.CustomConfig",
                                                      "AutoModelForSequenceClassification": "custom.CustomModel"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "custom.py").write_text(
        f"open({str(canary)!r}, 'w').close()\n"
        "from transformers import BertConfig, BertForSequenceClassification\n"
        "class CustomConfig(BertConfig):\n    model_type = 'hftl-custom'\n"
        "class CustomModel(BertForSequenceClassification):\n    config_class = CustomConfig\n")

    assert Config().model.trust_remote_code is False
    with pytest.raises(ConfigError, match=r"ships its own model code, which hftl runs only with model\.trust_remote_code=true"):
        load_classifier(AutoModelForSequenceClassification, str(folder), LABELS, ModelConfig(name_or_path=str(folder)))
    assert not canary.exists()
    with pytest.warns(UserWarning, match=rf"model\.trust_remote_code=true: code shipped with '{folder}' will run"):
        model, _ = load_classifier(AutoModelForSequenceClassification, str(folder), LABELS,
                                   ModelConfig(name_or_path=str(folder), trust_remote_code=True))
    assert canary.exists() and type(model).__name__ == "CustomModel"


def unsafe_loads(source: str) -> list[str]:
    """Calls that could unpickle untrusted data: torch.load without weights_only=True, pickle/dill loads,
    weights_only=False, use_safetensors=False."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        kwargs = {k.arg: ast.unparse(k.value) for k in node.keywords}
        if name.endswith("torch.load") and kwargs.get("weights_only") != "True":
            found.append(f"line {node.lineno}: {name} without weights_only=True")
        elif name.split(".")[-1] in ("load", "loads") and name.split(".")[0] in ("pickle", "dill", "cloudpickle", "joblib"):
            found.append(f"line {node.lineno}: {name}")
        elif kwargs.get("weights_only") == "False" or kwargs.get("use_safetensors") == "False":
            found.append(f"line {node.lineno}: {name} with {'weights_only' if 'weights_only' in kwargs else 'use_safetensors'}=False")
    return found


def test_sources_never_unpickle_unsafely():
    sample = "import torch, pickle\ntorch.load(p)\ntorch.load(p, weights_only=True)\npickle.loads(b)\nM.from_pretrained(p, use_safetensors=False)\n"
    assert unsafe_loads(sample) == ["line 2: torch.load without weights_only=True", "line 4: pickle.loads",
                                    "line 5: M.from_pretrained with use_safetensors=False"]
    sources = [p for d in ("hftl", "recipes", "scripts") for p in (REPO_ROOT / d).rglob("*.py")]
    assert len(sources) > 10
    assert {str(p.relative_to(REPO_ROOT)): unsafe_loads(p.read_text()) for p in sources if unsafe_loads(p.read_text())} == {}
