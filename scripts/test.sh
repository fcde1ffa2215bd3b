#!/usr/bin/env bash
# Runs the whole test suite (unit + real-worker integration on SQLite, PostgreSQL, MariaDB,
# Redis and RabbitMQ). Extra arguments go to pytest, e.g. scripts/test.sh tests/unit -x
set -euo pipefail
cd "$(dirname "$0")/.."
if ! pkg-config --exists mysqlclient 2>/dev/null && ! pkg-config --exists mariadb 2>/dev/null; then
    echo "mysqlclient needs the MariaDB client headers: installing libmariadb-dev" >&2
    bash scripts/system-deps.sh
fi
bash scripts/bootstrap.sh test,web,lint,psycopg,django,metrics,otel,sentry
# Test modules run in SPAWN_TEST_PROCESSES processes (pytest-xdist, a module per process: its worker and
# databases stay its own; most of the time is spent waiting on workers and servers); default 3.
processes="${SPAWN_TEST_PROCESSES:-3}"
if [ "$processes" -gt 1 ]; then
    exec .venv/bin/python -m pytest -n "$processes" --dist loadfile "${@:-tests}"
fi
exec .venv/bin/python -m pytest "${@:-tests}"
