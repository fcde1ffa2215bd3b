#!/usr/bin/env bash
# Builds the documentation site into site/: the guides in docs/, the README's tutorial, the
# command reference and the API reference from the docstrings. Strict: a broken link, a missing
# page or an unresolved reference fails the build. Extra arguments go to `mkdocs build`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh docs
export NO_MKDOCS_2_WARNING=1
exec .venv/bin/mkdocs build --strict "$@"
