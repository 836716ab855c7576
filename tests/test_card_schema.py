"""The model card's metadata against the Hub's model-card schema, offline: the keys and shapes that huggingface_hub
documents for a model card's YAML (ModelCardData, and `model-index` as eval_results_to_model_index writes it), and the
round trip through huggingface_hub's own loader, ModelCard.load, which refuses a malformed model-index."""
from __future__ import annotations

import yaml

from conftest import card_results

# ModelCardData's documented fields, as they appear in the YAML (eval_results + model_name become model-index).
HUB_KEYS = {"base_model", "datasets", "language", "library_name", "license", "license_name", "license_link", "metrics",
            "pipeline_tag", "tags", "model-index"}


def card_for(dataset_id, tmp_path):
    from hftl.cards import CardData, render

    data = CardData(model_name="toy-model", base_model="sentence-transformers/all-MiniLM-L6-v2", dataset_name="SST-2",
                    dataset_id=dataset_id, pipeline_tag="text-classification", mode="lora", mode_help="h",
                    labels=["negative", "positive"], trainable_params=1, total_params=2, hyperparameters={},
                    results={"validation": {"accuracy": 0.875, "f1": 0.5}, "test": {"accuracy": 0.75, "f1": 0.25}},
                    split_sizes={"train": 10, "validation": 8, "test": 4}, history=[], license="apache-2.0", language="en")
    path = tmp_path / "README.md"
    render(data, ["accuracy", "f1"]).save(path)
    return path


def metadata(path) -> dict:
    text = path.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def check_shapes(meta: dict) -> None:
    assert set(meta) <= HUB_KEYS, set(meta) - HUB_KEYS
    for key in ("license", "library_name", "pipeline_tag", "base_model"):
        assert key not in meta or isinstance(meta[key], str), key
    for key in ("tags", "datasets", "metrics"):
        assert key not in meta or (isinstance(meta[key], list) and all(isinstance(v, str) for v in meta[key])), key
    assert isinstance(meta.get("language", ""), (str, list))
    for entry in meta.get("model-index", []):
        assert isinstance(entry["name"], str) and entry["results"]
        for result in entry["results"]:
            assert isinstance(result["task"]["type"], str)
            assert {"type", "name"} <= set(result["dataset"])
            assert isinstance(result["dataset"]["type"], str) and " " not in result["dataset"]["type"]  # a Hub id
            for metric in result["metrics"]:
                assert isinstance(metric["type"], str) and isinstance(metric["value"], (int, float))


def test_a_hub_data_set_gets_a_model_index_that_huggingface_hub_reads_back(tmp_path):
    from huggingface_hub import ModelCard

    path = card_for("stanfordnlp/sst2", tmp_path)
    meta = metadata(path)
    check_shapes(meta)
    assert meta["datasets"] == ["stanfordnlp/sst2"] and meta["license"] == "apache-2.0" and meta["language"] == "en"
    results = meta["model-index"][0]["results"]
    assert {r["dataset"]["type"] for r in results} == {"stanfordnlp/sst2"} and {r["dataset"]["split"] for r in results} == {"validation", "test"}
    card = ModelCard.load(path)  # ignore_metadata_errors=False: a malformed model-index raises
    got = {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert got == {("validation", "accuracy"): 0.875, ("validation", "f1"): 0.5, ("test", "accuracy"): 0.75, ("test", "f1"): 0.25}
    assert card.data.eval_results[0].dataset_type == "stanfordnlp/sst2" and card.data.eval_results[0].dataset_name == "SST-2"


def test_local_data_get_no_model_index_and_the_table_holds_the_results(tmp_path):
    from huggingface_hub import ModelCard

    local = tmp_path / "my_data"
    local.mkdir()
    for dataset_id in (None, str(local)):  # local files, or data.name naming a folder on disk: no Hub id either way
        path = card_for(dataset_id, tmp_path)
        meta = metadata(path)
        check_shapes(meta)
        assert "model-index" not in meta and "datasets" not in meta
        card = ModelCard.load(path)
        assert card.data.eval_results is None and str(local) not in card.content
        assert card_results(card.content) == {"validation": {"accuracy": 0.875, "f1": 0.5}, "test": {"accuracy": 0.75, "f1": 0.25}}
        assert "adapted to **SST-2**" in card.content
