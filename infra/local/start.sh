#!/usr/bin/env bash
# Start a local Ray head and an MLflow tracking server, reachable from this machine only.
#
#   infra/local/start.sh            # both
#   infra/local/start.sh ray        # only the Ray head (dashboard = job submission endpoint)
#   infra/local/start.sh mlflow     # only the MLflow server (SQLite backend, local artifacts)
#   infra/local/stop.sh             # stops exactly what this script started
#
# Settings (environment):
#   SSD_LOCAL_STATE   pid files, logs, the Ray token and Ray's temp dir (default ~/.cache/ssd-ray/local)
#   SSD_MLFLOW_HOME   mlflow.db and artifacts/    (default ~/.cache/ssd-ray/mlflow: a fixed
#                     absolute place, so runs land together however a job was submitted)
#   RAY_PORT (6379), RAY_DASHBOARD_PORT (8265), RAY_CLIENT_PORT (10001), RAY_AGENT_PORT (52365),
#   MLFLOW_PORT (5000): give other values to run a second instance beside this one
#   RAY_NUM_CPUS (all cores), RAY_OBJECT_STORE_MB (512)
#   PYTHON            the interpreter whose ray/mlflow to use (default: the repo's .venv)
#
# Security (Ray 2.60; every listener checked with `ss -ltnp` for the head's pids, and by
# tests/test_infra_local.py):
#   * Token auth: RAY_AUTH_MODE=token with a random token in $SSD_LOCAL_STATE/auth_token (mode 600),
#     handed to Ray as RAY_AUTH_TOKEN_PATH. The GCS, raylet, agents, the Ray client server and the
#     dashboard's API refuse requests without it (HTTP 401). ~/.ray/auth_token is never read or
#     written. Clients need the two exports printed at the end.
#   * Loopback only: `--node-ip-address=127.0.0.1` alone is not enough, because `ray start` turns a
#     loopback node address into the machine's external address (services.resolve_ip_for_localhost)
#     and the head's servers then bind that address (or all addresses). Ray's single-machine mode,
#     RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (the default on macOS and Windows), keeps the node address
#     at 127.0.0.1, so the GCS, raylet, object manager, agents, metrics exporters, the client server
#     and the dashboard all bind 127.0.0.1. It also refuses other nodes joining, which a one-machine
#     head does not need. The Ray client server cannot be switched off in 2.60 (`ray start` gives
#     it port 10001 whenever `ray[client]` is installed), so it gets loopback, the token and its
#     own port.
#   * Isolation: Ray's temp dir is $SSD_LOCAL_STATE/ray (`--temp-dir`), so this head records
#     itself in its own ray_current_cluster, not in the machine-wide /tmp/ray that every other
#     `ray start --head` overwrites (job drivers and `ray.init()` read that record).
#   * MLflow binds 127.0.0.1 (it has no authentication of its own here).
#
# Each service runs in its own session (setsid) and its pid file holds the session leader, so
# stop.sh signals that process group only: other Ray or MLflow processes on the machine are not
# touched. Usage stats are off.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
BIN="$(dirname "$PYTHON")"
STATE="${SSD_LOCAL_STATE:-$HOME/.cache/ssd-ray/local}"
MLFLOW_HOME="${SSD_MLFLOW_HOME:-$HOME/.cache/ssd-ray/mlflow}"
RAY_PORT="${RAY_PORT:-6379}"
RAY_DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"
RAY_CLIENT_PORT="${RAY_CLIENT_PORT:-10001}"
RAY_AGENT_PORT="${RAY_AGENT_PORT:-52365}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
RAY_NUM_CPUS="${RAY_NUM_CPUS:-$(nproc)}"
RAY_OBJECT_STORE_MB="${RAY_OBJECT_STORE_MB:-512}"

