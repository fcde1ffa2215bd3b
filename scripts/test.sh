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
# Tests marked `alone` (the fault explorer: it kills workers and cuts services) run after the rest, by
# themselves, so that their load does not slow the tests beside them past their waits.
processes="${SPAWN_TEST_PROCESSES:-3}"
if [ "$processes" -le 1 ]; then
    exec .venv/bin/python -m pytest "${@:-tests}"
fi
rest=0
.venv/bin/python -m pytest -n "$processes" --dist loadfile -m "not alone" "${@:-tests}" || rest=$?
alone=0
.venv/bin/python -m pytest -m alone "${@:-tests}" || alone=$?
# pytest's 5 is "no tests collected": one of the two runs may select none; both selecting none is an error.
for status in "$rest" "$alone"; do
    if [ "$status" -ne 0 ] && [ "$status" -ne 5 ]; then exit "$status"; fi
done
if [ "$rest" -eq 5 ] && [ "$alone" -eq 5 ]; then exit 5; fi
exit 0
