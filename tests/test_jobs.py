"""ssd.distributed.submission: the working-dir upload checked with Ray's own packaging rules, and the
repository's ignore files keeping data and outputs out of `ray job submit --working-dir .`."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from ssd.distributed.submission import (
    UPLOAD_LIMIT,
    SubmitError,
    check_working_dir,
    job_target,
    upload_by_entry,
)

ROOT = Path(__file__).resolve().parents[1]


def _checkout_like(tmp_path: Path) -> Path:
    """A folder with this repository's ignore files and a script, like a checkout."""
    root = tmp_path / "checkout"
    (root / "pipelines").mkdir(parents=True)
    (root / "pipelines" / "train.py").write_text("print('train')\n")
    for name in (".gitignore", ".rayignore"):
        shutil.copy(ROOT / name, root / name)
    return root


def _random_file(path: Path, mib: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        out.writelines(os.urandom(2**20) for _ in range(mib))  # incompressible, like JPEGs in shards


def test_data_and_outputs_in_a_checkout_are_not_uploaded(tmp_path):
    root = _checkout_like(tmp_path)
    _random_file(root / "shards" / "voc" / "train" / "shard-000000.tar", 60)
    _random_file(root / "reports" / "priors" / "coverage.png", 1)
    _random_file(root / "runs" / "r" / "model.pt", 60)
    (root / "shards" / "voc" / "train" / "dataset.json").write_text("{}")
    included = upload_by_entry(root)
    assert set(included) == {"pipelines", ".gitignore", ".rayignore"}, included
    assert check_working_dir(root) < 2**20


def test_a_too_large_working_dir_is_refused_in_one_line_naming_it(tmp_path):
    root = _checkout_like(tmp_path)
    _random_file(root / "my_data" / "blob.bin", UPLOAD_LIMIT // 2**20 + 5)
    with pytest.raises(SubmitError) as refused:
        check_working_dir(root)
    message = str(refused.value)
    assert "\n" not in message and "over Ray's 100 MiB upload limit" in message
    assert "largest: my_data (105 MiB)" in message and ".rayignore" in message


def test_the_job_address_comes_from_make_up_or_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SSD_LOCAL_STATE", str(tmp_path / "nothing-running"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(SubmitError, match="no Ray head to submit to: start one with `make up`"):
        job_target()
    with pytest.raises(SubmitError, match="not a job-submission address"):
        job_target("127.0.0.1:6379")
    assert job_target("http://10.0.0.5:8265/").address == "http://10.0.0.5:8265"


def test_an_address_is_recognised_however_loopback_is_spelled():
    from ssd.local_state import same_endpoint

    assert same_endpoint("http://localhost:8265/", "http://127.0.0.1:8265")
    assert same_endpoint("127.0.0.1:6379", "localhost:6379")
    assert not same_endpoint("http://127.0.0.1:8266", "http://127.0.0.1:8265")
    assert not same_endpoint("http://10.0.0.5:8265", "http://127.0.0.1:8265")


def test_a_missing_relative_data_path_says_where_a_submitted_job_looks(tmp_path, monkeypatch):
    from ssd.jobs.common import BadRequest, resolve_data

    monkeypatch.chdir(tmp_path)
    with pytest.raises(BadRequest, match=r"'shards/voc/train' is relative to .*uploaded copy without git-ignored "
                                         r"data such as shards/: give an absolute path or an s3:// prefix"):
        resolve_data("shards/voc")
    with pytest.raises(BadRequest) as err:  # an absolute path: no hint
        resolve_data(str(tmp_path / "nowhere"))
    assert "uploaded copy" not in str(err.value)


def test_loader_workers_default_to_the_gpu_workers_cpus_minus_one():
    from ssd.jobs.common import loader_workers_for

    assert loader_workers_for(None, True, 8.0) == 7  # one CPU stays with the training process
    assert loader_workers_for(None, True, 1.0) == 0
    assert loader_workers_for(None, False, 8.0) == 0  # CPU workers compute with their CPUs
    assert loader_workers_for(3, True, 8.0) == 3 and loader_workers_for(0, True, 8.0) == 0
    with pytest.raises(ValueError, match="--loader-workers must be >= 0, got -1"):
        loader_workers_for(-1, True, 8.0)
