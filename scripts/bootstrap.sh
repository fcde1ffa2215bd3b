#!/usr/bin/env bash
# Creates .venv (if missing) and installs celery-spawn into it with the given extras.
# Usage: scripts/bootstrap.sh [extras]    e.g. scripts/bootstrap.sh test,web
# pip runs with -qq: errors still show, warnings (the build backend's notes on an editable
# install among them) would otherwise stand above the example's output.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
stamp=".venv/.installed-${extras:-core}"
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ]; then
    .venv/bin/python -m pip install -qq --upgrade pip >/dev/null
    if [ -n "$extras" ]; then
        .venv/bin/python -m pip install -qq -e ".[${extras}]"
    else
        .venv/bin/python -m pip install -qq -e .
    fi
    touch "$stamp"
fi
