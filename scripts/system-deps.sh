#!/usr/bin/env bash
# System packages the tests need: the database drivers build against libpq and the MariaDB client;
# the web tests drive Chromium and run the JavaScript client under Node.
set -euo pipefail
need=()
dpkg -s libpq-dev >/dev/null 2>&1 || need+=(libpq-dev)
dpkg -s libmariadb-dev >/dev/null 2>&1 || need+=(libmariadb-dev)
dpkg -s pkg-config >/dev/null 2>&1 || need+=(pkg-config)
command -v gcc >/dev/null 2>&1 || need+=(build-essential)
dpkg -s chromium >/dev/null 2>&1 || need+=(chromium)                # the dashboard tests (headless)
dpkg -s chromium-driver >/dev/null 2>&1 || need+=(chromium-driver)
command -v node >/dev/null 2>&1 || need+=(nodejs)                   # the JavaScript client test
if [ "${#need[@]}" -gt 0 ]; then
    sudo_cmd=""
    [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need[@]}"
fi
