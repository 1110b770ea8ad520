"""Server interceptors as a list of small layers, each built on one helper
(`wrap_rpc_behavior`) that wraps unary and streaming behaviours alike.

The order every service runs (outermost first): metrics (streammesh.mesh.metrics), errors,
deadline, guard, and the decoding layer, which the server factory always appends last. Metrics
stand outside the error layer so that they count the status each call ended with; the guard
stands before the decoding so that a refused caller never has its bytes parsed.
"""

from streammesh.mesh.interceptors.base import Layer, LayerInterceptor, Rpc, wrap_rpc_behavior
from streammesh.mesh.interceptors.deadline import DeadlineInterceptor, time_remaining
from streammesh.mesh.interceptors.decode import DecodeInterceptor
from streammesh.mesh.interceptors.guard import Guard, GuardInterceptor
from streammesh.mesh.interceptors.statuses import ErrorInterceptor, abort_with

__all__ = [
    "DeadlineInterceptor",
    "DecodeInterceptor",
    "ErrorInterceptor",
    "Guard",
    "GuardInterceptor",
    "Layer",
    "LayerInterceptor",
    "Rpc",
    "abort_with",
    "time_remaining",
    "wrap_rpc_behavior",
]
