"""Partition ownership: each partition is worked on by one processor at a time.

A consumer group alone hands the entries of a partition to whichever consumer reads first, so two
processors could store events of one key at the same time and per-key order would break on
scale-out and failover. With this protocol a processor reads, stores, acknowledges, reclaims and
trims only the partitions it holds a lease on. Keys (see `streammesh.streams`):

- `<prefix>:members`: sorted set, consumer name -> expiry (Redis clock, ms);
- `<prefix>:lease:{<prefix>:p<n>}`: string, the owner's consumer name, with a PX expiry of
  `lease_ttl`;
- `<prefix>:epoch:{<prefix>:p<n>}`: integer, the partition's lease epoch (no expiry): ACQUIRE increments
  it whenever a consumer newly takes the partition, and the engine's outputs and checkpoints are
  fenced in storage by it (docs/processor-checkpoints.md).

Membership. Every `heartbeat` a processor runs HEARTBEAT: ZADD itself with expiry now + lease_ttl,
drop the members whose expiry has passed, and read the rest. A processor that stops heartbeating
drops out after one lease TTL. Time comes from Redis (TIME), so host clocks do not matter.

Assignment. `assign(partitions, members)` is a pure function of the member set. Processors that
see the same members therefore compute the same owner for every partition. Loads differ by at
most one, and each partition prefers its rendezvous-hash winner, so few partitions move when a
member joins or leaves.

Leases. Lua scripts run against the lease of partition n (and only keys of n's hash tag):
- ACQUIRE sets the lease if it is absent, or extends it if it already names us. A live lease is
  never taken from its owner: a partition moves only after the owner releases it or the lease expires.
  It returns the partition's lease epoch, incremented when the lease was absent (or named us
  without this process holding it: a restart under the same name), 0 when refused;
- RENEW runs on every heartbeat for every lease we hold. It extends the lease only if it still names
  us (compare-and-set). If it answers 0, the partition is dropped at once;
- RELEASE deletes the lease only if it names us. The worker releases a partition at a round
  boundary, when nothing of that partition is in flight, after the assignment has moved it
  elsewhere. On a graceful stop it releases every lease;
- ACK runs XACK only while the lease names us (fencing), and in the same step forgets the
  entry's field in the hash `forget` names, which the worker sets to the failed-attempt counts of
  delivery (`delivery/dead_letters.py`). The acks of one store call across partitions go to
  Redis in one pipeline (`ack_many`): still one script, and one lease check, per partition.

A crashed processor never releases its leases. They expire after lease_ttl, and then the
processors that the assignment names acquire them.

Local deadline. A successful acquire or renew sent at local time t is trusted until
t + lease_ttl * (1 - SAFETY). The Redis key lives at least until t + lease_ttl, so the local view
ends first. The margin (SAFETY of the TTL) covers clock-rate drift and the gap between a check and
the call it guards. The worker checks `holds(n)` before it reads n and before each store.

Handover (done by the worker). A processor that acquires n first claims (XCLAIM) every entry of n
that is pending under another consumer. It then processes all pending entries of n in ID order,
and only then reads new entries. After each read of new entries it checks XPENDING. If another
consumer holds entries of n (for example, a blocking read of the previous owner that returned
late), it claims them and works through the pending entries first again.

Invariants:
1. At most one consumer name is in lease n at any instant. The lease is SET only when absent,
   and every other write is a compare-and-set.
2. A processor starts work on n only before its local deadline, and that deadline comes before
   lease n can expire in Redis. So no other processor can hold n at the same time.
3. Only the current lease holder acknowledges an entry of n.
4. n is stored in ID order. The owner finishes all pending entries of n in ID order before new
   ones. The previous owner cannot acknowledge an unfinished entry (3), so that entry stays
   pending, and the new owner stores it again before anything newer. The idempotent store turns
   the repeat into a no-op.

Fencing at storage. Every StoreEvents call carries our epoch of each partition in it, and
storage refuses one below the highest it has committed for that partition (services/storage/
event_fences.py), as it refuses the engine's outputs. So a process paused between `holds()` and
its store for longer than the margin, or a call still in flight when the lease is lost, cannot
store after the new owner did: storage answers FAILED_PRECONDITION (STALE_LEASE_EPOCH) with
nothing written, and the worker drops the partition (`fenced_out`) without acknowledging,
counting or dead-lettering anything. Such a call committed *before* the new owner's first store
is harmless by (4): it repeats an entry that the new owner stores again, in order.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterPipeline
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError

from streammesh.backlog import entry_weight
from streammesh.entries import Entry
from streammesh.mesh.tasks import raise_if_cancelled, wait_event
from streammesh.streams import StreamLayout

__all__ = ["ACK_SCRIPT", "SAFETY", "PartitionOwnership", "assign", "epoch_key"]

log = logging.getLogger(__name__)

SAFETY = 0.2
"""Share of the lease TTL by which the local deadline precedes the lease's expiry in Redis."""

