"""The demo's bounded waits (pure asyncio, no stack): past its timeout a wait fails with the
message as things stand then, and a subscription that broke ends the wait with its error."""

from __future__ import annotations

import grpc
import pytest

from streammesh.cli.demo_processing import ProcessingCheckFailed, _Live, _until


async def test_a_wait_that_times_out_says_what_is_missing_at_the_end() -> None:
    live = _Live()
    rounds: list[int] = []

    async def heartbeat() -> None:
        rounds.append(len(rounds))

    with pytest.raises(ProcessingCheckFailed) as caught:
        await _until(
            live, lambda: False, 0.6, lambda: f"{len(rounds)} rounds, none done", heartbeat
        )
    assert str(caught.value) == f"{len(rounds)} rounds, none done within 1s"
    assert len(rounds) >= 2


async def test_a_broken_subscription_ends_the_wait_with_its_error() -> None:
    live = _Live()
    live.failure = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "storage is down"
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _until(live, lambda: False, 30, lambda: "unused")
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
