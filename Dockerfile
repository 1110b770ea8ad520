# One image for the `streammesh` CLI and all five services; compose/docker-compose.yml gives each
# container its command (`python -m services.<name>`).
#
# With a registry: `docker compose -f compose/docker-compose.yml up --build` builds it on
# python:3.11-slim and installs the dependencies from the package index.
# Without one (scripts/compose-offline.sh, which tests/compose runs): PYTHON_IMAGE names a local
# Debian bookworm image made with debootstrap (its python3 is 3.11), build/compose/wheels/ holds
# every dependency as a wheel built on the host and build/compose/app/ the streammesh wheel, all
# installed with --no-index: nothing is fetched and nothing is compiled in the image.
# No `# syntax=` line: BuildKit would fetch that frontend image from a registry.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# python3, not python: Debian's own image has no `python` command.
RUN python3 -m venv /opt/streammesh
WORKDIR /src
# The offline build's dependencies first, in a layer that outlives changes to the code. The
# wildcard matches nothing in a build with a registry; pyproject.toml keeps the COPY valid then.
COPY pyproject.toml build/compose/wheel[s] /wheels/
RUN if ls /wheels/*.whl >/dev/null 2>&1; then \
        /opt/streammesh/bin/pip install --no-index /wheels/*.whl; \
    fi
# .dockerignore admits only pyproject.toml, README.md, streammesh/, services/ and build/compose/.
COPY . .
# A regular (not editable) install: the generated API, migrations (*.sql) and stubs are package data.
RUN if [ -d build/compose/app ]; then \
        /opt/streammesh/bin/pip install --no-index --find-links /wheels build/compose/app/*.whl; \
    else \
        /opt/streammesh/bin/pip install .; \
    fi

FROM ${PYTHON_IMAGE}
# Non-root. The state folders exist in the image, owned by that user, so that named volumes
# mounted on them start with that owner (Docker copies a path's ownership into an empty volume).
RUN useradd --system --uid 10001 --user-group --home-dir /state --no-create-home streammesh \
    && install -d -o streammesh -g streammesh -m 0700 \
        /state /state/pki /state/pki-ca /state/secrets /state/pg /state/tls \
        /state/tls/gateway /state/tls/auth /state/tls/ingest /state/tls/processor /state/tls/storage
COPY --from=build /opt/streammesh /opt/streammesh
ENV PATH=/opt/streammesh/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    STREAMMESH_STATE_DIR=/state
USER streammesh
WORKDIR /state
EXPOSE 50051 50052 50053 50054 50055
CMD ["streammesh", "--help"]