_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], 2 * ttl)
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""

_ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if holder == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  -- A new owner: the partition's lease epoch grows (storage fences the older owners with it).
  return redis.call('INCR', KEYS[2])
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  local epoch = tonumber(redis.call('GET', KEYS[2]) or '0')
  -- ARGV[3] '0': the lease names us but this life of the process did not hold it (a restart
  -- under the same consumer name): a new owner too.
  if epoch == 0 or ARGV[3] == '0' then
    epoch = redis.call('INCR', KEYS[2])
  end
  return epoch
end
return 0
"""

_RAISE_EPOCH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local epoch = tonumber(redis.call('GET', KEYS[2]) or '0')
if epoch < tonumber(ARGV[2]) then
  redis.call('SET', KEYS[2], ARGV[2])
  return tonumber(ARGV[2])
end
return epoch
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

ACK_SCRIPT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return -1
end
local ids, acked, events, bytes = {}, 0, 0, 0
for i = 3, #ARGV, 3 do
  ids[#ids + 1] = ARGV[i]
  -- Only an id XACK took out of the pending list counts: acknowledged twice, it is
  -- subtracted once.
  if redis.call('XACK', KEYS[2], ARGV[2], ARGV[i]) == 1 then
    acked = acked + 1
    events = events + tonumber(ARGV[i + 1])
    bytes = bytes + tonumber(ARGV[i + 2])
  end
end
if KEYS[4] then
  -- In slices: unpack() takes at most about 8000 values (LUAI_MAXCSTACK), fewer than a
  -- group may hold.
  for i = 1, #ids, 1000 do
    redis.call('HDEL', KEYS[4], unpack(ids, i, math.min(i + 999, #ids)))
  end
end
-- Integers only (a Lua number turned into a string could read "-0" or "1e+15", which
-- HINCRBY refuses), never below zero.
for field, amount in pairs({events = events, bytes = bytes}) do
  if amount > 0 then
    if redis.call('HINCRBY', KEYS[3], field, string.format('%d', -amount)) < 0 then
      redis.call('HSET', KEYS[3], field, 0)
    end
  end
end
return acked
"""
"""KEYS: lease, stream, backlog counters, and the hash to forget the entries in (optional);
ARGV: consumer, group, then id, events, bytes for each entry. -1 when the lease names another
consumer (nothing changed), else how many entries XACK took out of the pending list."""


def epoch_key(layout: StreamLayout, partition: int) -> str:
    """Partition n's lease epoch counter, `<prefix>:epoch:{<prefix>:p<n>}`: the partition's
    hash tag, as the ACQUIRE script touches it with the lease."""
    return layout.partition_key("epoch", partition)


async def _queue(pipe: Any, script: AsyncScript, keys: list[str], args: list[Any]) -> None:
    """Queue a script call in a pipeline. redis-py's cluster pipeline refuses EVALSHA (and so
    Script objects), so on a Redis Cluster the script's text goes with EVAL, which Redis
    caches by its SHA as well."""
    if isinstance(pipe, ClusterPipeline):
        pipe.eval(cast(str, script.script), len(keys), *keys, *args)
    else:
        await script(keys=keys, args=args, client=pipe)


def _rank(member: str, partition: int) -> bytes:
    return hashlib.blake2b(f"{partition}\x00{member}".encode(), digest_size=8).digest()


