#!/usr/bin/env bash
# Installs celery-spawn into .venv if needed and runs the fan-out example end to end.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/bootstrap.sh
exec .venv/bin/python examples/fanout/run.py
