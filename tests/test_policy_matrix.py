"""The whole identity x method matrix over real mTLS: every identity calls every method of every
internal listener, and reaches the handler or is refused exactly as the shipped policy file says.

Each internal service runs as a real mesh server (create_mesh_server: TLS, health, reflection,
the guard interceptor) with its guard loaded from the file by `PeerPolicy.load`, hosting the
generated base servicers of its gRPC services: a call the guard lets through reaches a handler,
which answers UNIMPLEMENTED "<method> is not implemented". The point is the guard and the file,
not the handlers (each service's own tests cover those). The expected answer of every cell is
read from the TOML here, independently of the loader's rule table.
"""

from __future__ import annotations

import asyncio
import importlib
import tomllib
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from streammesh.mesh import (
    MeshServer,
    PeerPolicy,
    ServiceBinding,
    ServiceSettings,
    TlsMaterial,
    create_channel,
    create_mesh_server,
)
from streammesh.mesh.policy_file import HOSTED, INFRASTRUCTURE, default_policy_path
from tests.certificates import odd_leaf
from tests.conftest import TRUST_DOMAIN

IDENTITIES = {
    "gateway": "service/gateway",
    "ingest": "service/ingest",
    "processor": "service/processor",
    "storage": "service/storage",
    "auth": "service/auth",
    "admin": "operator/admin",
    "intruder": "service/intruder",  # a leaf of our CA that no rule names
    "foreign": "service/gateway",  # the gateway's name, from another CA
}

REACHED, DENIED, REFUSED_HANDSHAKE = "reached", "denied", "handshake refused"


def _binding(service: ServiceDescriptor) -> ServiceBinding:
    """The generated base servicer of `service`: every method raises NotImplementedError."""
    module = importlib.import_module(
        "streammesh.api."
        + service.file.name.removeprefix("streammesh/")[: -len(".proto")].replace("/", ".")
        + "_pb2_grpc"
    )
    return ServiceBinding(
        service,
        getattr(module, f"add_{service.name}Servicer_to_server"),
        getattr(module, f"{service.name}Servicer")(),
    )


def expected(destination: str, identity: str, method: str) -> str:
    """The cell's answer read straight from the TOML."""
    if identity == "foreign":
        return REFUSED_HANDSHAKE
    data = tomllib.loads(default_policy_path().read_text())
    service = method.partition("/")[0]
    for table in ("all", destination):
        for peer, patterns in data.get(table, {}).get("allow", {}).items():
            if peer in ("*", IDENTITIES[identity]) and {method, f"{service}/*"} & set(patterns):
                return REACHED
    return DENIED


@pytest.fixture(scope="module")
async def servers(pki_dir: Path) -> AsyncIterator[dict[str, tuple[MeshServer, PeerPolicy]]]:
    async with AsyncExitStack() as stack:
        started = {}
        for destination, services in HOSTED.items():
            settings = ServiceSettings(tls_dir=pki_dir, trust_domain=TRUST_DOMAIN)
            policy = PeerPolicy.load(settings, destination)
            mesh = create_mesh_server(
                settings,
                identity=destination,
                bindings=[_binding(service) for service in services],
                guard=policy,
            )
            await mesh.start()
            stack.push_async_callback(mesh.stop, 0)
            started[destination] = (mesh, policy)
        yield started


def _material(pki_dir: Path, foreign_pki_dir: Path, identity: str) -> TlsMaterial:
    if identity == "intruder":
        return odd_leaf(pki_dir, [f"spiffe://{TRUST_DOMAIN}/service/intruder"])
    if identity == "foreign":
        foreign = TlsMaterial.load(foreign_pki_dir, "gateway")
        return TlsMaterial(
            (pki_dir / "ca.pem").read_bytes(), foreign.certificate_chain, foreign.private_key
        )
    return TlsMaterial.load(pki_dir, identity)


async def _call(
    channel: grpc.aio.Channel, method: MethodDescriptor, *, wait_for_ready: bool
) -> tuple[str, str]:
    """One call with an empty request message; (outcome, details). `wait_for_ready` where the
    handshake must succeed: a connection attempt that failed once (hundreds of handshakes at
    once on a loaded machine) is then retried by the channel instead of failing every call of
    it at once; a handshake that is really refused still fails the cell (DEADLINE_EXCEEDED)."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    kind = (method.client_streaming, method.server_streaming)
    factory = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }[kind]
    call = factory(path, request_serializer=None, response_deserializer=None)(
        iter([b""]) if method.client_streaming else b"", timeout=10, wait_for_ready=wait_for_ready
    )
    try:
        if method.server_streaming:
            async for _ in call:
                call.cancel()  # one answer shows the handler was reached (Watch never ends)
                return REACHED, ""
        else:
            await call
        return REACHED, ""
    except grpc.aio.AioRpcError as error:
        code, details = error.code(), error.details() or ""
    if code == grpc.StatusCode.UNIMPLEMENTED and details == f"{path} is not implemented":
        return REACHED, details
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return DENIED, details
    if code == grpc.StatusCode.UNAVAILABLE:
        return REFUSED_HANDSHAKE, details
    return f"unexpected {code.name}", details


async def test_every_identity_on_every_method(
    servers: dict[str, tuple[MeshServer, PeerPolicy]], pki_dir: Path, foreign_pki_dir: Path
) -> None:
    cells: list[tuple[str, str, str]] = []
    calls = []
    channels = []
    for identity in IDENTITIES:
        material = _material(pki_dir, foreign_pki_dir, identity)
        for destination, (mesh, _) in servers.items():
            channel = create_channel(
                f"127.0.0.1:{mesh.port}",
                material,
                server_name=destination,
                config={"methodConfig": []},
            )
            channels.append(channel)
            for service in (*HOSTED[destination], *INFRASTRUCTURE):
                for method in service.methods:
                    cells.append((identity, destination, f"{service.full_name}/{method.name}"))
                    calls.append(_call(channel, method, wait_for_ready=identity != "foreign"))
    try:
        outcomes = await asyncio.gather(*calls)
    finally:
        for channel in channels:
            await channel.close()

    wrong = []
    for (identity, destination, name), (outcome, details) in zip(cells, outcomes, strict=True):
        want = expected(destination, identity, name)
        if outcome != want:
            wrong.append(f"{identity} -> {destination} {name}: {outcome} ({details}), want {want}")
        elif outcome == DENIED and not (
            details.endswith(
                f"/{IDENTITIES[identity]} may not call /{name} (not granted by the peer policy)"
            )
        ):
            wrong.append(f"{identity} -> {name}: denial says {details!r}")
    assert not wrong, "\n".join(wrong)

    # Every refusal by a guard was counted by that guard, with the caller's identity.
    denied = [cell for cell, (outcome, _) in zip(cells, outcomes, strict=True) if outcome == DENIED]
    assert sum(policy.denials.total() for _, policy in servers.values()) == len(denied)
    # The matrix is not trivially one-sided, and the defect stays fixed.
    by_outcome = {o: sum(1 for out, _ in outcomes if out == o) for o in (REACHED, DENIED)}
    assert by_outcome[REACHED] > 50 and by_outcome[DENIED] > 200, by_outcome
    assert (
        expected("storage", "admin", "streammesh.storage.v1.StorageService/StoreEvents") == DENIED
    )
    assert ("admin", "storage", "streammesh.storage.v1.StorageService/StoreEvents") in denied
    intruder = {m for i, _, m in cells if i == "intruder"} - {
        m for i, _, m in denied if i == "intruder"
    }
    assert all(m.startswith(("grpc.health.", "grpc.reflection.")) for m in intruder)
