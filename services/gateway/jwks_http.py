"""`GET /.well-known/jwks.json` over HTTPS: the token keys for ordinary JWT libraries.

Most JWT libraries (PyJWT's PyJWKClient, jose, nimbus, go-jose, ...) take a JWKS URL, not a
gRPC method. This listener serves the same keys as GatewayService/GetJwks, from the same cache
(so it cannot add load on auth either), with the gateway's certificate, and nothing else: one
path, GET or HEAD, a bounded request head read under a timeout, one response per connection, a
cap on connections served at once. It is off unless `jwks_http_port` is set: a second public
listener is surface an operator should choose to expose.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from pathlib import Path

from google.protobuf.json_format import MessageToDict

from services.gateway.tokens import JwksCache, public_keys
from streammesh.mesh.errors import Unavailable
from streammesh.mesh.tls_reload import ReloadingSslContext

__all__ = ["JWKS_PATH", "JwksHttpListener"]

log = logging.getLogger(__name__)

JWKS_PATH = "/.well-known/jwks.json"
_MAX_HEAD_BYTES = 8 * 1024
_READ_TIMEOUT_SECONDS = 5.0
_MAX_CONNECTIONS = 64


def _tls_versions(context: ssl.SSLContext) -> None:
    context.minimum_version = ssl.TLSVersion.TLSv1_2


class JwksHttpListener:
    """An HTTPS listener serving the JWK Set of `keys` at JWKS_PATH."""

    def __init__(self, keys: JwksCache, *, host: str, port: int, tls_dir: Path) -> None:
        self._keys = keys
        self._host = host
        self._requested_port = port
        # The gateway's certificate as its files are at each new connection (pki rotate).
        self._tls = ReloadingSslContext(
            tls_dir / "gateway.pem", tls_dir / "gateway-key.pem", _tls_versions
        ).context
        self._slots = asyncio.Semaphore(_MAX_CONNECTIONS)
        self._server: asyncio.Server | None = None
        self.port = 0
        """The bound port, once started."""

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, self._host, self._requested_port, ssl=self._tls, limit=_MAX_HEAD_BYTES
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self._slots.locked():
                await self._respond(writer, 503, b"busy\n", retry_after=1)
                return
            async with self._slots:
                await self._answer(reader, writer)
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # a client that went away or spoke garbage: nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_READ_TIMEOUT_SECONDS):
                head = await reader.readuntil(b"\r\n\r\n")
        except TimeoutError:
            return
        request_line = head.split(b"\r\n", 1)[0].split(b" ")
        if len(request_line) != 3 or not request_line[2].startswith(b"HTTP/1."):
            await self._respond(writer, 400, b"bad request\n")
            return
        method, target, _ = request_line
        if target.split(b"?", 1)[0] != JWKS_PATH.encode():
            await self._respond(writer, 404, b"not found\n")
            return
        if method not in (b"GET", b"HEAD"):
            await self._respond(writer, 405, b"method not allowed\n", allow="GET, HEAD")
            return
        try:
            keys, fresh_for = await self._keys.published()
        except Unavailable:
            await self._respond(writer, 503, b"token keys unavailable\n", retry_after=1)
            return
        body = json.dumps(
            {
                "keys": [
                    MessageToDict(k, preserving_proto_field_name=True) for k in public_keys(keys)
                ]
            },
            separators=(",", ":"),
        ).encode()
        await self._respond(
            writer,
            200,
            body,
            content_type="application/jwk-set+json",
            cache_control=f"max-age={int(fresh_for)}",
            head_only=method == b"HEAD",
        )

    @staticmethod
    async def _respond(
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        *,
        content_type: str = "text/plain; charset=utf-8",
        cache_control: str = "no-store",
        retry_after: int | None = None,
        allow: str | None = None,
        head_only: bool = False,
    ) -> None:
        reasons = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
        lines = [
            f"HTTP/1.1 {status} {reasons.get(status, 'Service Unavailable')}",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}",
            f"Cache-Control: {cache_control}",
            "Connection: close",
        ]
        if retry_after is not None:
            lines.append(f"Retry-After: {retry_after}")
        if allow is not None:
            lines.append(f"Allow: {allow}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        if not head_only:
            writer.write(body)
        await writer.drain()
