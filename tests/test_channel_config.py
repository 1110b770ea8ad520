"""The service config the channel factory builds: what is retried and what gets a deadline."""

from __future__ import annotations

from streammesh.api.ingest.v1 import ingest_pb2
from streammesh.mesh.channel import service_config, unary_methods

INGEST = ingest_pb2.DESCRIPTOR.services_by_name["IngestService"]


def test_streams_never_get_a_default_deadline() -> None:
    config = service_config(
        INGEST.full_name,
        retry_methods=["PublishBatch"],
        unary_methods=unary_methods(INGEST),
        timeout_seconds=10,
    )
    timed = {
        name["method"]
        for method_config in config["methodConfig"]
        if "timeout" in method_config
        for name in method_config["name"]
    }
    assert timed == {"PublishBatch"}
    assert "Publish" not in timed
    assert all("method" in n for mc in config["methodConfig"] for n in mc["name"])


def test_only_named_methods_are_retried() -> None:
    config = service_config(INGEST.full_name, retry_methods=["PublishBatch"])
    retried = [mc for mc in config["methodConfig"] if "retryPolicy" in mc]
    assert [n["method"] for n in retried[0]["name"]] == ["PublishBatch"]
    assert retried[0]["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert config["retryThrottling"] == {"maxTokens": 10, "tokenRatio": 0.1}


def test_unary_methods_excludes_streams() -> None:
    assert unary_methods(INGEST) == ["PublishBatch"]
