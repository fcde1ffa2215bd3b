#!/usr/bin/env bash
# System packages the tests need: the database drivers build against libpq and the MariaDB client;
# the web tests drive Chromium and run the JavaScript client under Node; the clock-skew test preloads libfaketime.
# Installs what is missing only as root, or through sudo when it runs without a password prompt;
# otherwise prints the one apt-get line to run and fails.
set -euo pipefail
need=()
dpkg -s libpq-dev >/dev/null 2>&1 || need+=(libpq-dev)
dpkg -s libmariadb-dev >/dev/null 2>&1 || need+=(libmariadb-dev)
dpkg -s pkg-config >/dev/null 2>&1 || need+=(pkg-config)
command -v gcc >/dev/null 2>&1 || need+=(build-essential)
dpkg -s chromium >/dev/null 2>&1 || need+=(chromium)                # the dashboard tests (headless)
dpkg -s chromium-driver >/dev/null 2>&1 || need+=(chromium-driver)
command -v node >/dev/null 2>&1 || need+=(nodejs)                   # the JavaScript client test
dpkg -s faketime >/dev/null 2>&1 || need+=(faketime)                # a worker with a skewed clock (libfaketime)
[ "${#need[@]}" -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then
    as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    as_root=(sudo)
else
    echo "missing system packages; install them with:" >&2
    echo "sudo apt-get install -y --no-install-recommends ${need[*]}" >&2
    exit 1
fi
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
