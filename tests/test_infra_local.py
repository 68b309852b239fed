"""infra/local: real Ray heads and an MLflow server started by start.sh, reachable from this
machine only and with token auth; two instances side by side that do not cross; a real
`ray job submit`; and a stop that ends exactly the processes start.sh began."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import start_local_services, stop_local_services

ROOT = Path(__file__).resolve().parents[1]
START, STOP = ROOT / "infra" / "local" / "start.sh", ROOT / "infra" / "local" / "stop.sh"
BIN = Path(sys.executable).parent

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(400)]


def _status(url: str, token: str | None = None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return 0


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


def _listening_sockets() -> dict[int, list[tuple[str, int]]]:
    """Socket inode -> (address, port) of every TCP socket in LISTEN state, from /proc/net/tcp*."""
    found: dict[int, list[tuple[str, int]]] = {}
    for table, width in (("tcp", 8), ("tcp6", 32)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], int(fields[9])
            if state != "0A":  # TCP_LISTEN
                continue
            hex_address, hex_port = local.split(":")
            found.setdefault(inode, []).append((_address(hex_address, width), int(hex_port, 16)))
    return found


def _address(hex_address: str, width: int) -> str:
    """/proc/net's little-endian hex address as text (IPv4, or IPv6 incl. v4-mapped)."""
    raw = bytes.fromhex(hex_address)
    if width == 8:
        return ".".join(str(b) for b in raw[::-1])
    words = [raw[i:i + 4][::-1] for i in range(0, 16, 4)]
    address = b"".join(words)
    if address[:12] == b"\0" * 10 + b"\xff\xff":
        return ".".join(str(b) for b in address[12:])
    return ":".join(address[i:i + 2].hex() for i in range(0, 16, 2))


def _is_loopback(address: str) -> bool:
    return address.startswith("127.") or address == "0000:0000:0000:0000:0000:0000:0000:0001"


