"""One channel per replica behind one channel-shaped object: the mesh client's picker.

`ReplicaChannel` is a grpc.aio.Channel, so generated stubs and hand-built multi-callables use it
as they would any channel. Every call picks one replica's channel:

- Replicas the `Ejector` has taken out are skipped; of the others, the ones whose channel is
  READY come first (then IDLE, CONNECTING, and a failing one only when nothing else is left),
  and of those the one with the fewest unary attempts in flight (round robin among equals): a
  replica that answers slowly, though within the deadlines, holds more calls open and so gets
  fewer new ones. A replica whose health is NOT_SERVING has no ready connection in its own
  health-checked channel, so it gets no calls either.
- Unary calls are retried here, across replicas, not by gRPC inside one channel (a channel of
  one replica would retry on the replica that just failed): a method the protos declare safe
  to retry (derived_config.retryable_codes) is tried again on UNAVAILABLE on another replica,
  with gRFC A6's rules kept: at most `max_attempts` attempts in all, a jittered exponential
  backoff, one deadline covering every attempt, and one `RetryBudget` (A6 retryThrottling) for
  every unary call of the client, so a failing service sees about the offered load.
- Streams pick their replica once; gRPC's own retry policy (in that replica's channel) replays
  them on that replica until their first response, bounded by that channel's throttling. How
  a stream ends feeds the ejector too (OK and UNAVAILABLE only).
- Every unary call takes a slot of the client's ConcurrencyLimit for all its attempts.
- Every call's timeout is `deadlines.outbound_timeout` of its own (the caller's, else the
  method's default): never past the deadline of the call being handled. With
  `RetryPolicy.attempt_timeout_seconds` an attempt of a retried method gets at most that long,
  and one cut short by it is retried on another replica (a silent replica costs no call).
- Each unary attempt's status feeds the ejector (which counts outages only).
- The channels can be swapped for new ones (`swap`, after a TLS rotation): each attempt and
  each new stream takes the current generation of channels; calls already running finish on
  theirs, whose channels close once drained (streammesh.mesh.generations).

With a single replica (one host:port or dns:/// target, which gRPC itself balances over) the
same object serves one channel whose service config keeps gRPC's own retries; the picker then
never retries, so attempts are still bounded once.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from functools import partial
from typing import Any

import grpc

from streammesh.mesh.deadlines import outbound_timeout
from streammesh.mesh.derived_config import RetryPolicy
from streammesh.mesh.ejection import Ejector
from streammesh.mesh.generations import ChannelGeneration, MethodKey, RetiredGenerations
from streammesh.mesh.limits import ConcurrencyLimit

__all__ = ["ReplicaChannel", "RetryBudget"]

_State = grpc.ChannelConnectivity
_RANK = {
    _State.READY: 0,
    _State.IDLE: 1,
    _State.CONNECTING: 2,
    _State.TRANSIENT_FAILURE: 3,
    _State.SHUTDOWN: 4,
}


class RetryBudget:
    """gRFC A6 retry throttling for calls retried outside gRPC: a failure with a retryable
    code costs a token, a success gives back `token_ratio`; no retry below half the bucket."""

    def __init__(self, retry: RetryPolicy) -> None:
        self.max_tokens = float(retry.throttle_max_tokens)
        self.token_ratio = retry.throttle_token_ratio
        self.tokens = self.max_tokens

    def failed(self) -> None:
        """An attempt ended with a retryable code."""
        self.tokens = max(0.0, self.tokens - 1)

    def succeeded(self) -> None:
        """An attempt succeeded."""
        self.tokens = min(self.max_tokens, self.tokens + self.token_ratio)

    def allows_retry(self) -> bool:
        """Whether a retry may be sent now."""
        return self.tokens > self.max_tokens / 2


class _Calls:
    """What every call of one ReplicaChannel shares."""

    def __init__(
        self,
        generation: ChannelGeneration,
        ejector: Ejector,
        limit: ConcurrencyLimit,
        retry: RetryPolicy,
        budget: RetryBudget | None,
    ) -> None:
        self.generation = generation
        """The channels new calls and attempts go to."""
        self.ejector = ejector
        self.limit = limit
        self.retry = retry
        self.budget = budget
        """None: the picker never retries (gRPC retries inside the one channel)."""
        self.in_flight = [0] * len(generation.channels)
        """Unary attempts in flight on each replica."""
        self._turn = 0
        self._reading: set[asyncio.Future[grpc.StatusCode]] = set()

    def pick(self, tried: set[int], generation: ChannelGeneration) -> int:
        """The replica for the next attempt, avoiding those already `tried` if others are in."""
        channels = generation.channels
        admitted = self.ejector.admitted() or list(range(len(channels)))
        fresh = [index for index in admitted if index not in tried] or admitted
        ranks = {i: _RANK[channels[i].get_state(try_to_connect=True)] for i in fresh}
        best = min(ranks.values())
        pool = [index for index in fresh if ranks[index] == best]
        least = min(self.in_flight[index] for index in pool)
        pool = [index for index in pool if self.in_flight[index] == least]
        self._turn += 1
        return pool[self._turn % len(pool)]

    def stream_ended(self, index: int, call: grpc.aio.Call) -> None:
        """Count how a stream on replica `index` ended (its status is read in a task: the
        done callback cannot await)."""
        task = asyncio.ensure_future(call.code())
        self._reading.add(task)
        task.add_done_callback(partial(self._stream_status, index))

    def _stream_status(self, index: int, task: asyncio.Future[grpc.StatusCode]) -> None:
        self._reading.discard(task)
        if task.cancelled() or task.exception() is not None:
            return
        code = task.result()
        # Only UNAVAILABLE: a stream's DEADLINE_EXCEEDED is its caller's chosen lifetime running
        # out (a subscription), not a slow replica.
        if code in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE):
            self.ejector.record(index, code)

    def backoff(self, attempt: int) -> float:
        """A6's jittered wait before attempt `attempt + 1`."""
        retry = self.retry
        bound = min(
            retry.initial_backoff_seconds * retry.backoff_multiplier ** (attempt - 1),
            retry.max_backoff_seconds,
        )
        return random.uniform(0, bound)  # noqa: S311 (jitter, not a secret)


