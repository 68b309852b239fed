"""infra/local: a real Ray head and MLflow server on loopback, a real `ray job submit`, and a stop
that ends exactly the processes start.sh began."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
START, STOP = ROOT / "infra" / "local" / "start.sh", ROOT / "infra" / "local" / "stop.sh"
BIN = Path(sys.executable).parent

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _processes_with_env(marker: str) -> list[int]:
    """Pids whose environment mentions ``marker``: every process start.sh spawned inherits its
    SSD_LOCAL_STATE, including Ray workers that live in process groups of their own."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker.encode() in (proc / "environ").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def test_start_submit_stop(tmp_path):
    ports = {"RAY_PORT": _free_port(), "RAY_DASHBOARD_PORT": _free_port(), "MLFLOW_PORT": _free_port()}
    env = {**os.environ, **{k: str(v) for k, v in ports.items()}, "PYTHON": sys.executable,
           "SSD_LOCAL_STATE": str(tmp_path / "state"), "SSD_MLFLOW_HOME": str(tmp_path / "mlflow"),
           "RAY_NUM_CPUS": "2", "RAY_OBJECT_STORE_MB": "256"}
    bystander = subprocess.Popen(["sleep", "300"], start_new_session=True)  # not ours: must survive
    try:
        started = subprocess.run([str(START)], env=env, capture_output=True, text=True, timeout=240, check=False)
        assert started.returncode == 0, started.stdout + started.stderr
        dashboard = f"http://127.0.0.1:{ports['RAY_DASHBOARD_PORT']}"
        assert _answers(f"{dashboard}/api/version")
        assert _answers(f"http://127.0.0.1:{ports['MLFLOW_PORT']}/health")
        assert (tmp_path / "mlflow" / "mlflow.db").exists()  # the SQLite store at the fixed place
        assert f"export RAY_ADDRESS={dashboard}" in started.stdout

        # a job's `python` is the project's interpreter (start.sh puts the venv first on PATH)
        job = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", dashboard, "--",
             "python", "-c", "import ray, ssd; ray.init(); print('answer', ray.get(ray.remote(lambda: 6 * 7).remote()))"],
            env={**env, "RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True, timeout=180, check=False)
        assert job.returncode == 0 and "answer 42" in job.stdout and "succeeded" in job.stdout, job.stdout + job.stderr

        groups = [int((tmp_path / "state" / f"{name}.pid").read_text()) for name in ("ray", "mlflow")]
        stopped = subprocess.run([str(STOP)], env=env, capture_output=True, text=True, timeout=120, check=False)
        assert stopped.returncode == 0, stopped.stderr
        time.sleep(1)
        assert not any(_group_alive(g) for g in groups)
        assert _processes_with_env(str(tmp_path / "state")) == []  # no orphaned Ray worker either
        assert not _answers(f"{dashboard}/api/version")
        assert not list((tmp_path / "state").glob("*.pid"))
        assert bystander.poll() is None  # an unrelated process is untouched
        again = subprocess.run([str(STOP)], env=env, capture_output=True, text=True, timeout=30, check=False)
        assert "not started by start.sh" in again.stdout
    finally:
        subprocess.run([str(STOP)], env=env, capture_output=True, timeout=120, check=False)
        bystander.send_signal(signal.SIGTERM)
        bystander.wait()
