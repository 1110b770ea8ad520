"""`streammesh demo`: one real session through the whole stack, timed.

Registers a user, enrols TOTP, logs in with a computed code, publishes events through the gateway,
waits until storage holds all of them, and reads them back checking count, uniqueness and
per-key order. Then stream processing: a window and a rule, watched live
(demo_processing.py).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pyotp

from streammesh.api.common.v1 import event_pb2
from streammesh.cli.demo_processing import ProcessingReport, run_processing_demo
from streammesh.client import GatewayClient

__all__ = ["DemoReport", "run_demo"]


@dataclass(frozen=True)
class DemoReport:
    username: str
    events: int
    batches: int
    publish_seconds: float
    stored_after_seconds: float
    query_seconds: float
    keys: int
    order_kept: bool
    processing: ProcessingReport

    def lines(self) -> list[str]:
        rate = self.events / self.publish_seconds if self.publish_seconds else 0.0
        return [
            f"user            {self.username} (password + TOTP, token issued)",
            f"published       {self.events} events in {self.batches} batches, "
            f"acknowledged in {self.publish_seconds:.2f}s ({rate:,.0f} events/s)",
            f"stored          all {self.events} within {self.stored_after_seconds:.2f}s of the last ack",
            f"queried back    {self.events} events in {self.query_seconds:.2f}s, each exactly once",
            f"per-key order   {'kept' if self.order_kept else 'BROKEN'} across {self.keys} keys",
            *self.processing.lines(),
        ]


def _make_events(run_id: str, count: int, keys: int) -> list[event_pb2.Event]:
    events = []
    for i in range(count):
        key = f"sensor-{i % keys}"
        events.append(
            event_pb2.Event(
                id=str(uuid.uuid4()),
                key=key,
                type=f"demo.{run_id}",
                payload=json.dumps(
                    {"seq": i // keys, "reading": round(20 + (i % 97) / 10, 1)}
                ).encode(),
                content_type="application/json",
                attributes={"source": "streammesh-demo"},
            )
        )
    return events


async def _batched(
    events: list[event_pb2.Event], size: int
) -> AsyncIterator[list[event_pb2.Event]]:
    for start in range(0, len(events), size):
        yield events[start : start + size]


CreateUser = Callable[[str, str, list[str]], Awaitable[object]]
"""Creates an account with roles (the demo uses the operator path; sign-up grants no roles)."""


async def run_demo(
    client: GatewayClient,
    *,
    create_user: CreateUser,
    events: int = 5000,
    batch_size: int = 500,
    keys: int = 16,
    store_timeout: float = 120.0,
    say: Callable[[str], None] = print,
) -> DemoReport:
    run_id = secrets.token_hex(4)
    username = f"demo-{run_id}"
    password = secrets.token_urlsafe(18)

    say(f"creating {username} with roles producer, analyst, rule-admin (operator certificate)")
    await create_user(username, password, ["producer", "analyst", "rule-admin"])
    enrolment = await client.begin_totp(username, password)
    totp = pyotp.TOTP(enrolment.secret)
    recovery_codes = await client.confirm_totp(username, password, totp.now())
    say(f"TOTP enrolled ({len(recovery_codes)} recovery codes issued)")
    challenge = await client.start_login(username, password)
    say("password accepted; answering the MFA challenge with a TOTP code")
    # Confirming spent this 30 s step's code (a code is accepted once); the next step's code is
    # within the one step of drift auth allows, so the demo need not wait for the clock.
    tokens = await client.complete_login(challenge, totp_code=totp.at(time.time() + 30))
    say(f"token issued (roles: {', '.join(tokens.roles)})")

    batch = _make_events(run_id, events, keys)
    say(f"publishing {events} events in batches of {batch_size}")
    started = time.perf_counter()
    acked = 0
    batches = 0
    async for ack in client.publish(_batched(batch, batch_size), timeout=120):
        acked += ack.accepted
        batches += 1
    publish_seconds = time.perf_counter() - started
    if acked != events:
        raise RuntimeError(f"gateway acknowledged {acked} of {events} events")

    event_filter = event_pb2.EventFilter(type=f"demo.{run_id}")
    acked_at = time.perf_counter()
    stored = 0
    while stored < events:
        stored = await client.count(event_filter)
        if stored >= events:
            break
        if time.perf_counter() - acked_at > store_timeout:
            raise RuntimeError(
                f"only {stored} of {events} events stored after {store_timeout:.0f}s"
            )
        await asyncio.sleep(0.05)
    stored_after = time.perf_counter() - acked_at

    started = time.perf_counter()
    seen: dict[str, list[int]] = {}
    ids = set()
    async for stored_event in client.query_all(event_filter):
        ids.add(stored_event.event.id)
        seen.setdefault(stored_event.event.key, []).append(
            json.loads(stored_event.event.payload)["seq"]
        )
    query_seconds = time.perf_counter() - started
    expected_ids = {e.id for e in batch}
    if ids != expected_ids:
        raise RuntimeError(f"query returned {len(ids)} distinct events, expected {events}")
    order_kept = all(seqs == sorted(seqs) for seqs in seen.values())
    processing = await run_processing_demo(client, run_id, say=say)
    return DemoReport(
        username=username,
        events=events,
        batches=batches,
        publish_seconds=publish_seconds,
        stored_after_seconds=stored_after,
        query_seconds=query_seconds,
        keys=len(seen),
        order_kept=order_kept,
        processing=processing,
    )
