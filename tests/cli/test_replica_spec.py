"""`--replicas` parsing: counts for every service, and a refusal naming the bad part."""

from __future__ import annotations

import pytest

from streammesh.cli.replicas import MAX_REPLICAS, format_counts, parse_replicas


def test_named_services_get_their_count_and_the_rest_one() -> None:
    counts = parse_replicas(" gateway=2, processor = 3 ,")
    assert counts == {"storage": 1, "auth": 1, "ingest": 1, "processor": 3, "gateway": 2}
    assert format_counts(counts) == "storage=1,auth=1,ingest=1,processor=3,gateway=2"
    assert parse_replicas("") == dict.fromkeys(counts, 1)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("storage", "'storage': write <service>=<count>, e.g. storage=2"),
        ("store=2", "'store=2': unknown service; expected one of storage, auth, ingest"),
        ("storage=2,storage=3", "'storage=3': storage is named twice"),
        ("storage=0", f"'storage=0': the count must be a whole number from 1 to {MAX_REPLICAS}"),
        ("storage=-1", "'storage=-1': the count must be a whole number"),
        ("storage=1.5", "'storage=1.5': the count must be a whole number"),
        (f"storage={MAX_REPLICAS + 1}", "the count must be a whole number from 1"),
    ],
)
def test_bad_spec_is_refused_naming_the_part(spec: str, message: str) -> None:
    with pytest.raises(ValueError) as refused:
        parse_replicas(spec)
    assert message in str(refused.value)
