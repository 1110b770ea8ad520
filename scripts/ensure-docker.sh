#!/usr/bin/env bash
# Make sure a Docker engine answers, for the compose stack (scripts/compose-offline.sh, tests/compose).
#
#   scripts/ensure-docker.sh start    an engine answers -> nothing to do; else install Debian's
#                                     docker.io if dockerd is missing, start dockerd in the background
#                                     and wait until it answers
#   scripts/ensure-docker.sh stop     stop the dockerd that `start` started (by its PID), nothing else,
#                                     and only once it runs no containers (another run may use it)
#   scripts/ensure-docker.sh check    exit 0 if an engine answers, 1 if one could be started here
#                                     (root or passwordless sudo), 2 if none can run; says why
#
# `start` prints "started" when it started dockerd and "running" when an engine already answered,
# so that a caller stops only what it started. A dockerd started here runs with
# --iptables=false --ip-forward=false --bridge=none: the local stack uses host networking only
# (compose/host-network.override.yml), so the engine needs no bridge, NAT or firewall rules and
# changes nothing in the machine's network set-up. dockerd picks its storage driver (overlay2
# where the kernel and backing filesystem allow it, else vfs);
# STREAMMESH_DOCKERD_STORAGE_DRIVER forces one.
#
# Environment: STREAMMESH_DOCKERD_DIR (pid file and log; /run/streammesh-dockerd),
# STREAMMESH_DOCKERD_TIMEOUT (seconds to wait for the engine, 60).
set -euo pipefail

DIR=${STREAMMESH_DOCKERD_DIR:-/run/streammesh-dockerd}
PIDFILE=$DIR/dockerd.pid
LOG=$DIR/dockerd.log
TIMEOUT=${STREAMMESH_DOCKERD_TIMEOUT:-60}

say() { echo "ensure-docker: $*" >&2; }
die() {
    say "error: $*"
    exit 1
}

can_be_root() {
    [[ $EUID -eq 0 ]] || { command -v sudo >/dev/null && sudo -n true 2>/dev/null; }
}

as_root() {
    if [[ $EUID -eq 0 ]]; then
        "$@"
    else
        sudo -n "$@"
    fi
}

engine_answers() {
    command -v docker >/dev/null && timeout 10 docker version --format '{{.Server.Version}}' \
        >/dev/null 2>&1
}

# The PID in our pid file, if that process is alive and is a dockerd.
our_pid() {
    local pid
    pid=$(as_root cat "$PIDFILE" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ $(as_root cat "/proc/$pid/comm" 2>/dev/null) == dockerd ]] || return 1
    echo "$pid"
}

install_engine() {
    command -v apt-get >/dev/null ||
        die "dockerd is not installed and apt-get is not available; install a Docker engine yourself"
    say "installing Debian's docker.io with apt-get (this takes a minute)"
    as_root apt-get update -qq
    # policy-rc.d on some machines refuses to start the service; we start dockerd ourselves.
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
}

start() {
    if engine_answers; then
        echo running
        return 0
    fi
    can_be_root || die "no Docker engine answers and starting one needs root (or passwordless sudo)"
    command -v dockerd >/dev/null || install_engine
    command -v docker >/dev/null || die "dockerd is installed but the docker client is not"
    as_root mkdir -p "$DIR"
    local args=(--pidfile "$PIDFILE" --iptables=false --ip-forward=false --ip-masq=false
        --bridge=none)
    if [[ -n ${STREAMMESH_DOCKERD_STORAGE_DRIVER:-} ]]; then
        args+=(--storage-driver "$STREAMMESH_DOCKERD_STORAGE_DRIVER")
    fi
    say "starting dockerd in the background (log: $LOG)"
    # setsid: its own session, so that the caller's terminal or process group cannot signal it.
    as_root setsid dockerd "${args[@]}" </dev/null >>"$LOG" 2>&1 &
    local deadline=$((SECONDS + TIMEOUT))
    until engine_answers; do
        if ((SECONDS >= deadline)); then
            local pid
            pid=$(our_pid) && as_root kill "$pid"
            die "dockerd did not answer within ${TIMEOUT}s; see $LOG"
        fi
        sleep 0.5
    done
    say "dockerd $(docker version --format '{{.Server.Version}}') is up" \
        "(storage driver $(docker info --format '{{.Driver}}'))"
    echo started
}

stop() {
    local pid
    if ! pid=$(our_pid); then
        say "no dockerd started by this script is running"
        return 0
    fi
    # Another run (or the user) may have started containers on the engine since: leave it.
    if [[ -n "$(docker ps -q 2>/dev/null)" ]]; then
        say "dockerd (PID $pid) still runs containers that are not ours; leaving it running"
        return 0
    fi
    say "stopping dockerd (PID $pid)"
    as_root kill -TERM "$pid"
    # dockerd stops its containers (10 s each by default) and its containerd first.
    local deadline=$((SECONDS + 60))
    while as_root kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            say "dockerd (PID $pid) still running after 60s; sending SIGKILL"
            as_root kill -KILL "$pid" || true
            break
        fi
        sleep 0.5
    done
    as_root rm -f "$PIDFILE"
}

check() {
    if engine_answers; then
        echo "a Docker engine answers"
        return 0
    fi
    if ! can_be_root; then
        echo "no Docker engine answers, and starting one needs root or passwordless sudo"
        return 2
    fi
    if ! command -v dockerd >/dev/null && ! command -v apt-get >/dev/null; then
        echo "no Docker engine answers, dockerd is not installed and apt-get is not available"
        return 2
    fi
    echo "no Docker engine answers; one can be started here"
    return 1
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    check) check ;;
    -h | --help)
        sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'
        ;;
    *)
        echo "usage: $0 start|stop|check" >&2
        exit 2
        ;;
esac
