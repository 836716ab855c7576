"""train.report_to: Accelerate's trackers get every logged scalar and the resolved config; a missing one is refused."""
from __future__ import annotations

import pytest

from hftl import cli
from hftl.config import all_keys


def _hparams(run_dir) -> dict:
    """The hyperparameters TensorBoard's hparams plugin holds for a run (SummaryWriter.add_hparams writes them to a
    sub-folder of the run)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    for folder in [p for p in run_dir.iterdir() if p.is_dir()]:
        events = EventAccumulator(str(folder))
        events.Reload()
        try:
            content = events.PluginTagToContent("hparams")
        except KeyError:  # Accelerate's hparams.yml folder: no events
            continue
        if "_hparams_/session_start_info" in content:
            info = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
            return {k: getattr(v, v.WhichOneof("kind")) for k, v in info.hparams.items()}
    return {}


def test_tensorboard_gets_the_scalars_and_the_config_beside_output_dir(make_cfg, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from hftl.recipe import train as main

    cfg = make_cfg(tmp_path, extra={"train.report_to": "[tensorboard]", "train.log_every": 1, "train.epochs": 2,
                                    "output.verify_reload": 0})
    main(cfg)
    # Default place: runs/<tracker_project>/<output.dir's name>-<start time>, beside output.dir, not inside it.
    (run_dir,) = (tmp_path / "runs" / "hftl").glob("out-*")
    assert not [p for p in (tmp_path / "out").rglob("*") if "tfevents" in p.name]
    events = EventAccumulator(str(run_dir))
    events.Reload()
    scalars = events.Tags()["scalars"]
    steps = int(cfg.train.epochs) * 64 // cfg.train.batch_size
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, steps + 1))
    assert {"train/lr", "eval/accuracy", "eval/loss", "eval/f1", "validation/accuracy"} <= set(scalars)
    assert [e.step for e in events.Scalars("eval/accuracy")] == [steps // 2, steps]
    hparams = _hparams(run_dir)
    assert hparams["train.learning_rate"] == pytest.approx(0.005)
    assert hparams["train.report_to"] == '["tensorboard"]'  # a list goes as its JSON text
    assert hparams["output.dir"] == cfg.output.dir and hparams["train.max_steps"] == "null"
    assert set(hparams) == set(all_keys())  # the whole resolved config


def test_wandb_offline_and_mlflow_file_store(make_cfg, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from hftl.recipe import train as main

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 keeps the file store behind this switch
    cfg = make_cfg(tmp_path, extra={"train.report_to": "[wandb, mlflow]", "train.log_every": 1, "train.epochs": 1,
                                    "train.tracker_project": "toy", "train.run_name": "first", "train.logging_dir": str(tmp_path / "logs"),
                                    "output.verify_reload": 0})
    main(cfg)
    # W&B's offline run (what `wandb sync` uploads): its record log holds the run's name, config keys and metrics.
    (record_log,) = (tmp_path / "logs" / "wandb").glob("offline-run-*/run-*.wandb")
    records = record_log.read_bytes()
    for text in (b"first", b"toy", b"train.learning_rate", b"data.max_length", b"train/loss", b"eval/accuracy", b"validation/accuracy"):
        assert text in records, text

    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("toy").experiment_id])
    assert run.info.run_name == "first"
    assert float(run.data.params["train.learning_rate"]) == pytest.approx(0.005)
    assert {"train/loss", "eval/accuracy", "validation/accuracy"} <= set(run.data.metrics)
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 64 // cfg.train.batch_size


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb", "mlflow", "trackio"])
def test_a_tracker_not_installed_is_refused_before_training(tracker, tiny_bert, toy_data, tmp_path, monkeypatch, capsys):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, f"is_{tracker}_available", lambda: False)
    out = tmp_path / "out"
    code = cli.main(["train", f"model.name_or_path={tiny_bert}", f"data.train_file={toy_data['train']}",
                     f"data.validation_file={toy_data['validation']}", f"output.dir={out}", f"train.report_to=[{tracker}]"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"pip install 'hftl[{tracker}]'" in err
    assert not out.exists()


def test_an_unknown_tracker_is_refused_at_config_load():
    from hftl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="tensorboard, wandb, mlflow, trackio"):
        load_config(None, ["train.report_to=[tensorbord]"])


def test_lpft_stages_are_two_runs_each_started_once(make_cfg, tmp_path):
    """lpft fits twice on one accelerator: the probe and the fine-tuning are runs of their own, and the first run's
    tracker is not started (and fed) again by the second."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from hftl.recipe import train as main

    # The probe trained by AdamW (a solved probe runs no loop of its own, so it logs no run).
    main(make_cfg(tmp_path, extra={"adapt.mode": "lpft", "adapt.solve_head": "false", "adapt.lp_epochs": 1, "train.epochs": 1, "train.log_every": 1,
                                   "train.report_to": "[tensorboard]", "train.run_name": "lp", "output.verify_reload": 0}))
    runs = tmp_path / "runs" / "hftl"
    assert sorted(p.name for p in runs.iterdir()) == ["lp", "lp-linear-probe"]
    for run in runs.iterdir():
        assert len([p for p in run.iterdir() if p.is_dir()]) == 2  # one hparams event folder + Accelerate's hparams.yml one
        events = EventAccumulator(str(run))
        events.Reload()
        assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 64 // 8 + 1))  # one epoch each, once
