"""The processor's view of every tenant's rules and windows, kept fresh by following storage's
definition change log (DefinitionService.ListDefinitionChanges), as ingest follows the schema
changes (services/ingest/schema_cache.py, which says why polling rather than a stream).

Every `poll_interval` the follower asks for the changes after the last change id it saw, reads
each version named (GetDefinition) and parses it with the engine's parser. A new version is
therefore seen within one interval plus two calls: inside the 2 s the API promises at the
default 0.5 s. The cursor moves only past versions it read, so an outage delays changes and
loses none. A fresh follower reads the whole log (it is kept; one small row per version).

Rules are kept by version, as the pattern engine applies versions by activation (a disabled
version stops the older ones); windows by id, the latest version only (the window engine runs
one definition per id; a disabled window is not run).

The worker's engines (`processing/committer.py`) read `version` before each batch and take the
definitions anew (`windows_and_rules`) when it moved, so a change reaches every partition at its
next batch boundary without a restart. `active_tenants` lets the engine skip (not even decode)
the entries of tenants that have nothing to run.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from streammesh.api.common.v1 import definitions_pb2 as common
from streammesh.api.storage.v1 import definitions_pb2 as pb
from streammesh.api.storage.v1 import definitions_pb2_grpc as pb_grpc
from streammesh.definitions.rule_errors import RuleError
from streammesh.definitions.rules import Rule, parse_rule
from streammesh.definitions.window_defs import WindowDef, WindowDefError, parse_window_def

if TYPE_CHECKING:
    DefinitionStub = pb_grpc.DefinitionServiceAsyncStub
else:
    DefinitionStub = pb_grpc.DefinitionServiceStub

__all__ = ["DefinitionFollower", "DefinitionStub", "FollowedWindow"]

log = logging.getLogger(__name__)

_CHANGES_PER_CALL = 500


@dataclass(frozen=True, slots=True)
class FollowedWindow:
    definition: WindowDef
    enabled: bool


class DefinitionFollower:
    def __init__(
        self, stub: DefinitionStub, *, poll_interval: float = 0.5, timeout: float = 5.0
    ) -> None:
        self._stub = stub
        self._interval = poll_interval
        self._timeout = timeout
        self.cursor = 0
        """The last change id applied."""
        self.rules: dict[tuple[str, str, int], Rule] = {}
        """(tenant, rule id, version) -> the rule version."""
        self.windows: dict[tuple[str, str], FollowedWindow] = {}
        """(tenant, window id) -> its latest version."""
        self.version = 0
        """Grows with every change applied (the engines compare it with what they run)."""
        self._active: frozenset[str] = frozenset()
        self.ready = asyncio.Event()
        """Set after the first complete poll (the whole log read once)."""

    def is_ready(self) -> bool:
        """Whether the whole log was read once (the engines wait for it, so that a restarted
        processor never runs its first batches without the definitions)."""
        return self.ready.is_set()

    def windows_and_rules(self) -> tuple[list[WindowDef], list[Rule]]:
        """What every partition's engine runs: the enabled windows, and every rule version
        (disabled ones too: they stop the older versions at their activation)."""
        return self.enabled_windows(), list(self.rules.values())

    def active_tenants(self) -> frozenset[str]:
        """Tenants with an enabled window or a rule whose latest version is enabled: the only
        ones whose events the engine needs to see."""
        return self._active

    def _recompute(self) -> None:
        latest: dict[tuple[str, str], Rule] = {}
        for (tenant, rule_id, version), rule in self.rules.items():
            known = latest.get((tenant, rule_id))
            if known is None or known.version < version:
                latest[(tenant, rule_id)] = rule
        self._active = frozenset(
            {tenant for (tenant, _), rule in latest.items() if rule.enabled}
            | {tenant for (tenant, _), window in self.windows.items() if window.enabled}
        )
        self.version += 1

    def enabled_windows(self) -> list[WindowDef]:
        return [w.definition for w in self.windows.values() if w.enabled]

    async def poll_once(self) -> int:
        """Apply every change after the cursor; the number applied. Raises AioRpcError when
        storage cannot be reached (the cursor stays at the last change applied)."""
        applied = 0
        try:
            more = True
            while more:
                reply = await self._stub.ListDefinitionChanges(
                    pb.ListDefinitionChangesRequest(
                        after_change_id=self.cursor, limit=_CHANGES_PER_CALL
                    ),
                    timeout=self._timeout,
                )
                for change in reply.changes:
                    await self._apply(change)
                    self.cursor = change.change_id
                    applied += 1
                more = reply.more
        finally:
            if applied:  # also those applied before a failure
                self._recompute()
        self.ready.set()
        return applied

    async def _apply(self, change: pb.DefinitionChange) -> None:
        reply = await self._stub.GetDefinition(
            pb.GetDefinitionRequest(
                tenant=change.tenant, kind=change.kind, id=change.id, version=change.version
            ),
            timeout=self._timeout,
        )
        stored = reply.definition
        document = json.loads(stored.definition_json)
        try:
            if change.kind == common.DEFINITION_KIND_RULE:
                self.rules[(change.tenant, change.id, change.version)] = parse_rule(document)
            elif change.kind == common.DEFINITION_KIND_WINDOW:
                known = self.windows.get((change.tenant, change.id))
                if known is None or known.definition.version < change.version:
                    self.windows[(change.tenant, change.id)] = FollowedWindow(
                        parse_window_def(document), stored.enabled
                    )
        except (RuleError, WindowDefError) as error:
            # Storage checked it with this parser; only a processor older or newer than the
            # storage that wrote it refuses it. Skipping it keeps the other definitions running.
            log.error(
                "cannot run %s %s version %d of tenant %s: %s",
                common.DefinitionKind.Name(change.kind),
                change.id,
                change.version,
                change.tenant,
                error,
            )

    async def run(self) -> None:
        """Poll until cancelled; an outage is logged and retried at the next interval."""
        while True:
            try:
                await self.poll_once()
            except grpc.aio.AioRpcError as error:
                log.warning("definition changes unavailable (retrying): %s", error.code().name)
            await asyncio.sleep(self._interval)
