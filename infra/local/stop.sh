#!/usr/bin/env bash
# Stop the Ray head and MLflow server that infra/local/start.sh started (and nothing else).
#
#   infra/local/stop.sh             # both
#   infra/local/stop.sh ray|mlflow  # one
#
# Each pid file names a session leader (start.sh runs every service under setsid); the whole
# process group gets SIGTERM, then SIGKILL after a grace period. Processes this script did not
# start are never signalled. Same SSD_LOCAL_STATE as start.sh. The token (auth_token) stays, so the
# exports start.sh printed remain valid after a restart; Ray's logs stay under the temp dir.
set -euo pipefail

STATE="${SSD_LOCAL_STATE:-$HOME/.cache/ssd-ray/local}"
GRACE="${STOP_GRACE_SECONDS:-30}"

stop() {
    local name=$1 pid_file="$STATE/$1.pid" pid
    if [[ ! -f "$pid_file" ]]; then
        echo "$name: not started by start.sh (no $pid_file)"
        return
    fi
    pid="$(cat "$pid_file")"
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "$name: pid $pid already gone"
        rm -f "$pid_file" "$STATE/$name.json"
        return
    fi
    # The session leader first: `ray start --block` and `mlflow server` shut their own children
    # down on SIGTERM (Ray's workers run in process groups of their own, so only a graceful
    # shutdown reaches them); the rest of the group is signalled if it outlives the leader.
    kill -TERM "$pid" 2>/dev/null || true
    local leader_deadline=$((SECONDS + GRACE))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS <= leader_deadline)); do sleep 0.5; done
    kill -TERM -- "-$pid" 2>/dev/null || true
    local deadline=$((SECONDS + GRACE))
    while kill -0 -- "-$pid" 2>/dev/null; do  # any process of the group still alive
        if ((SECONDS > deadline)); then
            echo "$name: still running after ${GRACE} s, sending SIGKILL"
            kill -KILL -- "-$pid" 2>/dev/null || true
            break
        fi
        sleep 0.5
    done
    rm -f "$pid_file" "$STATE/$name.json"
    echo "$name: stopped (process group $pid)"
}

case "${1:-all}" in
    ray) stop ray ;;
    mlflow) stop mlflow ;;
    all) stop mlflow; stop ray ;;
    *) echo "usage: $0 [ray|mlflow|all]" >&2; exit 2 ;;
esac
