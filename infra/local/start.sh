#!/usr/bin/env bash
# Start a local Ray head and an MLflow tracking server, both on 127.0.0.1.
#
#   infra/local/start.sh            # both
#   infra/local/start.sh ray        # only the Ray head (dashboard = job submission endpoint)
#   infra/local/start.sh mlflow     # only the MLflow server (SQLite backend, local artifacts)
#   infra/local/stop.sh             # stops exactly what this script started
#
# Settings (environment):
#   SSD_LOCAL_STATE   pid files and logs          (default ~/.cache/ssd-ray/local)
#   SSD_MLFLOW_HOME   mlflow.db and artifacts/    (default ~/.cache/ssd-ray/mlflow: a fixed
#                     absolute place, so runs land together however a job was submitted)
#   RAY_PORT (6379), RAY_DASHBOARD_PORT (8265), MLFLOW_PORT (5000)
#   RAY_NUM_CPUS (all cores), RAY_OBJECT_STORE_MB (512)
#   PYTHON            the interpreter whose ray/mlflow to use (default: the repo's .venv)
#
# Each service runs in its own session (setsid) and its pid file holds the session leader, so
# stop.sh signals that process group only: other Ray or MLflow processes on the machine are not
# touched. RAY_AUTH_MODE is set explicitly (a stray ~/.ray/auth_token would otherwise switch token
# auth on and `ray job submit` would get HTTP 401) and usage stats are off.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
BIN="$(dirname "$PYTHON")"
STATE="${SSD_LOCAL_STATE:-$HOME/.cache/ssd-ray/local}"
MLFLOW_HOME="${SSD_MLFLOW_HOME:-$HOME/.cache/ssd-ray/mlflow}"
RAY_PORT="${RAY_PORT:-6379}"
RAY_DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
RAY_NUM_CPUS="${RAY_NUM_CPUS:-$(nproc)}"
RAY_OBJECT_STORE_MB="${RAY_OBJECT_STORE_MB:-512}"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}" RAY_USAGE_STATS_ENABLED=0
# Job entrypoints (`ray job submit -- python ...`) run with the head's PATH: put the venv first so
# `python` there is the one with the project installed.
export PATH="$BIN:$PATH"

mkdir -p "$STATE" "$MLFLOW_HOME/artifacts"

running() {  # running NAME: true when NAME's pid file names a live process
    local pid_file="$STATE/$1.pid"
    [[ -f "$pid_file" ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null
}

wait_for() {  # wait_for NAME URL SECONDS: poll URL until it answers, else show the log and fail
    local name=$1 url=$2 deadline=$((SECONDS + $3))
    until curl -sf -o /dev/null "$url"; do
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

start_ray() {
    if running ray; then
        echo "ray: already running (pid $(cat "$STATE/ray.pid"))"
        return
    fi
    # --block keeps `ray start` in the foreground as the session leader; SIGTERM to it stops the
    # head's processes (stop.sh).
    setsid "$BIN/ray" start --head --block \
        --node-ip-address=127.0.0.1 --port="$RAY_PORT" \
        --dashboard-host=127.0.0.1 --dashboard-port="$RAY_DASHBOARD_PORT" \
        --num-cpus="$RAY_NUM_CPUS" --object-store-memory=$((RAY_OBJECT_STORE_MB * 1024 * 1024)) \
        --disable-usage-stats >"$STATE/ray.log" 2>&1 < /dev/null &
    echo $! >"$STATE/ray.pid"
    wait_for ray "http://127.0.0.1:$RAY_DASHBOARD_PORT/api/version" 120
    echo "ray: head on 127.0.0.1:$RAY_PORT, jobs at http://127.0.0.1:$RAY_DASHBOARD_PORT (pid $(cat "$STATE/ray.pid"))"
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
    echo "mlflow: http://127.0.0.1:$MLFLOW_PORT (store $MLFLOW_HOME, pid $(cat "$STATE/mlflow.pid"))"
}

case "${1:-all}" in
    ray) start_ray ;;
    mlflow) start_mlflow ;;
    all) start_ray; start_mlflow ;;
    *) echo "usage: $0 [ray|mlflow|all]" >&2; exit 2 ;;
esac

echo
echo "export RAY_ADDRESS=http://127.0.0.1:$RAY_DASHBOARD_PORT RAY_AUTH_MODE=$RAY_AUTH_MODE"
echo "export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT"