def _listeners_of(pids: list[int]) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every listening TCP socket the processes hold."""
    sockets = _listening_sockets()
    found = []
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            match = re.fullmatch(r"socket:\[(\d+)\]", target)
            if match and int(match.group(1)) in sockets:
                found += [(pid, address, port) for address, port in sockets[int(match.group(1))]]
    return found


def _submit(env: dict, dashboard: str, *command: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), "job", "submit", "--address", dashboard, "--", *command], env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


#: a job that prints the GCS address of the cluster its driver attached to
WHERE_AM_I = ("python", "-c", ("import ray; ray.init(); print('gcs', ray.get_runtime_context().gcs_address); "
                               "print('answer', ray.get(ray.remote(lambda: 42).remote()))"))


def test_start_secure_isolated_submit_stop(tmp_path, free_port):
    bystander = subprocess.Popen(["sleep", "300"], start_new_session=True)  # not ours: must survive
    first = second = None
    try:
        first = start_local_services(tmp_path / "a", free_port)
        state, env, dashboard = first["state"], first["env"], first["dashboard"]
        token = (state / "auth_token").read_text()
        assert len(token) >= 32 and (state / "auth_token").stat().st_mode & 0o777 == 0o600
        assert f"RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={state / 'auth_token'}" in first["start_output"]
        assert f"export RAY_ADDRESS={dashboard}" in first["start_output"]
        assert (tmp_path / "a" / "mlflow" / "mlflow.db").exists()  # the SQLite store at the fixed place
        assert _status(f"{first['mlflow']}/health") == 200
        # scripts without --mlflow-uri / MLFLOW_TRACKING_URI use this server (not its SQLite file)
        which = subprocess.run([sys.executable, "-c", ("import sys; sys.path.insert(0, sys.argv[1]); "
                                "from ssd.tracking import resolve_tracking_uri; print(resolve_tracking_uri())"),
                                str(ROOT)], env=env, capture_output=True, text=True, timeout=60, check=False)
        assert which.stdout.strip() == first["mlflow"] and "the server `make up` started" in which.stderr, which

        # --- token auth: the dashboard API and job submission refuse a request without the token
        assert _status(f"{dashboard}/api/version") == 401
        assert _status(f"{dashboard}/api/version", "0" * 64) == 403
        assert _status(f"{dashboard}/api/version", token) == 200
        anonymous = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
        refused = _submit(anonymous, dashboard, "echo", "should-not-run")
        assert refused.returncode != 0 and "should-not-run" not in refused.stdout
        assert "Authentication required" in refused.stdout + refused.stderr
        # the Ray client server (ray://) is loopback-only and wants the token too
        connect = ("import sys, ray, ray.util; ray.util.connect(f'127.0.0.1:{sys.argv[1]}', connection_retries=1); "
                   "print('connected', ray.get(ray.remote(lambda: 42).remote()))")
        client = subprocess.run([sys.executable, "-c", connect, first["ports"]["RAY_CLIENT_PORT"]],
                                env={**anonymous, "RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True,
                                timeout=120, check=False)
        assert client.returncode != 0 and "connected" not in client.stdout
        client = subprocess.run([sys.executable, "-c", connect, first["ports"]["RAY_CLIENT_PORT"]], env=env,
                                capture_output=True, text=True, timeout=120, check=False)
        assert "connected 42" in client.stdout, client.stdout + client.stderr

        # --- loopback only: every listening socket of every process the head started
        head_pids = _processes_with_env(str(state))
        assert len(head_pids) >= 5  # gcs, raylet, dashboard, agents, client server, ...
        listeners = _listeners_of(head_pids)
        ports = {port for _, _, port in listeners}
        assert {int(first["ports"][k]) for k in ("RAY_PORT", "RAY_DASHBOARD_PORT", "RAY_CLIENT_PORT")} <= ports
        exposed = [entry for entry in listeners if not _is_loopback(entry[1])]
        assert exposed == [], f"listening beyond loopback: {exposed}"

        # --- with the token, a job runs, on this head, with the project's interpreter first on PATH
        job = _submit(env, dashboard, *WHERE_AM_I)
        assert job.returncode == 0 and "answer 42" in job.stdout and "succeeded" in job.stdout, job.stdout + job.stderr
        assert f"gcs {first['gcs']}" in job.stdout
        assert not Path("/tmp/ray/ray_current_cluster").exists() or first["gcs"] not in Path(
            "/tmp/ray/ray_current_cluster").read_text()  # the machine-wide record is not this head's

        # --- pipelines/submit.py finds this head and its token by itself (no exports); the exit
        # status is the job's, and the console has the job's output without Ray's upload messages
        submit = [sys.executable, str(ROOT / "pipelines" / "submit.py"), "--"]
        ok = subprocess.run([*submit, *WHERE_AM_I], env=anonymous, capture_output=True, text=True, timeout=180,
                            check=False)
        assert ok.returncode == 0 and "answer 42" in ok.stdout and f"gcs {first['gcs']}" in ok.stdout, ok.stdout + ok.stderr
        assert "Uploading package" not in ok.stdout + ok.stderr and "Ignoring upload" not in ok.stdout + ok.stderr
        refused_job = subprocess.run([*submit, "python", "-c", "import sys; sys.exit(2)"], env=anonymous,
                                     capture_output=True, text=True, timeout=180, check=False)
        assert refused_job.returncode == 2, refused_job.stdout + refused_job.stderr

        # --- a private cluster (what tests and `--address local` start) comes and goes beside it
        private = subprocess.run(
            [sys.executable, "-c", ("import sys; sys.path.insert(0, sys.argv[1]); import ray; "
                                    "from ssd.distributed.cluster import connect; connect('local', num_cpus=1); "
                                    "print('private', ray.get_runtime_context().gcs_address)"), str(ROOT)],
            env=env, capture_output=True, text=True, timeout=120, check=False)
        assert private.returncode == 0 and "private 127.0.0.1:" in private.stdout, private.stdout + private.stderr
        assert f"private {first['gcs']}" not in private.stdout

        # --- a second instance beside the first: each job runs on its own head
        second = start_local_services(tmp_path / "b", free_port, "ray")
        again = _submit(env, dashboard, *WHERE_AM_I)
        other = _submit(second["env"], second["dashboard"], *WHERE_AM_I)
        assert f"gcs {first['gcs']}" in again.stdout, again.stdout + again.stderr
        assert f"gcs {second['gcs']}" in other.stdout, other.stdout + other.stderr
        # one head's token does not open the other
        crossed = _submit({**env, "RAY_AUTH_TOKEN_PATH": str(second["state"] / "auth_token")}, dashboard, "echo", "x")
        assert crossed.returncode != 0

        # --- plain `python` scripts: RAY_ADDRESS=http://... (what start.sh prints) is this head
        attach = ("import sys; sys.path.insert(0, sys.argv[1]); from ssd.distributed.cluster import connect; "
                  "import ray; connect(); print('gcs', ray.get_runtime_context().gcs_address)")
        for client_env, expected in ((env, first["gcs"]), (second["env"], second["gcs"])):
            plain = subprocess.run([sys.executable, "-c", attach, str(ROOT)],
                                   env={**client_env, "RAY_ADDRESS": client_env.get("RAY_ADDRESS") or ""},
                                   capture_output=True, text=True, timeout=120, check=False)
            assert f"gcs {expected}" in plain.stdout, plain.stdout + plain.stderr
        by_url = subprocess.run([sys.executable, "-c", attach, str(ROOT)], env={**anonymous, "RAY_ADDRESS": dashboard},
                                capture_output=True, text=True, timeout=120, check=False)
        assert f"gcs {first['gcs']}" in by_url.stdout, by_url.stdout + by_url.stderr

        # --- stop: only what start.sh began, the other instance and a bystander untouched
        groups = [int((state / f"{name}.pid").read_text()) for name in ("ray", "mlflow")]
        stopped = stop_local_services(env)
        assert stopped.returncode == 0, stopped.stderr
        time.sleep(1)
        assert not any(_group_alive(g) for g in groups)
        assert _processes_with_env(str(state)) == []  # no orphaned Ray worker either
        assert _status(f"{dashboard}/api/version", token) == 0
        assert not list(state.glob("*.pid")) and not list(state.glob("*.json"))
        assert bystander.poll() is None
        assert _submit(second["env"], second["dashboard"], *WHERE_AM_I).returncode == 0
        again = subprocess.run([str(STOP)], env=env, capture_output=True, text=True, timeout=30, check=False)
        assert "not started by start.sh" in again.stdout
    finally:
        for found in (first, second):
            if found is not None:
                stop_local_services(found["env"])
        bystander.send_signal(signal.SIGTERM)
        bystander.wait()
