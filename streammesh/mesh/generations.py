"""One generation of a mesh client's channels: the per-replica channels built from one TLS
material, the calls in flight on them, and their close once drained.

When the material changes, the mesh client builds a new generation and makes it current
(streammesh.mesh.channel_reload); new calls and new attempts go to it, while the calls and
streams already running on the old one finish there. The old generation's channels close when
its last call ended (a stream may keep them open as long as it runs).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import grpc

__all__ = ["ChannelGeneration", "RetiredGenerations"]

MethodKey = tuple[str, str, Any, Any, Any]
"""(channel method kind, method path, request serializer, response deserializer, registered)."""


class ChannelGeneration:
    """Channels to every replica (in the order of the targets), built from one material."""

    def __init__(self, channels: Sequence[grpc.aio.Channel], number: int = 1) -> None:
        if not channels:
            raise ValueError("a channel generation needs at least one channel")
        self.channels = tuple(channels)
        self.number = number
        """1 for the channels a client starts with, then one more per swap."""
        self.in_flight = 0
        """Calls (unary attempts and streams) running on these channels."""
        self._callables: dict[MethodKey, list[Callable[..., Any]]] = {}
        self._retired = False
        self._drained = asyncio.Event()

    def multi_callables(self, key: MethodKey) -> list[Callable[..., Any]]:
        """That method's multi-callable on each replica's channel (made once per generation)."""
        found = self._callables.get(key)
        if found is None:
            kind, *arguments = key
            found = [getattr(channel, kind)(*arguments) for channel in self.channels]
            self._callables[key] = found
        return found

    def enter(self) -> None:
        """A call starts on this generation."""
        self.in_flight += 1

    def leave(self, *_: object) -> None:
        """A call on this generation ended (also a grpc.aio done callback)."""
        self.in_flight -= 1
        if self._retired and self.in_flight <= 0:
            self._drained.set()

    def retire(self) -> None:
        """No new call comes here any more; `drained` is set once the last one ended."""
        self._retired = True
        if self.in_flight <= 0:
            self._drained.set()

    async def close_when_drained(self) -> None:
        """Close the channels once no call runs on them."""
        await self._drained.wait()
        await self.close(None)

    async def close(self, grace: float | None) -> None:
        """Close the channels; calls still running get `grace` seconds (None: cancelled)."""
        await asyncio.gather(*(channel.close(grace) for channel in self.channels))


class RetiredGenerations:
    """Old generations whose calls have not all ended yet; each closes once drained."""

    def __init__(self) -> None:
        self._draining: dict[asyncio.Task[None], ChannelGeneration] = {}

    def add(self, generation: ChannelGeneration) -> None:
        """No new call goes to `generation`; close its channels once its last call ended."""
        generation.retire()
        task = asyncio.ensure_future(generation.close_when_drained())
        self._draining[task] = generation
        task.add_done_callback(partial(self._draining.pop))

    def __len__(self) -> int:
        return len(self._draining)

    async def close(self, grace: float | None) -> None:
        """Close them all now; calls still running get `grace` seconds."""
        draining = dict(self._draining)
        for task in draining:
            task.cancel()
        await asyncio.gather(*draining, return_exceptions=True)
        await asyncio.gather(*(generation.close(grace) for generation in draining.values()))
