#!/usr/bin/env bash
# Make sure the prometheus and promtool binaries are installed (tests/mesh/test_prometheus.py
# runs a real Prometheus and checks docs/prometheus/*.yml with promtool).
#
#   scripts/ensure-prometheus.sh           install Debian's prometheus package when either is absent
#   scripts/ensure-prometheus.sh --check   probe only; exit 1 naming what is missing
#
# It installs the binaries only: the package's own service is not started (no systemd here, and
# the tests start their own Prometheus on a free loopback port with a configuration of theirs).
set -euo pipefail

CHECK_ONLY=0
case "${1:-}" in
    "") ;;
    --check) CHECK_ONLY=1 ;;
    -h | --help)
        sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "usage: $0 [--check]" >&2
        exit 2
        ;;
esac

say() { echo "ensure-prometheus: $*" >&2; }

missing=()
for tool in prometheus promtool; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
((${#missing[@]} == 0)) && exit 0
if ((CHECK_ONLY)); then
    say "not installed: ${missing[*]}"
    exit 1
fi

command -v apt-get >/dev/null || {
    say "${missing[*]} not installed and apt-get is not available; install Prometheus yourself"
    exit 1
}
as_root() {
    if [[ $EUID -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        sudo -n "$@"
    else
        say "need root (or passwordless sudo) to apt-get install prometheus"
        exit 1
    fi
}
say "installing Debian's prometheus package (binaries prometheus and promtool)"
as_root apt-get update -qq
as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    prometheus >/dev/null
for tool in prometheus promtool; do
    command -v "$tool" >/dev/null || {
        say "apt-get installed prometheus but $tool is still not on PATH"
        exit 1
    }
done
say "installed: $(prometheus --version 2>&1 | head -1)"
