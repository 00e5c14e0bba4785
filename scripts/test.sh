#!/usr/bin/env bash
# The test command: installs what the tests need on a fresh Debian machine, then runs every
# test of the workspace. Safe to run again; it only installs or starts what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v gearman >/dev/null 2>&1 || need_pkgs+=(gearman-tools)
command -v gearadmin >/dev/null 2>&1 || need_pkgs+=(gearman-tools)
command -v gearmand >/dev/null 2>&1 || need_pkgs+=(gearman-job-server)
perl -MGearman::Client -e1 >/dev/null 2>&1 || need_pkgs+=(libgearman-client-perl)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    echo "test.sh: installing ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi

cargo test --workspace --no-fail-fast "$@"