mkdir -p "$STATE" "$MLFLOW_HOME/artifacts"
STATE="$(cd "$STATE" && pwd)"  # absolute: clients find the token through it
TOKEN_FILE="$STATE/auth_token"
RAY_TEMP_DIR="$STATE/ray"
# Ray's unix sockets live under the temp dir (.../session_<date>_<pid>/sockets/plasma_store) and
# a socket path may not exceed 107 bytes: a deep state folder gets a short private temp dir.
if ((${#RAY_TEMP_DIR} > 40)); then
    RAY_TEMP_DIR="${TMPDIR:-/tmp}/ssd-ray-$(id -u)-$(printf '%s' "$STATE" | sha1sum | cut -c1-10)"
fi

# RAY_API_SERVER_ADDRESS: Ray's State API clients inside the cluster (Ray Train's placement-group
# cleaner) otherwise look for "the" cluster on the machine and fail when there are several.
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TOKEN_FILE" RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 \
    RAY_API_SERVER_ADDRESS="http://127.0.0.1:$RAY_DASHBOARD_PORT" RAY_USAGE_STATS_ENABLED=0
unset RAY_AUTH_TOKEN RAY_ADDRESS
# Job entrypoints (`ray job submit -- python ...`) run with the head's PATH: put the venv first so
# `python` there is the one with the project installed.
export PATH="$BIN:$PATH"

running() {  # running NAME: true when NAME's pid file names a live process
    local pid_file="$STATE/$1.pid"
    [[ -f "$pid_file" ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null
}

wait_for() {  # wait_for NAME URL SECONDS [CURL ARGS]: poll URL until it answers, else show the log and fail
    local name=$1 url=$2 deadline=$((SECONDS + $3))
    shift 3
    until curl -sf -o /dev/null "$@" "$url"; do
        if ! running "$name"; then
            echo "error: $name exited while starting; last lines of $STATE/$name.log:" >&2
            tail -n 30 "$STATE/$name.log" >&2
            rm -f "$STATE/$name.pid"
            return 1
        fi
        if ((SECONDS > deadline)); then
            echo "error: $name did not answer $url within $3 s; see $STATE/$name.log" >&2
            return 1
        fi
        sleep 1
    done
}

ensure_token() {  # a random token, readable by this user only; kept across restarts
    if [[ ! -s "$TOKEN_FILE" ]]; then
        (umask 077 && "$PYTHON" -c 'import secrets; print(secrets.token_hex(32), end="")' >"$TOKEN_FILE")
    fi
    chmod 600 "$TOKEN_FILE"
}

start_ray() {
    if running ray; then
        echo "ray: already running (pid $(cat "$STATE/ray.pid"))"
        return
    fi
    ensure_token
    mkdir -p "$RAY_TEMP_DIR"
    # --block keeps `ray start` in the foreground as the session leader; SIGTERM to it stops the
    # head's processes (stop.sh).
    setsid "$BIN/ray" start --head --block \
        --node-ip-address=127.0.0.1 --port="$RAY_PORT" \
        --dashboard-host=127.0.0.1 --dashboard-port="$RAY_DASHBOARD_PORT" \
        --ray-client-server-port="$RAY_CLIENT_PORT" --dashboard-agent-listen-port="$RAY_AGENT_PORT" \
        --temp-dir="$RAY_TEMP_DIR" \
        --num-cpus="$RAY_NUM_CPUS" --object-store-memory=$((RAY_OBJECT_STORE_MB * 1024 * 1024)) \
        --disable-usage-stats >"$STATE/ray.log" 2>&1 < /dev/null &
    echo $! >"$STATE/ray.pid"
    # /api/version answers only with the token, so an answer proves the head is up and the token works
    wait_for ray "http://127.0.0.1:$RAY_DASHBOARD_PORT/api/version" 120 \
        -H "Authorization: Bearer $(cat "$TOKEN_FILE")"
    # what clients on this machine need to find this head (ssd.local_state reads it)
    cat >"$STATE/ray.json" <<EOF
{"gcs_address": "127.0.0.1:$RAY_PORT", "dashboard": "http://127.0.0.1:$RAY_DASHBOARD_PORT",
 "token_file": "$TOKEN_FILE", "temp_dir": "$RAY_TEMP_DIR", "pid": $(cat "$STATE/ray.pid")}
EOF
    echo "ray: head on 127.0.0.1:$RAY_PORT (token auth, loopback only), jobs at" \
        "http://127.0.0.1:$RAY_DASHBOARD_PORT (pid $(cat "$STATE/ray.pid"))"
}

start_mlflow() {
    if running mlflow; then
        echo "mlflow: already running (pid $(cat "$STATE/mlflow.pid"))"
        return
    fi
    setsid "$BIN/mlflow" server \
        --backend-store-uri "sqlite:///$MLFLOW_HOME/mlflow.db" \
        --artifacts-destination "$MLFLOW_HOME/artifacts" --serve-artifacts \
        --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 >"$STATE/mlflow.log" 2>&1 < /dev/null &
    echo $! >"$STATE/mlflow.pid"
    wait_for mlflow "http://127.0.0.1:$MLFLOW_PORT/health" 90
    cat >"$STATE/mlflow.json" <<EOF
{"tracking_uri": "http://127.0.0.1:$MLFLOW_PORT", "home": "$MLFLOW_HOME", "pid": $(cat "$STATE/mlflow.pid")}
EOF
    echo "mlflow: http://127.0.0.1:$MLFLOW_PORT (store $MLFLOW_HOME, pid $(cat "$STATE/mlflow.pid"))"
}

case "${1:-all}" in
    ray) start_ray ;;
    mlflow) start_mlflow ;;
    all) start_ray; start_mlflow ;;
    *) echo "usage: $0 [ray|mlflow|all]" >&2; exit 2 ;;
esac

echo
echo "# for \`ray job submit\`, the dashboard API and pipelines/*.py (which also find this head without them):"
echo "export RAY_ADDRESS=http://127.0.0.1:$RAY_DASHBOARD_PORT RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$TOKEN_FILE"
echo "export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT"
