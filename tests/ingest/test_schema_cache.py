"""SchemaCache's bookkeeping, as pure logic over an in-memory registry (the wiring with real
storage is tested in test_schema_validation and tests/gateway/test_schema_registry): the size
bound, change paging, a reset change log, and a reload retried after an outage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from services.ingest.registry_client import Change, RegistryUnavailable, StoredSchema
from services.ingest.schema_cache import Outcome, SchemaCache


@dataclass
class MemoryRegistry:
    """Versions per (tenant, type), a change log, and a switch that makes every call fail."""

    versions: dict[tuple[str, str], list[Any]] = field(default_factory=dict)
    log: list[Change] = field(default_factory=list)
    down: bool = False
    schema_calls: int = 0

    def register(self, tenant: str, event_type: str, schema: Any) -> None:
        self.versions.setdefault((tenant, event_type), []).append(schema)
        self.log.append(Change(len(self.log) + 1, tenant, event_type))

    async def schema(self, tenant: str, event_type: str, version: int) -> StoredSchema | None:
        self.schema_calls += 1
        if self.down:
            raise RegistryUnavailable("down")
        found = self.versions.get((tenant, event_type), [])
        number = version or len(found)
        if not found or number > len(found):
            return None
        return StoredSchema(number, found[number - 1], len(found))

    async def refuses_unknown_types(self, tenant: str) -> bool:
        if self.down:
            raise RegistryUnavailable("down")
        return False

    async def changes(self, after: int, *, limit: int) -> tuple[list[Change], int, bool]:
        if self.down:
            raise RegistryUnavailable("down")
        newer = [c for c in self.log if c.change_id > after]
        return newer[:limit], len(self.log), len(newer) > limit


NUMBER = {"type": "number"}
STRING = {"type": "string"}


async def test_the_cache_keeps_at_most_max_subjects_least_recently_used_first() -> None:
    registry = MemoryRegistry()
    cache = SchemaCache(registry, max_subjects=2)
    for name in ("a", "b", "c"):
        registry.register("t", name, NUMBER)
    await cache.poll_once()
    for name in ("a", "b", "a", "c"):  # "b" is the least recently used when "c" arrives
        assert (await cache.resolve("t", name, 0)).outcome is Outcome.VALIDATE
    calls = registry.schema_calls
    await cache.resolve("t", "a", 0)
    await cache.resolve("t", "c", 0)
    assert registry.schema_calls == calls
    await cache.resolve("t", "b", 0)
    assert registry.schema_calls == calls + 1


async def test_changes_are_applied_page_by_page_and_reload_what_is_cached() -> None:
    registry = MemoryRegistry()
    cache = SchemaCache(registry)
    await cache.poll_once()
    registry.register("t", "x", NUMBER)
    first = await cache.resolve("t", "x", 0)
    assert first.validator is not None and first.validator.errors(b'"s"')
    for index in range(1200):  # more than one page of changes
        registry.register("t", f"other{index}", NUMBER)
    registry.register("t", "x", STRING)
    assert await cache.poll_once() == 1202
    latest = await cache.resolve("t", "x", 0)
    assert latest.version == 2 and latest.validator is not None
    assert not latest.validator.errors(b'"s"')


async def test_a_change_log_that_went_back_empties_the_cache() -> None:
    registry = MemoryRegistry()
    cache = SchemaCache(registry)
    registry.register("t", "x", NUMBER)
    await cache.poll_once()
    await cache.resolve("t", "x", 0)
    registry.log.clear()  # storage's database was replaced
    registry.versions.clear()
    await cache.poll_once()
    assert (await cache.resolve("t", "x", 0)).outcome is Outcome.ACCEPT_UNCHECKED


async def test_a_reload_that_failed_keeps_the_old_validator_and_is_retried() -> None:
    registry = MemoryRegistry()
    cache = SchemaCache(registry)
    await cache.poll_once()
    registry.register("t", "x", NUMBER)
    assert (await cache.resolve("t", "x", 0)).version == 1
    registry.register("t", "x", STRING)
    registry.down = True
    with pytest.raises(RegistryUnavailable):
        await cache.poll_once()
    registry.down = False
    # The change is seen, its reload fails in the middle of the poll: version 1 stays in use.
    original = registry.schema

    async def failing(tenant: str, event_type: str, version: int) -> StoredSchema | None:
        raise RegistryUnavailable("down again")

    registry.schema = failing  # type: ignore[method-assign]
    await cache.poll_once()
    assert (await cache.resolve("t", "x", 0)).version == 1
    registry.schema = original  # type: ignore[method-assign]
    await cache.poll_once()  # the stale entry is reloaded first
    assert (await cache.resolve("t", "x", 0)).version == 2
