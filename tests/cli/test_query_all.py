"""`streammesh query --all` and GatewayClient.query_all on pages that come back empty with a
token (the newest events not settled yet): they wait, bounded, and keep the token when the wait
runs out. Pure logic over scripted pages; the server side is tests/storage/test_query_paging.py."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from streammesh.api.common.v1 import event_pb2
from streammesh.api.gateway.v1 import gateway_pb2
from streammesh.cli import query as query_command
from streammesh.client import GatewayClient, SettlingWait


def _page(ids: list[str], token: str) -> gateway_pb2.QueryEventsResponse:
    events = [event_pb2.StoredEvent(event=event_pb2.Event(id=i)) for i in ids]
    return gateway_pb2.QueryEventsResponse(events=events, next_page_token=token)


class _Pages:
    """A client whose query() returns the scripted pages in turn, noting the tokens asked."""

    def __init__(self, *pages: gateway_pb2.QueryEventsResponse) -> None:
        self._pages = list(pages)
        self.tokens: list[str] = []

    async def query(self, _filter: Any, *, page_token: str = "", **_: Any) -> Any:
        self.tokens.append(page_token)
        return self._pages.pop(0)


class _Clock:
    def __init__(self) -> None:
        self.pauses: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)


async def test_empty_pages_are_waited_on_with_growing_pauses_and_a_budget() -> None:
    clock = _Clock()
    wait = SettlingWait(first=0.1, longest=0.4, budget=1.0, sleep=clock.sleep)
    empty, full, last = _page([], "t"), _page(["a"], "t"), _page(["b"], "")
    assert [await wait.next(empty) for _ in range(3)] == [True] * 3
    assert clock.pauses == [0.1, 0.2, 0.4]
    assert await wait.next(full) and clock.pauses[-1] == 0.4  # no pause after events
    assert [await wait.next(empty) for _ in range(4)] == [True, True, True, True]
    assert clock.pauses[3:] == pytest.approx([0.1, 0.2, 0.4, 0.3])  # the budget's rest
    assert not wait.gave_up
    assert not await wait.next(empty) and wait.gave_up
    assert not await wait.next(last)


def _args(**given: Any) -> argparse.Namespace:
    fields: dict[str, Any] = {
        "key": [],
        "type": [],
        "since": "",
        "until": "",
        "filter": "",
        "count": False,
        "page_size": 2,
        "page_token": "",
        "all": True,
        "max_events": 100,
        "settle_wait": 0.0,
    }
    return argparse.Namespace(**{**fields, **given})


async def test_all_follows_the_pages_across_an_empty_one() -> None:
    pages = _Pages(_page(["a", "b"], "t1"), _page([], "t2"), _page(["c"], ""))
    reply = await query_command._query(pages, _args(settle_wait=5.0))  # type: ignore[arg-type]
    assert [s.event.id for s in reply.events] == ["a", "b", "c"]  # after one 50 ms pause
    assert reply.next_page_token == "" and pages.tokens == ["", "t1", "t2"]


async def test_all_keeps_the_token_when_the_events_do_not_settle(
    capsys: pytest.CaptureFixture[str],
) -> None:
    pages = _Pages(_page(["a"], "t1"), _page([], "t2"))
    reply = await query_command._query(pages, _args(settle_wait=0.0))  # type: ignore[arg-type]
    assert [s.event.id for s in reply.events] == ["a"] and reply.next_page_token == "t2"
    assert "did not settle within 0 s" in capsys.readouterr().err


async def test_query_all_raises_when_the_events_do_not_settle() -> None:
    clock = _Clock()
    pages = _Pages(_page(["a"], "t1"), *[_page([], "t") for _ in range(40)])
    client = object.__new__(GatewayClient)  # only query() is used, scripted
    client.query = pages.query  # type: ignore[method-assign, assignment]
    got = []
    with pytest.raises(TimeoutError):
        async for stored in client.query_all(
            event_pb2.EventFilter(), wait=SettlingWait(budget=3.0, sleep=clock.sleep)
        ):
            got.append(stored.event.id)
    assert got == ["a"] and sum(clock.pauses) == pytest.approx(3.0)
