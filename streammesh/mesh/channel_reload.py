"""Certificate reload for a mesh client: gRPC Python cannot change the credentials of a
channel (grpc/grpc#41779), so the client builds new channels and swaps them in.

Every `interval` seconds the reloader stats the client's TLS files (three stat calls); when one
changed (a rename gives a new inode), it reads a consistent snapshot (streammesh.mesh.tls_reload),
builds a channel per replica with the new material, waits until as many of them are READY as
old ones were (at most `ready_timeout`), then swaps them in (ReplicaChannel.swap): new calls go
to the new channels, calls and streams on the old ones finish there, and the old channels close
once drained. New channels that connect nowhere while the old ones did (the new material is
not trusted yet) are dropped, the old ones kept, and the files read again at the next poll (a
warning each time).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc

from streammesh.mesh.replicas import ReplicaChannel
from streammesh.mesh.tls_reload import MaterialSnapshot, Stamp, file_stamp, read_snapshot

__all__ = ["READY_TIMEOUT_SECONDS", "ChannelReloader", "channel_credentials"]

log = logging.getLogger(__name__)

READY_TIMEOUT_SECONDS = 5.0
"""How long new channels get to connect before the swap goes ahead with those that did."""

Build = Callable[[grpc.ChannelCredentials], list[grpc.aio.Channel]]


def channel_credentials(snapshot: MaterialSnapshot) -> grpc.ChannelCredentials:
    """Channel credentials of one snapshot of the files."""
    return grpc.ssl_channel_credentials(
        root_certificates=snapshot.ca,
        private_key=snapshot.private_key,
        certificate_chain=snapshot.certificate_chain,
    )


def _ready(channels: Sequence[grpc.aio.Channel]) -> int:
    ready = grpc.ChannelConnectivity.READY
    return sum(channel.get_state(try_to_connect=True) == ready for channel in channels)


class ChannelReloader:
    """Follows the TLS files of one mesh client (`paths`: CA bundle, then certificate and key
    when it has them) and swaps its channels when they change."""

    def __init__(
        self,
        name: str,
        paths: Sequence[Path],
        channel: ReplicaChannel,
        build: Build,
        *,
        stamp: Stamp,
        interval: float,
        ready_timeout: float = READY_TIMEOUT_SECONDS,
    ) -> None:
        self._name = name
        self._paths = tuple(paths)
        self._channel = channel
        self._build = build
        self._stamp = stamp
        self._interval = interval
        self._ready_timeout = ready_timeout
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self.swaps = 0
        """Channel swaps since start."""

    def start(self) -> None:
        """Poll in a task of the running loop until `close`."""
        self._task = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.check()
            except (OSError, ValueError) as error:
                log.warning("%s: TLS material not reloaded: %s", self._name, error)
            except Exception:
                # Whatever the files hold (an encrypted key, an unsupported algorithm), the
                # poll goes on: a dead poll would end rotation without a word.
                log.exception("%s: TLS material not reloaded", self._name)

    async def check(self) -> bool:
        """Swap the channels now if the files changed (and the new channels connect);
        whether they were swapped."""
        async with self._lock:
            if file_stamp(self._paths) == self._stamp:
                return False
            snapshot = read_snapshot(*self._paths)
            if snapshot is None:  # between a rotation's renames: the next poll reads again
                return False
            channels = self._build(channel_credentials(snapshot))
            try:
                connected = await self._connected(channels)
            except BaseException:
                # Closed (cancelled) while waiting: the new channels are nobody's.
                await asyncio.gather(*(channel.close(None) for channel in channels))
                raise
            if not connected:
                await asyncio.gather(*(channel.close(None) for channel in channels))
                log.warning(
                    "%s: channels with the new TLS material did not connect (refused, or not "
                    "within %.1fs); keeping the old ones",
                    self._name,
                    self._ready_timeout,
                )
                return False
            generation = self._channel.swap(channels)
            self._stamp = snapshot.stamp
            self.swaps += 1
            log.info(
                "%s: channels swapped for new TLS material (%d)", self._name, generation.number
            )
            return True

    async def _connected(self, channels: Sequence[grpc.aio.Channel]) -> bool:
        """Whether to swap: as many new channels READY as old ones are, or, after the
        timeout, any new one READY (or no old one either). No: every new channel failed
        (the handshake was refused) while an old one is READY."""
        wanted = _ready(self._channel.channels)
        deadline = time.monotonic() + self._ready_timeout
        failed = grpc.ChannelConnectivity.TRANSIENT_FAILURE
        while (ready := _ready(channels)) < wanted:
            left = deadline - time.monotonic()
            if left <= 0:
                return ready > 0
            if ready == 0 and all(channel.get_state() == failed for channel in channels):
                return False
            changes = [
                asyncio.ensure_future(channel.wait_for_state_change(channel.get_state()))
                for channel in channels
            ]
            try:
                await asyncio.wait(changes, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for change in changes:
                    change.cancel()
        return True

    async def close(self) -> None:
        """Stop polling."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
