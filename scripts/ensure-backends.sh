#!/usr/bin/env bash
# Make sure PostgreSQL and Redis are reachable for the tests and `streammesh up`.
#
#   scripts/ensure-backends.sh           probe; start what is installed but down; install what is absent
#   scripts/ensure-backends.sh --check   probe only; exit 1 naming what is unreachable
#
# For each backend, in order:
#   1. the server answers a probe on host:port   -> nothing to do, print nothing
#   2. the host is not this machine              -> fail: we cannot start a remote server
#   3. the server is installed here              -> start it
#   4. it is absent                              -> apt-get install it, then start it
# and then wait (bounded) until the probe answers, or fail with the log to look at.
# It never stops or restarts anything that is already running.
#
# Environment: STREAMMESH_PG_HOST/PORT (127.0.0.1:5432), STREAMMESH_REDIS_HOST/PORT
# (127.0.0.1:6379), STREAMMESH_BACKENDS_TIMEOUT (seconds to wait for each, 60).
set -euo pipefail

PG_HOST=${STREAMMESH_PG_HOST:-127.0.0.1}
PG_PORT=${STREAMMESH_PG_PORT:-5432}
REDIS_HOST=${STREAMMESH_REDIS_HOST:-127.0.0.1}
REDIS_PORT=${STREAMMESH_REDIS_PORT:-6379}
TIMEOUT=${STREAMMESH_BACKENDS_TIMEOUT:-60}

CHECK_ONLY=0
APT_UPDATED=0
case "${1:-}" in
    "") ;;
    --check) CHECK_ONLY=1 ;;
    -h | --help)
        sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "usage: $0 [--check]" >&2
        exit 2
        ;;
esac

say() { echo "ensure-backends: $*" >&2; }
die() {
    say "error: $*"
    exit 1
}

# True when a server of that kind answers on host:port. A bare TCP connect is not enough: a
# proxy or another program may hold the port. PostgreSQL is sent an SSLRequest and must reply
# 'S' or 'N' (the first step of every client; the server logs nothing when we then hang up);
# Redis is sent PING and must reply with a RESP status or error line (+PONG, or -NOAUTH ...).
# shellcheck disable=SC2016  # $1..$3 are expanded by the inner bash, on purpose
answers() { # postgres|redis host port
    timeout 3 bash -c '
        exec 3<>"/dev/tcp/$2/$3" || exit 1
        if [[ $1 == postgres ]]; then
            printf "\x00\x00\x00\x08\x04\xd2\x16\x2f" >&3
            IFS= read -r -n 1 -t 2 reply <&3 && [[ $reply == [SN] ]]
        else
            printf "PING\r\n" >&3
            IFS= read -r -t 2 reply <&3 && [[ $reply == [+-]* ]]
        fi' _ "$1" "$2" "$3" 2>/dev/null
}

is_local() {
    case "$1" in
        127.* | localhost | ::1 | 0.0.0.0) return 0 ;;
        *) return 1 ;;
    esac
}

# Run a command as root: directly, or through passwordless sudo (checked by need_root first,
# so that the failure is reported from the main shell, not from inside a pipeline).
as_root() {
    if [[ $EUID -eq 0 ]]; then
        "$@"
    else
        sudo -n "$@"
    fi
}

need_root() { # why
    [[ $EUID -eq 0 ]] && return 0
    command -v sudo >/dev/null && sudo -n true 2>/dev/null && return 0
    die "need root (or passwordless sudo) to $1; do it yourself, then rerun"
}