class _UnaryCall:
    """One unary call across attempts. Like grpc.aio's own call object it starts at once, in a
    task of its own; awaiting it waits for that task, and cancelling the awaiting task (or
    calling `cancel()`) cancels the attempt in flight and every later one."""

    def __init__(
        self,
        calls: _Calls,
        method: MethodKey,
        codes: frozenset[grpc.StatusCode],
        request: Any,
        timeout: float | None,
        options: dict[str, Any],
    ) -> None:
        self._calls = calls
        self._method = method
        self._codes = codes
        self._request = request
        self._timeout = timeout
        self._options = options
        self._attempt: grpc.aio.UnaryUnaryCall | None = None
        self._task = asyncio.ensure_future(self._run())

    def __await__(self) -> Generator[Any, None, Any]:
        return self._task.__await__()

    def cancel(self) -> bool:
        """Cancel the call (the attempt in flight and any retry)."""
        return self._task.cancel()

    def cancelled(self) -> bool:
        """Whether the call was cancelled."""
        return self._task.cancelled()

    def done(self) -> bool:
        """Whether the call ended."""
        return self._task.done()

    async def initial_metadata(self) -> Any:
        """The last attempt's initial metadata."""
        return await self._last().initial_metadata()

    async def trailing_metadata(self) -> Any:
        """The last attempt's trailing metadata."""
        return await self._last().trailing_metadata()

    async def code(self) -> grpc.StatusCode:
        """The last attempt's status code."""
        code: grpc.StatusCode = await self._last().code()
        return code

    async def details(self) -> str:
        """The last attempt's status message."""
        details: str = await self._last().details()
        return details

    def _last(self) -> grpc.aio.UnaryUnaryCall:
        # Metadata and status are those of the attempt that ended the call.
        if not self._task.done():
            raise grpc.aio.UsageError("await the call before reading its status or metadata")
        if self._attempt is None:
            raise grpc.aio.UsageError("the call ended before any attempt was sent")
        return self._attempt

    async def _run(self) -> Any:
        calls = self._calls
        calls.limit.acquire()
        try:
            return await self._attempts()
        finally:
            calls.limit.release()

    async def _send(self, generation: ChannelGeneration, index: int, timeout: float | None) -> Any:
        """One attempt on replica `index` of `generation`, counted in flight while it runs."""
        in_flight = self._calls.in_flight
        send = generation.multi_callables(self._method)[index]
        self._attempt = send(self._request, timeout=timeout, **self._options)
        in_flight[index] += 1
        generation.enter()
        try:
            return await self._attempt
        finally:
            in_flight[index] -= 1
            generation.leave()

    def _attempt_time(self, left: float | None) -> float | None:
        """The time the next attempt gets: what is left of the deadline, or less when the
        retry policy bounds attempts of a method retried across replicas."""
        bound = self._calls.retry.attempt_timeout_seconds
        if bound is None or self._calls.budget is None or not self._codes:
            return left
        return bound if left is None or bound < left else left

    async def _attempts(self) -> Any:
        calls = self._calls
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        tried: set[int] = set()
        attempt = 1
        while True:
            generation = calls.generation
            index = calls.pick(tried, generation)
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            given = self._attempt_time(left)
            try:
                response = await self._send(generation, index, given)
            except grpc.aio.AioRpcError as error:
                code = error.code()
                calls.ejector.record(index, code, attempt_seconds=given)
                budget = calls.budget
                # An attempt cut short by the attempt timeout (not the call's deadline) is
                # retried as an UNAVAILABLE one would be, on the same methods only.
                cut_short = code == grpc.StatusCode.DEADLINE_EXCEEDED and given != left
                if budget is None or not (code in self._codes or (cut_short and self._codes)):
                    raise
                budget.failed()
                if attempt >= calls.retry.max_attempts:
                    raise
                if not budget.allows_retry():
                    raise
                wait = calls.backoff(attempt)
                if deadline is not None and time.monotonic() + wait >= deadline:
                    raise
                await asyncio.sleep(wait)
                tried.add(index)
                attempt += 1
                continue
            calls.ejector.record(index, grpc.StatusCode.OK)
            if calls.budget is not None:
                calls.budget.succeeded()
            return response


