"""streammesh.gateway.v1.RuleService: rules and windows relayed to storage's DefinitionService
with the kind, the caller's tenant and the author (the token's user) filled in; alerts and
window results and late events relayed as they are (those messages are wire-identical to storage's minus
`tenant`, which tests/test_api_contract.py checks). AccessGuard checked the role before any
handler runs. Storage validates the documents with the engine's own parser."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from services.gateway.access import current_principal
from services.gateway.relay import call_timeout, convert
from services.gateway.revocations import RevocationList
from services.gateway.subscribe import relay_stream
from services.gateway.upstream import Upstreams, upstream_errors
from streammesh.api.common.v1 import definitions_pb2 as common
from streammesh.api.gateway.v1 import rules_pb2 as public
from streammesh.api.gateway.v1 import rules_pb2_grpc as public_grpc
from streammesh.api.storage.v1 import definitions_pb2 as internal

M = TypeVar("M", bound=Message)

__all__ = ["RuleServicer"]

RULE = common.DEFINITION_KIND_RULE
WINDOW = common.DEFINITION_KIND_WINDOW


class RuleServicer(public_grpc.RuleServiceServicer):
    def __init__(self, upstreams: Upstreams, revocations: RevocationList) -> None:
        self._up = upstreams
        self._revocations = revocations

    async def _call(self, name: str, message: Any, context: grpc.aio.ServicerContext) -> Any:
        principal = current_principal()
        message.tenant = principal.tenant
        if "created_by" in type(message).DESCRIPTOR.fields_by_name:
            message.created_by = principal.username
        with upstream_errors("storage"):
            return await getattr(self._up.definitions, name)(message, timeout=call_timeout(context))

    async def _create(
        self,
        kind: common.DefinitionKind.ValueType,
        document: str,
        context: grpc.aio.ServicerContext,
    ) -> common.Definition:
        request = internal.CreateDefinitionRequest(kind=kind, definition_json=document)
        reply = await self._call("CreateDefinition", request, context)
        return reply.definition  # type: ignore[no-any-return]

    async def _update(
        self,
        kind: common.DefinitionKind.ValueType,
        definition_id: str,
        document: str,
        context: grpc.aio.ServicerContext,
    ) -> common.Definition:
        request = internal.UpdateDefinitionRequest(
            kind=kind, id=definition_id, definition_json=document
        )
        reply = await self._call("UpdateDefinition", request, context)
        return reply.definition  # type: ignore[no-any-return]

    async def _set_enabled(
        self,
        kind: common.DefinitionKind.ValueType,
        definition_id: str,
        enabled: bool,
        context: grpc.aio.ServicerContext,
    ) -> internal.SetDefinitionEnabledResponse:
        request = internal.SetDefinitionEnabledRequest(kind=kind, id=definition_id, enabled=enabled)
        reply: internal.SetDefinitionEnabledResponse = await self._call(
            "SetDefinitionEnabled", request, context
        )
        return reply

    async def _get(
        self,
        kind: common.DefinitionKind.ValueType,
        definition_id: str,
        version: int,
        context: grpc.aio.ServicerContext,
    ) -> internal.GetDefinitionResponse:
        request = internal.GetDefinitionRequest(kind=kind, id=definition_id, version=version)
        reply: internal.GetDefinitionResponse = await self._call("GetDefinition", request, context)
        return reply

    async def _list(
        self,
        kind: common.DefinitionKind.ValueType,
        page_size: int,
        page_token: str,
        context: grpc.aio.ServicerContext,
    ) -> internal.ListDefinitionsResponse:
        request = internal.ListDefinitionsRequest(
            kind=kind, page_size=page_size, page_token=page_token
        )
        reply: internal.ListDefinitionsResponse = await self._call(
            "ListDefinitions", request, context
        )
        return reply

    async def CreateRule(
        self, request: public.CreateRuleRequest, context: grpc.aio.ServicerContext
    ) -> public.CreateRuleResponse:
        rule = await self._create(RULE, request.definition_json, context)
        return public.CreateRuleResponse(rule=rule)

    async def UpdateRule(
        self, request: public.UpdateRuleRequest, context: grpc.aio.ServicerContext
    ) -> public.UpdateRuleResponse:
        rule = await self._update(RULE, request.rule_id, request.definition_json, context)
        return public.UpdateRuleResponse(rule=rule)

    async def SetRuleEnabled(
        self, request: public.SetRuleEnabledRequest, context: grpc.aio.ServicerContext
    ) -> public.SetRuleEnabledResponse:
        reply = await self._set_enabled(RULE, request.rule_id, request.enabled, context)
        return public.SetRuleEnabledResponse(rule=reply.definition, changed=reply.changed)

    async def GetRule(
        self, request: public.GetRuleRequest, context: grpc.aio.ServicerContext
    ) -> public.GetRuleResponse:
        reply = await self._get(RULE, request.rule_id, request.version, context)
        return public.GetRuleResponse(rule=reply.definition, latest_version=reply.latest_version)

    async def ListRules(
        self, request: public.ListRulesRequest, context: grpc.aio.ServicerContext
    ) -> public.ListRulesResponse:
        reply = await self._list(RULE, request.page_size, request.page_token, context)
        return public.ListRulesResponse(
            rules=reply.definitions, next_page_token=reply.next_page_token
        )

    async def CreateWindow(
        self, request: public.CreateWindowRequest, context: grpc.aio.ServicerContext
    ) -> public.CreateWindowResponse:
        window = await self._create(WINDOW, request.definition_json, context)
        return public.CreateWindowResponse(window=window)

    async def UpdateWindow(
        self, request: public.UpdateWindowRequest, context: grpc.aio.ServicerContext
    ) -> public.UpdateWindowResponse:
        window = await self._update(WINDOW, request.window_id, request.definition_json, context)
        return public.UpdateWindowResponse(window=window)

    async def SetWindowEnabled(
        self, request: public.SetWindowEnabledRequest, context: grpc.aio.ServicerContext
    ) -> public.SetWindowEnabledResponse:
        reply = await self._set_enabled(WINDOW, request.window_id, request.enabled, context)
        return public.SetWindowEnabledResponse(window=reply.definition, changed=reply.changed)

    async def GetWindow(
        self, request: public.GetWindowRequest, context: grpc.aio.ServicerContext
    ) -> public.GetWindowResponse:
        reply = await self._get(WINDOW, request.window_id, request.version, context)
        return public.GetWindowResponse(
            window=reply.definition, latest_version=reply.latest_version
        )

    async def ListWindows(
        self, request: public.ListWindowsRequest, context: grpc.aio.ServicerContext
    ) -> public.ListWindowsResponse:
        reply = await self._list(WINDOW, request.page_size, request.page_token, context)
        return public.ListWindowsResponse(
            windows=reply.definitions, next_page_token=reply.next_page_token
        )

    async def _listing(self, name: str, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Storage's listing `name` for the caller: page tokens are bound to the principal."""
        request.principal = current_principal().subject
        return await self._call(name, request, context)

    async def ListAlerts(
        self, request: public.ListAlertsRequest, context: grpc.aio.ServicerContext
    ) -> public.ListAlertsResponse:
        reply = await self._listing(
            "ListAlerts", convert(request, internal.ListAlertsRequest), context
        )
        return convert(reply, public.ListAlertsResponse)

    def _subscribe(
        self, name: str, request: Any, public_response: type[M], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[M]:
        """Storage's `name` stream for the caller (tenant and principal filled in), re-typed."""
        principal = current_principal()
        request.tenant, request.principal = principal.tenant, principal.subject
        call = getattr(self._up.definitions, name)(request, timeout=call_timeout(context))
        return relay_stream(call, public_response, self._revocations)

    async def SubscribeAlerts(
        self, request: public.SubscribeAlertsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[public.SubscribeAlertsResponse]:
        internal_request = convert(request, internal.SubscribeAlertsRequest)
        relayed = self._subscribe(
            "SubscribeAlerts", internal_request, public.SubscribeAlertsResponse, context
        )
        async for message in relayed:
            yield message

    async def SubscribeWindowResults(
        self, request: public.SubscribeWindowResultsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[public.SubscribeWindowResultsResponse]:
        internal_request = convert(request, internal.SubscribeWindowResultsRequest)
        relayed = self._subscribe(
            "SubscribeWindowResults",
            internal_request,
            public.SubscribeWindowResultsResponse,
            context,
        )
        async for message in relayed:
            yield message

    async def ListWindowResults(
        self, request: public.ListWindowResultsRequest, context: grpc.aio.ServicerContext
    ) -> public.ListWindowResultsResponse:
        reply = await self._listing(
            "ListWindowResults", convert(request, internal.ListWindowResultsRequest), context
        )
        return convert(reply, public.ListWindowResultsResponse)

    async def ListLateEvents(
        self, request: public.ListLateEventsRequest, context: grpc.aio.ServicerContext
    ) -> public.ListLateEventsResponse:
        reply = await self._listing(
            "ListLateEvents", convert(request, internal.ListLateEventsRequest), context
        )
        return convert(reply, public.ListLateEventsResponse)
