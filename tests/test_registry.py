"""ssd.registry without a server: reference parsing and the errors a bad reference gets (the
registry round trips against a real server are in test_pretrain_finetune.py and
test_predict_evaluate.py)."""

from __future__ import annotations

import pytest

from ssd.registry import ModelReferenceError, is_model_uri, parse_registered, resolve_model


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
