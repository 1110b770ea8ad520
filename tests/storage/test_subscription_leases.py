"""Concurrent subscriptions per principal count over every storage replica (two servers on one
schema): the limit holds across them, an ended subscription frees its place at once, and a
lease that a dead replica left behind stops counting at its expiry."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.storage.conftest import Connect, StartServer, Stub
from tests.storage.test_subscriptions import read_until, subscribe


async def _refused(stub: Stub) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read_until(subscribe(stub), lambda ids, current: current)
    return caught.value


async def test_the_limit_per_principal_holds_across_replicas(
    start_server: StartServer, engine: AsyncEngine, connect: Connect
) -> None:
    first = await start_server(engine, subscribe_max_per_principal=2)
    second = await start_server(engine, subscribe_max_per_principal=2)
    a, b = connect(first.port, "gateway"), connect(second.port, "gateway")
    on_a, on_b = subscribe(a), subscribe(b)
    for call in (on_a, on_b):
        await read_until(call, lambda ids, current: current)
    for stub in (a, b):
        error = await _refused(stub)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "at most 2 concurrent subscriptions per user" in (error.details() or "")
    other = subscribe(b, principal="someone-else")
    await read_until(other, lambda ids, current: current)
    on_a.cancel()

    async def leases() -> int:
        async with engine.connect() as conn:
            found = await conn.execute(
                text("SELECT count(*) FROM subscription_leases WHERE principal = 'ana'")
            )
            return int(found.scalar_one())

    for _ in range(250):  # the cancel's release, bounded
        if await leases() == 1:
            break
        await asyncio.sleep(0.02)
    assert await leases() == 1
    again = subscribe(b)  # the freed place, taken on the other replica
    await read_until(again, lambda ids, current: current)
    for call in (on_b, other, again):
        call.cancel()


async def test_a_lease_left_by_a_dead_replica_stops_counting_at_its_expiry(
    start_server: StartServer, engine: AsyncEngine, connect: Connect
) -> None:
    server = await start_server(engine, subscribe_max_per_principal=1)
    stub = connect(server.port, "gateway")
    async with engine.begin() as conn:
        for expires in ("now() + interval '1 hour'", "now() - interval '1 second'"):
            await conn.execute(
                text(
                    "INSERT INTO subscription_leases VALUES (:id, 'acme', 'ana', "  # noqa: S608
                    f"{expires})"
                ),
                {"id": uuid.uuid4()},
            )
    error = await _refused(stub)  # the live lease holds the only place
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    async with engine.begin() as conn:
        await conn.execute(text("DELETE FROM subscription_leases WHERE expires_at > now()"))
    call = subscribe(stub)  # the expired lease does not count
    await read_until(call, lambda ids, current: current)
    call.cancel()