def assign(partitions: int, members: Iterable[str]) -> dict[int, str]:
    """The owner of each partition for this member set, the same for every caller.

    Each member gets floor(P/M) or ceil(P/M) partitions (the first P mod M members by name get
    the extra one). Partitions in turn go to the highest-ranked member (rendezvous hash of
    partition and member) that still has room.
    """
    ordered = sorted(set(members))
    if not ordered:
        return {}
    base, extra = divmod(partitions, len(ordered))
    room = {member: base + (index < extra) for index, member in enumerate(ordered)}
    owners: dict[int, str] = {}
    for partition in range(partitions):
        for member in sorted(ordered, key=lambda m: _rank(m, partition), reverse=True):
            if room[member] > 0:
                room[member] -= 1
                owners[partition] = member
                break
    return owners


class PartitionOwnership:
    """This processor's view of membership and of the leases it holds (see the module doc).

    `run()` heartbeats in the background (membership, renewals, the desired set); the worker calls
    `acquire`, `release` and `ack` between and during its rounds, and `leave` on a graceful stop.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        layout: StreamLayout,
        consumer: str,
        *,
        lease_ttl_ms: int = 10_000,
        heartbeat_ms: int = 2_000,
        forget: Callable[[int], str] | None = None,
    ) -> None:
        """`forget(partition)` names a hash whose fields, named by entry id, the fenced ack
        deletes with the XACK (the worker passes delivery's failed-attempt counts); None for
        none."""
        if not 0 < heartbeat_ms * 2 <= lease_ttl_ms:
            raise ValueError("heartbeat_ms must be positive and at most half of lease_ttl_ms")
        self._client = client
        self._layout = layout
        self._consumer = consumer
        self._ttl_ms = lease_ttl_ms
        self._heartbeat_s = heartbeat_ms / 1000
        self._trusted_s = lease_ttl_ms / 1000 * (1 - SAFETY)
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._raise_epoch = client.register_script(_RAISE_EPOCH)
        self._ack = client.register_script(ACK_SCRIPT)
        self._forget = forget
        # partition -> (local deadline, generation); the generation tells a renewal's answer
        # apart from a release + re-acquire that happened while it was on the wire.
        self._leases: dict[int, tuple[float, int]] = {}
        self._epochs: dict[int, int] = {}
        # partition -> the fence storage refused us with (fenced_out): a later acquire moves
        # the epoch past it (Redis lost its counter) instead of being refused again.
        self._floors: dict[int, int] = {}
        self._generation = 0
        self._members: tuple[str, ...] = ()
        self._desired: frozenset[int] = frozenset()
        self._beaten = asyncio.Event()

    @property
    def members(self) -> tuple[str, ...]:
        """Live processors as of the last heartbeat, sorted."""
        return self._members

    @property
    def desired(self) -> frozenset[int]:
        """The partitions the assignment gives us for the members seen at the last heartbeat."""
        return self._desired

    def held(self) -> frozenset[int]:
        """Partitions whose lease we hold and still trust locally."""
        now = time.monotonic()
        return frozenset(p for p, (deadline, _) in self._leases.items() if deadline > now)

    def holds(self, partition: int) -> bool:
        """Whether we may start work on `partition` now (checked before each read and store)."""
        lease = self._leases.get(partition)
        return lease is not None and lease[0] > time.monotonic()

    def drop(self, partition: int, reason: str) -> None:
        """Stop trusting a lease at once (renewal refused, fenced ack refused)."""
        if self._leases.pop(partition, None) is not None:
            log.warning("lost partition %d: %s", partition, reason)

    def fenced_out(self, partition: int, stored_epoch: int, reason: str) -> None:
        """Storage refused our store of the partition: its fence (`stored_epoch`) is above our
        epoch. Drop the partition now. If we acquire it again and get an epoch not above that
        fence (Redis lost its epoch counter: a restart without its data), the epoch is moved
        past it then, under our lease (`acquire`)."""
        self._floors[partition] = max(self._floors.get(partition, 0), stored_epoch)
        self._leases.pop(partition, None)
        log.warning("lost partition %d: fenced out by storage: %s", partition, reason)

    async def wait_first_heartbeat(self, timeout: float) -> None:
        await wait_event(self._beaten, timeout)

    async def heartbeat(self) -> None:
        """Register as alive, renew every held lease, and recompute the desired partitions."""
        renewing = sorted(self._leases.items())
        started = time.monotonic()
        async with self._client.pipeline(transaction=False) as pipe:
            await _queue(
                pipe, self._heartbeat, [self._layout.members_key], [self._consumer, self._ttl_ms]
            )
            for partition, _ in renewing:
                await _queue(
                    pipe,
                    self._renew,
                    [self._layout.lease_key(partition)],
                    [self._consumer, self._ttl_ms],
                )
            replies: list[Any] = await pipe.execute()
        for (partition, (_, generation)), renewed in zip(renewing, replies[1:], strict=True):
            current = self._leases.get(partition)
            if current is None or current[1] != generation:
                continue  # released (and maybe re-acquired) while the renewal was on the wire
            if renewed:
                self._leases[partition] = (started + self._trusted_s, generation)
            else:
                self.drop(partition, "the lease expired or names another processor")
        members = tuple(sorted(m.decode() if isinstance(m, bytes) else m for m in replies[0]))
        if members != self._members:
            log.info("processors alive: %s", ", ".join(members))
            self._members = members
            owners = assign(self._layout.partitions, members)
            self._desired = frozenset(p for p, m in owners.items() if m == self._consumer)
        self._beaten.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Heartbeat every interval until `stop` is set; a failed heartbeat is retried on the
        next tick (meanwhile the local deadlines run out on their own)."""
        while not stop.is_set():
            raise_if_cancelled()
            try:
                await self.heartbeat()
            except (RedisError, OSError) as error:
                log.warning("heartbeat failed: %s", error)
            await wait_event(stop, self._heartbeat_s)

    async def acquire(self, partitions: Iterable[int]) -> list[int]:
        """Try to take free (absent or expired) leases; returns the partitions now held. Each
        one newly taken gets the next lease epoch of its partition (`epoch`)."""
        wanted = sorted(partitions)
        if not wanted:
            return []
        started = time.monotonic()
        async with self._client.pipeline(transaction=False) as pipe:
            for partition in wanted:
                await _queue(
                    pipe,
                    self._acquire,
                    [self._layout.lease_key(partition), epoch_key(self._layout, partition)],
                    [self._consumer, self._ttl_ms, int(partition in self._leases)],
                )
            replies: list[Any] = await pipe.execute()
        acquired = [(p, int(epoch)) for p, epoch in zip(wanted, replies, strict=True) if epoch]
        for index, (partition, epoch) in enumerate(acquired):
            floor = self._floors.pop(partition, 0)
            if epoch <= floor:
                # Only under the lease just taken (raise_epoch is a compare-and-set on it).
                raised = int(
                    await self._raise_epoch(
                        keys=[
                            self._layout.lease_key(partition),
                            epoch_key(self._layout, partition),
                        ],
                        args=[self._consumer, floor + 1],
                    )
                )
                log.warning(
                    "partition %d: lease epoch moved from %d to %d (storage's fence)",
                    partition,
                    epoch,
                    raised,
                )
                acquired[index] = (partition, raised)
        acquired = [(p, epoch) for p, epoch in acquired if epoch]
        for partition, epoch in acquired:
            self._generation += 1
            self._leases[partition] = (started + self._trusted_s, self._generation)
            self._epochs[partition] = epoch
        if acquired:
            log.info("acquired partitions %s", acquired)
        return [partition for partition, _ in acquired]

    def epoch(self, partition: int) -> int:
        """The lease epoch of a partition we hold (0 for one we do not): it grows with every
        new owner, and storage fences the engine outputs of older ones with it."""
        return self._epochs.get(partition, 0) if partition in self._leases else 0

    def last_epoch(self, partition: int) -> int:
        """The lease epoch we last held the partition under, held still or not (0: never):
        what our stores are fenced by, so that one started just as the lease was lost is
        fenced too."""
        return self._epochs.get(partition, 0)

    async def raise_epoch(self, partition: int, at_least: int) -> int:
        """Move the partition's epoch up to `at_least` while we hold its lease (Redis lost its
        counter, and storage's fence is higher); the epoch after the call, 0 if not held."""
        epoch = int(
            await self._raise_epoch(
                keys=[self._layout.lease_key(partition), epoch_key(self._layout, partition)],
                args=[self._consumer, at_least],
            )
        )
        if epoch and partition in self._leases:
            self._epochs[partition] = epoch
        return epoch

    async def release(self, partitions: Iterable[int]) -> None:
        """Give leases back (only those still naming us); call with nothing of them in flight."""
        freed = sorted(partitions)
        if not freed:
            return
        for partition in freed:
            self._leases.pop(partition, None)
        async with self._client.pipeline(transaction=False) as pipe:
            for partition in freed:
                await _queue(
                    pipe, self._release, [self._layout.lease_key(partition)], [self._consumer]
                )
            await pipe.execute()
        log.info("released partitions %s", freed)

    async def ack(self, partition: int, *entries: Entry) -> bool:
        """XACK the entries (and forget them in the `forget` hash, and subtract their weight
        from the backlog counters) only while the lease names us, all in one script; False (and
        the partition dropped) otherwise."""
        if not entries:
            return True
        keys, args = self._ack_call(partition, entries)
        return self._acked(partition, await self._ack(keys=keys, args=args))

    async def ack_many(self, acks: Sequence[tuple[int, Sequence[Entry]]]) -> list[bool]:
        """`ack` for several partitions in one round trip, a result per item of `acks`. Each
        partition keeps its own ACK script, which checks its own lease atomically; the scripts
        are pipelined, not one script or a transaction over several partitions, so that no
        command spans two partitions' keys (a Redis Cluster puts them apart). A failed reply is
        raised after all the others were taken in (refused leases dropped)."""
        calls = [(index, partition) for index, (partition, entries) in enumerate(acks) if entries]
        if len(calls) < 2:  # one script call at most: no pipeline needed
            return [await self.ack(partition, *entries) for partition, entries in acks]
        results = [True] * len(acks)
        requests = [self._ack_call(partition, acks[index][1]) for index, partition in calls]
        async with self._client.pipeline(transaction=False) as pipe:
            for keys, args in requests:
                if isinstance(pipe, ClusterPipeline):
                    pipe.eval(ACK_SCRIPT, len(keys), *keys, *args)  # see _queue
                else:
                    # EVALSHA itself, not the Script: a pipeline holding Scripts first asks
                    # SCRIPT EXISTS, one round trip more.
                    pipe.evalsha(self._ack.sha, len(keys), *keys, *args)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        failure: BaseException | None = None
        for (index, partition), (keys, args), reply in zip(calls, requests, replies, strict=True):
            if isinstance(reply, NoScriptError):
                # Redis lost its scripts (a restart, SCRIPT FLUSH), so this ack did not run:
                # the Script loads it and runs it again.
                try:
                    reply = await self._ack(keys=keys, args=args)
                except (RedisError, OSError) as error:
                    reply = error
            if isinstance(reply, BaseException):
                failure = failure or reply
                continue
            results[index] = self._acked(partition, reply)
        if failure is not None:
            raise failure
        return results

    def _ack_call(
        self, partition: int, entries: Sequence[Entry]
    ) -> tuple[list[str], list[bytes | str | int]]:
        """The ACK script's keys and arguments for the partition's entries."""
        args: list[bytes | str | int] = [self._consumer, self._layout.group]
        for entry_id, fields in entries:
            args.append(entry_id)
            args.extend(entry_weight(fields))
        keys = [
            self._layout.lease_key(partition),
            self._layout.stream(partition),
            self._layout.unacked_key(partition),
        ]
        if self._forget is not None:
            keys.append(self._forget(partition))
        return keys, args

    def _acked(self, partition: int, reply: Any) -> bool:
        if reply == -1:
            self.drop(partition, "the lease names another processor at acknowledgement")
            return False
        return True

    async def leave(self) -> None:
        """Graceful stop: release every lease and leave the member set, so the others take
        over at their next heartbeat instead of after a lease TTL."""
        await self.release(list(self._leases))
        await self._client.zrem(self._layout.members_key, self._consumer)
        self._members = ()
        self._desired = frozenset()

    def describe(self) -> dict[str, Sequence[object]]:
        """For logs and tests: members, desired and held partitions."""
        return {
            "members": self._members,
            "desired": sorted(self._desired),
            "held": sorted(self.held()),
        }