class _UnaryUnary:
    """The multi-callable of one unary method over every replica."""

    def __init__(
        self,
        calls: _Calls,
        method: MethodKey,
        codes: frozenset[grpc.StatusCode],
        default_timeout: float | None,
    ) -> None:
        self._calls = calls
        self._method = method
        self._codes = codes
        self._default_timeout = default_timeout

    def __call__(self, request: Any, *, timeout: float | None = None, **options: Any) -> _UnaryCall:
        # The deadline is read here, in the caller's context, as gRPC starts a call at once.
        own = self._default_timeout if timeout is None else timeout
        return _UnaryCall(
            self._calls, self._method, self._codes, request, outbound_timeout(own), options
        )


class _Streaming:
    """The multi-callable of one streaming method: the call of the replica picked, on the
    current generation of channels, which it keeps until it ends."""

    def __init__(self, calls: _Calls, method: MethodKey) -> None:
        self._calls = calls
        self._method = method

    def __call__(self, *args: Any, timeout: float | None = None, **options: Any) -> Any:
        calls = self._calls
        generation = calls.generation
        index = calls.pick(set(), generation)
        send = generation.multi_callables(self._method)[index]
        call = send(*args, timeout=outbound_timeout(timeout), **options)
        generation.enter()
        call.add_done_callback(generation.leave)
        if len(generation.channels) > 1:
            call.add_done_callback(partial(calls.stream_ended, index))
        return call


