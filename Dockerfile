# syntax=docker/dockerfile:1
# One image for the `streammesh` CLI and all five services; compose/docker-compose.yml gives each
# container its command (`python -m services.<name>`). Like the compose file, this is not built in
# CI (no container engine there); the same code runs as local processes with `streammesh up`.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/streammesh
WORKDIR /src
# .dockerignore admits only pyproject.toml, README.md, streammesh/ and services/.
COPY . .
# A regular (not editable) install: the generated API, migrations (*.sql) and stubs are package data.
RUN /opt/streammesh/bin/pip install .

FROM ${PYTHON_IMAGE}
# Non-root. The state folders exist in the image, owned by that user, so that named volumes
# mounted on them start with that owner (Docker copies a path's ownership into an empty volume).
RUN useradd --system --uid 10001 --user-group --home-dir /state --no-create-home streammesh \
    && install -d -o streammesh -g streammesh -m 0700 /state /state/pki /state/secrets /state/pg
COPY --from=build /opt/streammesh /opt/streammesh
ENV PATH=/opt/streammesh/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    STREAMMESH_STATE_DIR=/state
USER streammesh
WORKDIR /state
EXPOSE 50051 50052 50053 50054 50055
CMD ["streammesh", "--help"]
