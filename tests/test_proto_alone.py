"""`proto/` alone is enough for a client in another language: compiled with nothing but
`-I proto` and the well-known types every protobuf runtime ships, it decodes a running service's
error details (the status trailer and PublishRefusal.status_details) without any generated code
of ours or googleapis-common-protos. And Python keeps taking google.rpc from the pip package."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

from services.ingest.server import IngestDeps, create_server
from services.ingest.settings import IngestSettings
from streammesh.mesh import TlsMaterial, create_channel, service_config
from streammesh.streams import StreamLayout
from tests.conftest import TRUST_DOMAIN

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto"


def _well_known_include() -> Path:
    import grpc_tools  # type: ignore[import-untyped]

    return Path(grpc_tools.__file__).parent / "_proto"


@pytest.fixture(scope="module")
def proto_pool(tmp_path_factory: pytest.TempPathFactory) -> descriptor_pool.DescriptorPool:
    """Every file of proto/, compiled by protoc from proto/ and the well-known types only, in a
    descriptor pool of its own (nothing registered by any installed package)."""
    out = tmp_path_factory.mktemp("proto-alone") / "set.pb"
    files = sorted(str(p.relative_to(PROTO)) for p in PROTO.rglob("*.proto"))
    assert "google/rpc/status.proto" in files and "google/rpc/error_details.proto" in files
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO}",
            f"-I{_well_known_include()}",
            "--include_imports",
            f"--descriptor_set_out={out}",
            *files,
        ],
        check=True,
        capture_output=True,
    )
    pool = descriptor_pool.DescriptorPool()
    for file in descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file:
        pool.Add(file)
    return pool


def _cls(pool: descriptor_pool.DescriptorPool, name: str) -> Callable[..., Message]:
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(name))


def _details(pool: descriptor_pool.DescriptorPool, status_bytes: bytes) -> tuple[Any, list[Any]]:
    """A serialized google.rpc.Status and its details, decoded with the pool's classes only."""
    status: Any = _cls(pool, "google.rpc.Status")()
    status.ParseFromString(status_bytes)
    details = []
    for packed in status.details:
        name = packed.type_url.rsplit("/", 1)[-1]
        detail: Any = _cls(pool, name)()
        detail.ParseFromString(packed.value)
        details.append(detail)
    return status, details


@pytest.fixture
async def ingest_port(pki_dir: Path, redis_url: str, redis_prefix: str) -> AsyncIterator[int]:
    client = aioredis.Redis.from_url(redis_url)
    layout = StreamLayout(prefix=f"{redis_prefix}events", partitions=2)
    await layout.ensure_group(client)
    settings = IngestSettings(port=0, tls_dir=pki_dir, trust_domain=TRUST_DOMAIN, partitions=2)
    mesh = create_server(settings, IngestDeps(client, layout))
    await mesh.start()
    yield mesh.port
    await mesh.stop(0)
    await client.aclose()


async def test_proto_alone_decodes_a_running_services_error_details(
    proto_pool: descriptor_pool.DescriptorPool, ingest_port: int, pki_dir: Path
) -> None:
    pool = proto_pool
    request_cls = _cls(pool, "streammesh.ingest.v1.PublishBatchRequest")
    stream_request_cls = _cls(pool, "streammesh.ingest.v1.PublishRequest")
    event_cls = _cls(pool, "streammesh.common.v1.Event")
    bad: Any = event_cls(id="x" * 200, key="k", type="t")  # the id is too long
    channel = create_channel(
        f"127.0.0.1:{ingest_port}",
        TlsMaterial.load(pki_dir, "gateway"),
        server_name="ingest",
        config=service_config("streammesh.ingest.v1.IngestService", health_checked=False),
    )
    async with channel:
        # Generic calls: requests and replies are (de)serialized by the pool's classes alone.
        unary = channel.unary_unary(
            "/streammesh.ingest.v1.IngestService/PublishBatch",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=bytes,
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await unary(request_cls(events=[bad]), timeout=5)
        trailer = dict(caught.value.trailing_metadata() or ())["grpc-status-details-bin"]
        assert isinstance(trailer, bytes)
        status, details = _details(pool, trailer)
        assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        [bad_request] = details
        assert bad_request.DESCRIPTOR.full_name == "google.rpc.BadRequest"
        assert [v.field for v in bad_request.field_violations] == ["events[0].id"]

        response_cls = _cls(pool, "streammesh.ingest.v1.PublishResponse")
        stream = channel.stream_stream(
            "/streammesh.ingest.v1.IngestService/Publish",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_cls.FromString,  # type: ignore[attr-defined]
        )
        call = stream()
        await call.write(stream_request_cls(sequence=7, events=[bad]))
        reply: Any = await call.read()
        await call.done_writing()
        assert reply.HasField("refusal") and reply.refusal.sequence == 7
        status, details = _details(pool, reply.refusal.status_details)
        assert (status.code, status.message) == (reply.refusal.code, reply.refusal.message)
        assert [v.field for v in details[0].field_violations] == ["events[0].id"]
        assert await call.code() == grpc.StatusCode.INVALID_ARGUMENT


def _shape(messages: Any) -> list[Any]:
    """Names, numbers, labels and types of every field, nested messages included."""
    return [
        (
            m.name,
            [(f.name, f.number, f.label, f.type, f.type_name) for f in m.field],
            _shape(m.nested_type),
        )
        for m in messages
    ]


def test_shipped_google_rpc_matches_what_python_uses(
    proto_pool: descriptor_pool.DescriptorPool,
) -> None:
    # The messages in proto/google/rpc are the ones grpcio-status' googleapis-common-protos
    # decodes (names, numbers, types of every field), so both read the same bytes.
    from google.rpc import error_details_pb2, status_pb2

    for module in (status_pb2, error_details_pb2):
        installed = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(installed)
        shipped = descriptor_pb2.FileDescriptorProto()
        proto_pool.FindFileByName(module.DESCRIPTOR.name).CopyToProto(shipped)
        assert _shape(shipped.message_type) == _shape(installed.message_type), module.__name__
        assert list(shipped.dependency) == list(installed.dependency)


def test_python_takes_google_rpc_from_the_pip_package_only() -> None:
    # No generated copy of google.rpc in streammesh/api, and importing every generated module
    # with grpcio-status' google.rpc registers nothing twice (a fresh interpreter: a duplicate
    # registration fails at import).
    assert not list((ROOT / "streammesh" / "api").rglob("*google*"))
    code = (
        "import importlib, pathlib, sys\n"
        "from google.rpc import status_pb2, error_details_pb2\n"
        "from grpc_status import rpc_status\n"
        "root = pathlib.Path('streammesh/api')\n"
        "for path in sorted(root.rglob('*_pb2*.py')):\n"
        "    importlib.import_module('.'.join(path.with_suffix('').parts))\n"
        "print(status_pb2.__file__)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert "site-packages/google/rpc/status_pb2.py" in result.stdout, result.stdout