def _streaming_method(kind: str) -> Callable[..., _Streaming]:
    """The channel method `kind` (`unary_stream`, ...): that multi-callable of every replica,
    behind one picker."""

    def multi_callable(
        self: ReplicaChannel,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> _Streaming:
        key = (kind, method, request_serializer, response_deserializer, _registered_method)
        return _Streaming(self._calls, key)

    multi_callable.__name__ = kind
    return multi_callable


class ReplicaChannel(grpc.aio.Channel):  # type: ignore[misc]
    """The channels of every replica of one service, as one channel (see the module
    docstring). It owns them: closing it closes them."""

    def __init__(
        self,
        channels: Sequence[grpc.aio.Channel],
        *,
        ejector: Ejector,
        limit: ConcurrencyLimit,
        retry: RetryPolicy,
        retried_codes: Mapping[str, frozenset[grpc.StatusCode]],
        timeouts: Mapping[str, float],
        retry_across_replicas: bool,
    ) -> None:
        if not channels:
            raise ValueError("a ReplicaChannel needs at least one channel")
        budget = RetryBudget(retry) if retry_across_replicas else None
        self._calls = _Calls(ChannelGeneration(channels), ejector, limit, retry, budget)
        self._retried_codes = dict(retried_codes)
        self._timeouts = dict(timeouts)
        self._retired = RetiredGenerations()
        for channel in self.channels:
            channel.get_state(try_to_connect=True)  # connect now, not on the first call

    @property
    def channels(self) -> tuple[grpc.aio.Channel, ...]:
        """The current channel of each replica, in the order of the targets."""
        return self._calls.generation.channels

    @property
    def generation(self) -> ChannelGeneration:
        """The generation of channels new calls go to."""
        return self._calls.generation

    def swap(self, channels: Sequence[grpc.aio.Channel]) -> ChannelGeneration:
        """Send new calls and attempts to `channels` (one per replica, in the same order);
        calls running on the old ones finish there, and the old channels close once the
        last of them ended. Returns the new generation."""
        old = self._calls.generation
        if len(channels) != len(old.channels):
            raise ValueError(f"swap needs {len(old.channels)} channels, got {len(channels)}")
        new = ChannelGeneration(channels, old.number + 1)
        self._calls.generation = new
        self._retired.add(old)
        return new

    @property
    def draining(self) -> int:
        """Old generations whose calls have not all ended yet."""
        return len(self._retired)

    @property
    def ejector(self) -> Ejector:
        """Which replicas are in rotation."""
        return self._calls.ejector

    @property
    def limit(self) -> ConcurrencyLimit:
        """The unary calls in flight and the limit on them."""
        return self._calls.limit

    def unary_unary(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> Any:
        key = ("unary_unary", method, request_serializer, response_deserializer, _registered_method)
        return _UnaryUnary(
            self._calls,
            key,
            self._retried_codes.get(method, frozenset()),
            self._timeouts.get(method),
        )

    unary_stream = _streaming_method("unary_stream")
    stream_unary = _streaming_method("stream_unary")
    stream_stream = _streaming_method("stream_stream")

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        """The best state of any replica's channel (READY when one replica is)."""
        states = [channel.get_state(try_to_connect) for channel in self.channels]
        return min(states, key=_RANK.__getitem__)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        """Return once `get_state()` differs from `last_observed_state`."""
        while self.get_state() == last_observed_state:
            changes = [
                asyncio.ensure_future(channel.wait_for_state_change(channel.get_state()))
                for channel in self.channels
            ]
            try:
                await asyncio.wait(changes, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for change in changes:
                    change.cancel()

    async def channel_ready(self) -> None:
        """Return once some replica's channel is READY."""
        while (state := self.get_state(try_to_connect=True)) != _State.READY:
            await self.wait_for_state_change(state)

    async def close(self, grace: float | None = None) -> None:
        """Close every replica's channel (old generations' too); calls still running get
        `grace` seconds."""
        await self._retired.close(grace)
        await self._calls.generation.close(grace)

    async def __aenter__(self) -> ReplicaChannel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
