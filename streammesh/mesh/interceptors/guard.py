"""The guard: an authorization check before each call, ahead of the request's decoding."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from streammesh.mesh.interceptors.base import Layer, LayerInterceptor, Rpc

__all__ = ["Guard", "GuardInterceptor"]

Guard = Callable[[str, grpc.aio.ServicerContext], Awaitable[None]]
"""Runs before a call with its full method name; raises StreamMeshError to refuse it."""


class _GuardLayer(Layer):
    __slots__ = ("_guard", "_method")

    def __init__(self, guard: Guard, method: str) -> None:
        self._guard = guard
        self._method = method

    async def enter(self, request: Any, context: grpc.aio.ServicerContext) -> tuple[Any, Any]:
        await self._guard(self._method, context)
        return request, None


class GuardInterceptor(LayerInterceptor):
    """Applies `guard` (a PeerPolicy, the gateway's token check) to every call. It must stand
    before the decoding layer, so that a refused caller never has its bytes parsed, and inside
    the error layer, which answers its refusal."""

    def __init__(self, guard: Guard) -> None:
        super().__init__()
        self._guard = guard

    def layer(self, rpc: Rpc, handler: grpc.RpcMethodHandler) -> Layer:
        return _GuardLayer(self._guard, rpc.method)
