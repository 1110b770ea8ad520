"""Connection-age settings: what the listener is given, and the gateway's rule that a Publish
stream is recycled before its connection's grace runs out."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.gateway.settings import RECYCLE_MARGIN_SECONDS, GatewaySettings
from services.ingest.settings import IngestSettings
from streammesh.mesh.server import server_options


def test_the_listener_takes_its_connection_age_from_the_settings() -> None:
    options = dict(
        server_options(
            IngestSettings(max_connection_age_seconds=10, max_connection_age_grace_seconds=2)
        )
    )
    assert options["grpc.max_connection_age_ms"] == 10_000
    assert options["grpc.max_connection_age_grace_ms"] == 2_000
    defaults = dict(server_options(IngestSettings()))
    assert defaults["grpc.max_connection_age_ms"] == 300_000
    assert defaults["grpc.max_connection_age_grace_ms"] == 30_000


def test_the_gateway_refuses_a_grace_shorter_than_a_stream_lives() -> None:
    defaults = GatewaySettings()
    assert (
        defaults.max_connection_age_grace_seconds
        >= defaults.publish_stream_max_age_seconds + RECYCLE_MARGIN_SECONDS
    )
    with pytest.raises(ValidationError, match="publish_stream_max_age_seconds"):
        GatewaySettings(max_connection_age_grace_seconds=30)
    GatewaySettings(max_connection_age_grace_seconds=30, publish_stream_max_age_seconds=20)
