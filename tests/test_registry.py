"""ssd.registry: reference parsing and the errors a bad reference gets without a server; the
champion rule against a real one (more registry round trips in test_register.py,
test_pretrain_finetune.py and test_predict_evaluate.py)."""

from __future__ import annotations

import json

import pytest

from ssd.registry import (
    ModelReferenceError,
    apply_champion_rule,
    champion_score,
    current_champion,
    is_model_uri,
    parse_registered,
    resolve_model,
)


def test_registered_references_are_parsed():
    assert parse_registered("models:/ssd-voc@champion") == ("ssd-voc", None, "champion")
    assert parse_registered("models:/ssd-voc/3") == ("ssd-voc", "3", None)
    assert parse_registered("models:/m-0123abcd") is None  # a logged model id, not a registered name
    assert parse_registered("runs:/abc/model") is None and parse_registered("/tmp/ckpt") is None
    assert is_model_uri("models:/x/1") and is_model_uri("runs:/r/model") and not is_model_uri("ckpt/best")


def test_a_folder_without_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(ModelReferenceError, match="not a checkpoint folder"):
        resolve_model(str(tmp_path))


def test_an_unreachable_registry_is_named(free_port, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ModelReferenceError, match=f"models:/ssd-voc@champion: cannot (reach|look it up).*{uri}"):
        resolve_model("models:/ssd-voc@champion", uri)


def test_an_unreachable_registry_is_not_read_as_no_champion(free_port, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    client = mlflow.MlflowClient(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(mlflow.exceptions.MlflowException):  # None would promote any newcomer
        current_champion(client, "ssd-voc")


@pytest.fixture()
def synthetic(tmp_path):
    """Synthetic shards and two tiny checkpoints of their classes (seeds 0 and 1)."""
    import torch

    from ssd.checkpoint import save_checkpoint
    from ssd.config import load_config
    from ssd.data.convert import ensure_synthetic_shards
    from ssd.data.synthetic import CLASSES
    from ssd.models import build_model

    checkpoints = []
    for seed in (0, 1):
        cfg = load_config("tiny", ["model.num_classes=7"])
        torch.manual_seed(seed)
        checkpoints.append(save_checkpoint(tmp_path / f"ckpt{seed}", model=build_model(cfg), epoch=1, step=1,
                                           config=cfg, classes=list(CLASSES)))
    shards = ensure_synthetic_shards(tmp_path / "data", 8, 16, log=lambda _: None)
    val_hash = json.loads((shards / "val" / "dataset.json").read_text())["content_hash"]
    return checkpoints, str(shards / "val"), val_hash


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_a_champion_measured_on_other_data_is_evaluated_on_this_one(mlflow_server, synthetic):
    import mlflow

    from ssd.mlflow_model import log_ssd_model
    from ssd.scoring import evaluate_checkpoint

    (first, second), val, val_hash = synthetic
    client = mlflow.MlflowClient(mlflow_server)
    experiment = client.create_experiment("champion-rule")

    def register(path, tags):
        run = client.create_run(experiment)
        return log_ssd_model(run.info.run_id, mlflow_server, path, register_as="ssd-rule", torch_flavour=False,
                             version_tags=tags)["version"]

    v1 = register(first, {"mAP": "0.777", "val_data_hash": val_hash})
    champion = client.get_model_version("ssd-rule", v1)
    assert champion_score(client, champion, val, val_hash) == (0.777, "recorded on the same validation shards")
    score, how = champion_score(client, champion, val, "another-hash")
    assert how == "evaluated on the same validation shards now"
    assert score == pytest.approx(evaluate_checkpoint(first, val)["AP"]) and score != 0.777

    # the rule: the first version takes the alias; the next is compared with the champion as
    # evaluated on its validation shards (its recorded 0.777 is on other data)
    assert apply_champion_rule(client, "ssd-rule", v1, 0.777, val, val_hash).promoted
    v2 = register(second, {})
    result = apply_champion_rule(client, "ssd-rule", v2, score + 0.01, val, "another-hash")
    assert result.promoted and result.champion_score == pytest.approx(score)
    assert result.champion_score_source == "evaluated on the same validation shards now"
    assert client.get_model_version_by_alias("ssd-rule", "champion").version == v2
    # applied again to the champion itself (an interrupted attempt retried): the recorded decision
    assert apply_champion_rule(client, "ssd-rule", v2, 0.0, val, "another-hash") == result
    recorded = json.loads(client.get_model_version("ssd-rule", v2).tags["champion_comparison"])
    assert recorded == result.to_dict()
