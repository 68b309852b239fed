#!/usr/bin/env bash
# Install the PostgreSQL server binaries from the Debian packages, for
# tests/test_mlflow_postgres.py (which starts its own throwaway server with initdb + pg_ctl, as
# the `postgres` system user the package creates, on a free loopback port).
#
# Idempotent: nothing is done when /usr/lib/postgresql/*/bin/pg_ctl exists. Otherwise, before
# the packages are configured, a createcluster.d snippet turns off the `main` cluster that
# postgresql-common would create (postgresql-common reads /etc/postgresql-common/createcluster.d/
# from its own createcluster.conf, which is left untouched), so no system server takes port 5432
# or starts at boot; --no-install-recommends leaves out sysstat, logrotate and e2fsprogs.
# apt-get update runs first: a fresh image has no package lists. Needs root (or sudo).
set -euo pipefail

if compgen -G '/usr/lib/postgresql/*/bin/pg_ctl' >/dev/null; then
    echo "postgres.sh: PostgreSQL already installed ($(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1))"
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "postgres.sh: no apt-get: install the PostgreSQL server (initdb, pg_ctl, createdb) yourself" >&2
    exit 1
fi
SUDO=()
if [[ $(id -u) -ne 0 ]]; then SUDO=(sudo); fi
"${SUDO[@]}" mkdir -p /etc/postgresql-common/createcluster.d
echo 'create_main_cluster = false' |
    "${SUDO[@]}" tee /etc/postgresql-common/createcluster.d/ssd-ci.conf >/dev/null
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql
echo "postgres.sh: installed $(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
