"""Holds every packet netfilter queues to it for a fixed time, then lets it through: a one-way
link delay for kernels built without sch_netem (tests/netns.py starts it inside a test's own
network namespace, where an nft rule queues the namespace's outgoing packets to it).

    python -m tests.nfq_delay QUEUE DELAY_MS

Prints "ready" once bound to the queue. On SIGTERM it lets every held packet go at once and
exits, so that removing the delay loses nothing. The delay is constant, so packets leave in
the order they came (a FIFO, as netem keeps it without jitter).
"""

from __future__ import annotations

import collections
import signal
import sys
import threading
import time
from typing import Any

import fnfqueue


class _Held:
    """Packets in arrival order with the time each may leave."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.packets: collections.deque[tuple[float, Any]] = collections.deque()
        self.changed = threading.Condition()
        self.stopping = False


def _release(held: _Held) -> None:
    """Accept each packet when its time comes (all at once when stopping)."""
    with held.changed:
        while True:
            while held.packets and (held.stopping or held.packets[0][0] <= time.monotonic()):
                held.packets.popleft()[1].accept()
            if held.stopping:
                return
            wait = held.packets[0][0] - time.monotonic() if held.packets else None
            held.changed.wait(wait)


def _receive(connection: fnfqueue.Connection, held: _Held) -> None:
    for packet in connection:
        with held.changed:
            held.packets.append((time.monotonic() + held.delay, packet))
            held.changed.notify()


def main() -> None:
    queue, delay = int(sys.argv[1]), float(sys.argv[2]) / 1000
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    # Metadata only: the packet stays in the kernel, the verdict names it by id.
    connection = fnfqueue.Connection(packet_size=8192)
    bound = connection.bind(queue)
    bound.set_mode(0, fnfqueue.COPY_META)
    bound.set_maxlen(100_000)
    held = _Held(delay)
    releaser = threading.Thread(target=_release, args=(held,))
    releaser.start()
    threading.Thread(target=_receive, args=(connection, held), daemon=True).start()
    print("ready", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    # Let everything held go before closing: a verdict after close() is not sent.
    with held.changed:
        held.stopping = True
        held.changed.notify()
    releaser.join()
    connection.close()


if __name__ == "__main__":
    main()
