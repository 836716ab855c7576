"""Publishing: push, download what was pushed and re-check it, against a Hub on loopback.

The server (tests/hub_server.py) answers the HTTP endpoints huggingface_hub's client calls, so these
tests run hftl's real calls (HfApi.create_repo, upload_folder, snapshot_download) end to end. The
last test does the same against the real Hub and runs only when HF_TOKEN is set and the Hub answers.
"""
from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from huggingface_hub import constants

from hub_server import FakeHub
from hftl.config import ConfigError, HubConfig
from hftl.hub import HubError, prepare_repo, publish, push_checkpoint

INPUTS = ["great happy", "awful", "good nice fine", "sad ugly", "poor", "great"]


def point_client_at(monkeypatch, url: str) -> None:
    """What HF_ENDPOINT does at import time, for the client already imported in this process."""
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest turns it on for every other test


@pytest.fixture
def fake_hub(monkeypatch):
    token = f"hf_test{uuid.uuid4().hex}"
    with FakeHub(token=token) as hub:
        point_client_at(monkeypatch, hub.url)
        monkeypatch.setenv("HF_TOKEN", token)
        yield hub


@pytest.fixture(scope="module")
def model_folder(tiny_bert, tmp_path_factory) -> Path:
    """A pipeline-loadable classifier folder: the tiny BERT with a 2-label head and its tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = tmp_path_factory.mktemp("model")
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_bert, num_labels=2, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(folder)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    return folder


def local_predictions(folder: Path) -> list[str]:
    from transformers import pipeline

    return [r["label"] for r in pipeline("text-classification", model=str(folder), device=-1)(INPUTS)]


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_publish_pushes_to_branch_and_round_trips(fake_hub, model_folder):
    hub_cfg = HubConfig(push=True, model_id="hftl-tester/tiny", private=True, revision="experiment")
    url = publish(model_folder, hub_cfg, "text-classification", INPUTS, local_predictions(model_folder))

    repo = fake_hub.repos["hftl-tester/tiny"]
    assert repo["private"] is True
    assert url.endswith(repo["refs"]["experiment"])
    pushed = fake_hub.files("hftl-tester/tiny", "experiment")
    assert {k: v for k, v in pushed.items() if k != ".gitattributes"} == local_files(model_folder)
    assert set(fake_hub.files("hftl-tester/tiny", "main")) == {".gitattributes"}  # main untouched
    # The round trip downloaded that exact commit, with the token from HF_TOKEN.
    downloads = [r for r in fake_hub.requests if r["method"] == "GET" and "/resolve/" in r["path"]]
    assert {r["path"].split("/resolve/")[1].split("/")[0] for r in downloads} == {repo["refs"]["experiment"]}
    assert all(r["headers"]["authorization"] == f"Bearer {os.environ['HF_TOKEN']}" for r in downloads)


def test_round_trip_fails_when_download_differs(fake_hub, model_folder, tiny_bert):
    fake_hub.tamper["model.safetensors"] = (tiny_bert / "model.safetensors").read_bytes()
    with pytest.raises(HubError, match=r"round trip: 'model\.safetensors' downloaded from 'hftl-tester/tiny'"):
        publish(model_folder, HubConfig(push=True, model_id="hftl-tester/tiny"), "text-classification", [], [])


def test_round_trip_fails_when_predictions_differ(fake_hub, model_folder):
    flipped = [{"positive": "negative", "negative": "positive"}[p] for p in local_predictions(model_folder)]
    with pytest.raises(HubError, match=r"'hftl-tester/tiny' .* does not reproduce training's evaluation .* on 6 of 6"):
        publish(model_folder, HubConfig(push=True, model_id="hftl-tester/tiny"), "text-classification", INPUTS, flipped)


def test_publish_refuses_pickles(fake_hub, model_folder, tmp_path):
    folder = tmp_path / "with_pickle"
    folder.mkdir()
    (folder / "config.json").write_bytes((model_folder / "config.json").read_bytes())
    (folder / "pytorch_model.bin").write_bytes(b"not even looked at")
    with pytest.raises(HubError, match=r"pytorch_model\.bin' is a pickle; hftl publishes weights as safetensors only"):
        publish(folder, HubConfig(push=True, model_id="hftl-tester/tiny"), "text-classification", [], [])
    assert fake_hub.requests == []  # refused before any request


@pytest.mark.parametrize("hub_cfg, error, message", [
    (HubConfig(push=True), ConfigError, r"hub\.push=true needs hub\.model_id=namespace/name"),
    (HubConfig(push=True, model_id="tiny"), ConfigError, r"namespace/name .* got 'tiny'"),
    (HubConfig(push=True, model_id="a/b c"), ConfigError, r"hub\.model_id='a/b c' is not a valid Hub repo id"),
    (HubConfig(push=True, model_id="a/b", strategy="sometimes"), ConfigError, r"hub\.strategy='sometimes'; expected one of end, every_save, checkpoint"),
])
def test_config_errors_name_the_key(fake_hub, model_folder, hub_cfg, error, message):
    with pytest.raises(error, match=message):
        publish(model_folder, hub_cfg, "text-classification", [], [])
    assert fake_hub.requests == []


def test_preflight_errors_name_the_fix(fake_hub, model_folder, monkeypatch):
    cfg = HubConfig(push=True, model_id="hftl-tester/tiny", private=True)
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubError, match=r"needs a Hugging Face token with write access: set HF_TOKEN or run `hf auth login`"):
        publish(model_folder, cfg, "text-classification", [], [])
    wrong = f"hf_wrong{uuid.uuid4().hex}"
    monkeypatch.setenv("HF_TOKEN", wrong)
    with pytest.raises(HubError, match=r"creating the repo failed .* the Hub refused the token: set HF_TOKEN") as e:
        publish(model_folder, cfg, "text-classification", [], [])
    assert wrong not in str(e.value)
    monkeypatch.setenv("HF_TOKEN", fake_hub.token)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="HF_HUB_OFFLINE is set"):
        publish(model_folder, cfg, "text-classification", [], [])
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    publish(model_folder, HubConfig(push=True, model_id="hftl-tester/tiny", private=False), "text-classification", [], [])
    with pytest.raises(HubError, match=r"hub\.private=true but 'hftl-tester/tiny' already exists and is public"):
        publish(model_folder, cfg, "text-classification", [], [])


def test_push_checkpoint_follows_strategy(fake_hub, tmp_path):
    first, second = tmp_path / "step-10", tmp_path / "step-20"
    for folder, names in ((first, ["model.safetensors", "optimizer.bin"]), (second, ["model.safetensors"])):
        folder.mkdir()
        for name in names:
            (folder / name).write_bytes(f"{folder.name}/{name}".encode())
    for strategy in ("end", "every_save", "checkpoint"):
        cfg = HubConfig(push=True, model_id=f"hftl-tester/{strategy}", strategy=strategy)
        prepare_repo(cfg)
        urls = [push_checkpoint(first, cfg), push_checkpoint(second, cfg)]
        files = {k: v.decode() for k, v in fake_hub.files(cfg.model_id).items() if k != ".gitattributes"}
        if strategy == "end":
            assert urls == [None, None] and files == {}
        elif strategy == "every_save":
            assert files == {"checkpoints/step-10/model.safetensors": "step-10/model.safetensors",
                             "checkpoints/step-10/optimizer.bin": "step-10/optimizer.bin",
                             "checkpoints/step-20/model.safetensors": "step-20/model.safetensors"}
        else:  # only the latest checkpoint, with the files of the previous one removed
            assert files == {"last-checkpoint/model.safetensors": "step-20/model.safetensors"}


# ---------------------------------------------------------------- a real run through the CLI


@pytest.fixture(scope="module")
def pushed_run(tiny_bert, toy_data, tmp_path_factory):
    """`hftl train ... hub.push=true` in a subprocess with HF_TOKEN=<canary> and HF_ENDPOINT=<fake Hub>.

    32 optimizer steps, a checkpoint every 12 and at the last step (steps 12, 24 and 32), each pushed to last-checkpoint/."""
    tmp = tmp_path_factory.mktemp("pushed_run")
    canary = f"hf_canary{uuid.uuid4().hex}"
    config = tmp / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(tiny_bert)},
        "data": {"train_file": str(toy_data["train"]), "validation_file": str(toy_data["validation"]), "max_length": 16},
        "train": {"epochs": 4, "batch_size": 8, "learning_rate": 0.005, "metrics": ["accuracy"], "save_every": 12,
                  "min_steps": None},
        "output": {"dir": str(tmp / "out")},
        "hub": {"push": True, "model_id": "hftl-tester/toy-sentiment", "private": True, "strategy": "checkpoint"},
    }))
    with FakeHub(token=canary) as hub:
        env = {**os.environ, "HF_TOKEN": canary, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp / "hf_home"), "HF_HUB_OFFLINE": "0"}
        proc = subprocess.run([sys.executable, "-m", "hftl", "train", str(config)], cwd=tmp, env=env,
                              capture_output=True, text=True, timeout=300)
    return {"dir": tmp, "out": tmp / "out", "canary": canary, "hub": hub, "proc": proc}


def test_train_push_round_trip_and_token_canary(pushed_run):
    proc, hub, out, canary = pushed_run["proc"], pushed_run["hub"], pushed_run["out"], pushed_run["canary"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Pushed " in proc.stdout and "round trip: files identical, 16 validation predictions identical" in proc.stdout
    pushed = hub.files("hftl-tester/toy-sentiment")
    model_files = {k: v for k, v in pushed.items() if k != ".gitattributes" and not k.startswith("last-checkpoint/")}
    assert model_files == local_files(out)
    assert hub.repos["hftl-tester/toy-sentiment"]["private"] is True
    # hub.strategy=checkpoint: the newest checkpoint is in last-checkpoint/, nothing of the older one is left.
    checkpoint = {k.removeprefix("last-checkpoint/"): v for k, v in pushed.items() if k.startswith("last-checkpoint/")}
    assert checkpoint == local_files(Path(f"{out}.checkpoints") / "step-32")
    # The token was used for every write ...
    writes = [r for r in hub.requests if r["method"] == "POST"]
    assert writes and all(r["headers"]["authorization"] == f"Bearer {canary}" for r in writes)
    # ... and is nowhere in what the run wrote or printed: output folder, caches, logs, pushed files.
    written = {p: p.read_bytes() for p in pushed_run["dir"].rglob("*") if p.is_file()}
    assert len(written) > 10
    leaks = [str(p) for p, data in written.items() if canary.encode() in data]
    leaks += [f"pushed:{k}" for k, data in pushed.items() if canary.encode() in data]
    leaks += [name for name in ("stdout", "stderr") if canary in getattr(proc, name)]
    assert leaks == []
    # The card on the Hub names the repo and no local path.
    card = pushed["README.md"].decode()
    assert "hftl-tester/toy-sentiment" in card and str(pushed_run["dir"]) not in card and "tiny_bert" not in card


def test_hftl_push_publishes_an_existing_folder(pushed_run, fake_hub, capsys):
    from hftl.cli import main

    assert main(["push", str(pushed_run["out"]), "hub.model_id=hftl-tester/again", "hub.revision=v1"]) == 0
    assert "round trip: files identical, 16 validation predictions identical" in capsys.readouterr().out
    pushed = fake_hub.files("hftl-tester/again", "v1")
    assert {k: v for k, v in pushed.items() if k != ".gitattributes"} == local_files(pushed_run["out"])


def test_hftl_push_errors_name_the_fix(pushed_run, fake_hub, tmp_path, capsys):
    from hftl.cli import main

    assert main(["push", str(tmp_path)]) == 2
    assert f"'{tmp_path / 'hftl_config.yaml'}' does not exist; `hftl push` publishes a folder written by `hftl train`" in capsys.readouterr().err
    assert main(["push", str(pushed_run["out"]), "hub.model_id=hftl-tester/again", f"data.validation_file={tmp_path / 'gone.csv'}"]) == 2
    assert "pass output.verify_reload=0 to compare files only" in capsys.readouterr().err
    assert "hftl-tester/again" not in fake_hub.repos


# ---------------------------------------------------------------- the real Hub


def _real_hub_user() -> str | None:
    """The account HF_TOKEN belongs to, when a token is set and the real Hub answers; else None."""
    if not os.environ.get("HF_TOKEN") or os.environ.get("HFTL_SKIP_REAL_HUB"):
        return None
    from huggingface_hub import HfApi

    try:
        return HfApi(endpoint="https://huggingface.co").whoami()["name"]
    except Exception:  # no network, offline mode, or a refused token: nothing to test against
        return None


def test_real_hub_round_trip(model_folder, monkeypatch):
    point_client_at(monkeypatch, "https://huggingface.co")
    user = _real_hub_user()
    if user is None:
        pytest.skip("needs HF_TOKEN with write access and a network path to https://huggingface.co")
    from huggingface_hub import HfApi

    cfg = HubConfig(push=True, model_id=f"{user}/hftl-test-{uuid.uuid4().hex[:8]}", private=True)
    try:
        url = publish(model_folder, cfg, "text-classification", INPUTS, local_predictions(model_folder))
        assert cfg.model_id in url
        assert HfApi().model_info(cfg.model_id).private is True
    finally:
        HfApi().delete_repo(cfg.model_id, missing_ok=True)


def test_reload_check_allows_only_near_ties_under_mixed_precision(model_folder):
    """A bf16 evaluation can flip a row whose two labels are nearly tied; any wider gap is still an error."""
    from transformers import pipeline

    from hftl.hub import OutputError, verify_reload

    clf = pipeline("text-classification", model=str(model_folder), device=-1)
    ranked = clf(INPUTS, top_k=2)
    gaps = [r[0]["score"] - r[1]["score"] for r in ranked]
    i = min(range(len(INPUTS)), key=gaps.__getitem__)  # the closest call: say evaluation chose its runner-up
    expected = [r[0]["label"] for r in ranked]
    expected[i] = ranked[i][1]["label"]
    assert verify_reload(model_folder, "text-classification", INPUTS, expected, tie=gaps[i] + 1e-6) == len(INPUTS)
    for tie in (0.0, gaps[i] / 2):  # fp32 (exact), or a tolerance narrower than the gap
        with pytest.raises(OutputError, match=rf"on 1 of 6 validation rows.*row {i}, pipeline says"):
            verify_reload(model_folder, "text-classification", INPUTS, expected, tie=tie)
    wrong = [{"positive": "negative", "negative": "positive"}[p] for p in expected]
    with pytest.raises(OutputError, match="on [56] of 6 validation rows beyond near-ties"):  # swapped labels are no near-tie
        verify_reload(model_folder, "text-classification", INPUTS, wrong, tie=gaps[i] + 1e-6)