apt_install() {
    command -v apt-get >/dev/null ||
        die "$* not installed and apt-get is not available; install it yourself, then rerun"
    need_root "apt-get install $*"
    say "installing $* with apt-get (this takes a minute)"
    if ! ((APT_UPDATED)); then
        as_root apt-get update -qq
        APT_UPDATED=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

wait_for() { # postgres|redis name host port hint
    local kind=$1 name=$2 host=$3 port=$4 hint=$5 deadline=$((SECONDS + TIMEOUT))
    until answers "$kind" "$host" "$port"; do
        if ((SECONDS >= deadline)); then
            die "$name still not reachable on $host:$port after ${TIMEOUT}s; see $hint"
        fi
        sleep 0.5
    done
    say "$name is up on $host:$port"
}

# --- PostgreSQL -----------------------------------------------------------------------------

# Debian clusters, one "<version> <cluster> <port>" per line; empty when there are none.
pg_clusters() {
    command -v pg_lsclusters >/dev/null || return 0
    pg_lsclusters --no-header 2>/dev/null | awk '{ print $1, $2, $3 }' || true
}

# "<version> <cluster>" of the cluster configured for $PG_PORT; fails if there is none.
pg_cluster_on_port() {
    pg_clusters | awk -v port="$PG_PORT" '$3 == port { print $1, $2; found = 1; exit }
        END { exit !found }'
}

# Dev/CI only: a fresh Debian install authenticates TCP logins with scram and has no password
# for `postgres`, while the tests and `streammesh up` log in as `postgres` without one. Trust
# local TCP connections (127.0.0.1 and ::1 only), first in pg_hba.conf so they win. Never do
# this on a server that matters.
pg_trust_local_tcp() {
    local version=$1 cluster=$2
    local hba="/etc/postgresql/$version/$cluster/pg_hba.conf"
    local marker="# StreamMesh dev/CI (scripts/ensure-backends.sh): passwordless local TCP"
    [[ -f $hba ]] || die "expected $hba"
    if ! as_root grep -qF "$marker" "$hba"; then
        say "adding trust lines for 127.0.0.1 and ::1 at the top of $hba (dev/CI only)"
        local tmp
        tmp=$(mktemp)
        printf '%s\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n\n' \
            "$marker" >"$tmp"
        as_root cat "$hba" >>"$tmp"
        as_root cp "$tmp" "$hba"
        rm -f "$tmp"
    fi
}

pg_start() { # version cluster
    need_root "start PostgreSQL $1/$2 (pg_ctlcluster)"
    say "starting PostgreSQL $1/$2"
    # Not fatal by itself ("already running", a concurrent start): wait_for decides.
    as_root pg_ctlcluster --skip-systemctl-redirect "$1" "$2" start ||
        say "pg_ctlcluster start exited non-zero; waiting anyway"
}

ensure_postgres() {
    answers postgres "$PG_HOST" "$PG_PORT" && return 0
    ((CHECK_ONLY)) && die "PostgreSQL is not reachable on $PG_HOST:$PG_PORT"
    is_local "$PG_HOST" ||
        die "PostgreSQL is not reachable on $PG_HOST:$PG_PORT, which is not this machine; start it there"

    local cluster installed=0
    if [[ -z $(pg_clusters) ]]; then
        command -v pg_ctl >/dev/null && ! command -v pg_ctlcluster >/dev/null &&
            die "PostgreSQL is installed but not as a Debian cluster; start it yourself on port $PG_PORT"
        apt_install postgresql
        installed=1
    fi
    cluster=$(pg_cluster_on_port) ||
        die "no PostgreSQL cluster is configured for port $PG_PORT (pg_lsclusters shows:" \
            "$(pg_clusters | tr '\n' ';')); set STREAMMESH_PG_PORT or create one"
    local version=${cluster% *} name=${cluster#* }
    if ((installed)); then
        pg_trust_local_tcp "$version" "$name"
        # The package may already have started the cluster; then a reload applies pg_hba.conf.
        if pg_lsclusters --no-header "$version" "$name" | grep -q online; then
            as_root pg_ctlcluster --skip-systemctl-redirect "$version" "$name" reload
        fi
    fi
    answers postgres "$PG_HOST" "$PG_PORT" || pg_start "$version" "$name"
    wait_for postgres PostgreSQL "$PG_HOST" "$PG_PORT" \
        "/var/log/postgresql/postgresql-$version-$name.log (listen_addresses/port in /etc/postgresql/$version/$name)"
    if ! ((installed)) && command -v psql >/dev/null &&
        ! PGCONNECT_TIMEOUT=5 psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres -w -Atqc 'select 1' \
            >/dev/null 2>&1; then
        say "warning: user postgres cannot log in over TCP without a password; the tests expect" \
            "trust on 127.0.0.1 (or set STREAMMESH_TEST_DATABASE_URL)"
    fi
}

# --- Redis ----------------------------------------------------------------------------------

# Where a Redis we start keeps its (empty: no RDB, no AOF) data dir and its log.
redis_dirs() {
    if [[ -w /var/lib/redis && -w /var/log/redis ]]; then
        echo /var/lib/redis /var/log/redis/ci.log
    else
        local state="${XDG_STATE_HOME:-$HOME/.local/state}/streammesh/redis"
        mkdir -p "$state"
        echo "$state" "$state/redis.log"
    fi
}

ensure_redis() {
    answers redis "$REDIS_HOST" "$REDIS_PORT" && return 0
    ((CHECK_ONLY)) && die "Redis is not reachable on $REDIS_HOST:$REDIS_PORT"
    is_local "$REDIS_HOST" ||
        die "Redis is not reachable on $REDIS_HOST:$REDIS_PORT, which is not this machine; start it there"

    command -v redis-server >/dev/null || apt_install redis-server
    local dir log
    read -r dir log < <(redis_dirs)
    say "starting Redis on port $REDIS_PORT (log: $log)"
    # The queue must survive a Redis restart: acknowledged events live there until stored, so
    # AOF is on with fsync every second (README "Durability"). `-::1` binds IPv6 loopback if any.
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" \
        --save "" --appendonly yes --appendfsync everysec --dir "$dir" --logfile "$log" ||
        say "redis-server exited non-zero (another instance may be starting); waiting anyway"
    wait_for redis Redis "$REDIS_HOST" "$REDIS_PORT" "$log"
}

ensure_postgres
ensure_redis
