"""`https://<gateway>/.well-known/jwks.json` (STREAMMESH_GATEWAY_JWKS_HTTP_PORT): an ordinary JWT
library (PyJWT's PyJWKClient) verifies a real token from auth with only the CA, and the listener
answers nothing but that one document."""

from __future__ import annotations

import asyncio
import ssl

import jwt

from tests.gateway.conftest import Stack

GATEWAY_SETTINGS = {"jwks_http_port": 0}


def _tls(stack: Stack) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(stack.pki_dir / "ca.pem"))


async def _raw(stack: Stack, request: bytes) -> bytes:
    """One raw HTTPS exchange: the whole response, until the server closes."""
    assert stack.jwks_http_port is not None
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", stack.jwks_http_port, ssl=_tls(stack), server_hostname="gateway"
    )
    writer.write(request)
    await writer.drain()
    response = await asyncio.wait_for(reader.read(), timeout=10)
    writer.close()
    return response


async def test_pyjwkclient_verifies_a_real_token_with_only_the_ca(stack: Stack) -> None:
    url = f"https://127.0.0.1:{stack.jwks_http_port}/.well-known/jwks.json"
    person = stack.people["producer"]

    def verify() -> dict[str, object]:
        # What a resource server does: a JWKS URL, the CA, nothing else of ours.
        client = jwt.PyJWKClient(url, ssl_context=_tls(stack))
        key = client.get_signing_key_from_jwt(person.access_token)
        claims: dict[str, object] = jwt.decode(
            person.access_token,
            key,
            algorithms=["EdDSA"],
            audience="streammesh",
            issuer="streammesh-auth",
        )
        return claims

    claims = await asyncio.to_thread(verify)  # urllib blocks; the gateway runs on this loop
    assert claims["preferred_username"] == person.username


async def test_the_document_carries_its_cache_lifetime(stack: Stack) -> None:
    response = await _raw(stack, b"GET /.well-known/jwks.json HTTP/1.1\r\nHost: gateway\r\n\r\n")
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 200 OK"
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert headers["Content-Type"] == "application/jwk-set+json"
    max_age = int(headers["Cache-Control"].removeprefix("max-age="))
    assert 0 < max_age <= stack.gateway_settings.jwks_max_age_seconds
    assert int(headers["Content-Length"]) == len(body)
    assert jwt.PyJWKSet.from_json(body.decode()).keys


async def test_nothing_else_is_served(stack: Stack) -> None:
    cases = {
        b"GET / HTTP/1.1\r\n\r\n": b"HTTP/1.1 404 ",
        b"GET /.well-known/openid-configuration HTTP/1.1\r\n\r\n": b"HTTP/1.1 404 ",
        b"POST /.well-known/jwks.json HTTP/1.1\r\nContent-Length: 0\r\n\r\n": b"HTTP/1.1 405 ",
        b"\x16\x03garbage\r\n\r\n": b"HTTP/1.1 400 ",
        b"GET /.well-known/jwks.json\r\n\r\n": b"HTTP/1.1 400 ",
    }
    for request, status in cases.items():
        assert (await _raw(stack, request)).startswith(status), request
    head = await _raw(stack, b"HEAD /.well-known/jwks.json HTTP/1.1\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")
    # A head longer than the limit is dropped without an answer.
    assert await _raw(stack, b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\n\r\n") == b""
