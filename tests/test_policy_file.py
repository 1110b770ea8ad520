"""The peer policy file: the shipped one decides every RPC of every internal service, grants the
operator exactly what is written, and a wrong file stops a service at start with the entry and
its line named."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import pytest

from streammesh.mesh.policy import PeerPolicy
from streammesh.mesh.policy_file import (
    ANY_PEER,
    HOSTED,
    INFRASTRUCTURE,
    PolicyFileError,
    default_policy_path,
    load_policy_file,
)
from streammesh.mesh.settings import ServiceSettings
from streammesh.mesh.startup import EXIT_CONFIG, StartupError
from tests.conftest import TRUST_DOMAIN
from tests.service_process import run_until_exit

SHIPPED = default_policy_path().read_text()
OPERATOR = f"spiffe://{TRUST_DOMAIN}/operator/admin"
INTERNAL_PACKAGES = ("auth", "ingest", "processor", "storage")


def _internal_services() -> set[str]:
    """Every gRPC service the protos of the internal packages declare."""
    names = set()
    for package in INTERNAL_PACKAGES:
        module = importlib.import_module(f"streammesh.api.{package}.v1")
        for info in pkgutil.iter_modules(module.__path__):
            if info.name.endswith("_pb2"):
                pb2 = importlib.import_module(f"{module.__name__}.{info.name}")
                names |= {s.full_name for s in pb2.DESCRIPTOR.services_by_name.values()}
    return names


def test_every_internal_service_of_the_protos_has_a_destination() -> None:
    hosted = {service.full_name for services in HOSTED.values() for service in services}
    assert _internal_services() == hosted


def test_every_rpc_of_every_internal_service_is_decided() -> None:
    """Each method is allowed to someone or denied in a `deny` entry with its reason; a method
    refused only because nobody wrote anything down is listed here."""
    policy = load_policy_file(None, trust_domain=TRUST_DOMAIN)
    uncovered = {name: policy.uncovered(name) for name in HOSTED}
    assert uncovered == {name: [] for name in HOSTED}
    # The walk saw every method (the services' own and health/reflection on each listener).
    total = sum(len(s.methods) for services in HOSTED.values() for s in services)
    assert total > 50 and all(service.methods for service in INFRASTRUCTURE)


def test_the_operator_has_exactly_what_the_file_names() -> None:
    """The break-glass paths of the CLI and the processor's status; nothing implied."""
    policy = load_policy_file(None, trust_domain=TRUST_DOMAIN)
    granted = {
        (name, pattern)
        for name in HOSTED
        for pattern, peers in policy.rules_for(name).items()
        if OPERATOR in peers
    }
    assert granted == {
        ("auth", "streammesh.auth.v1.AuthService/CreateUser"),
        ("processor", "streammesh.processor.v1.ProcessorService/GetStatus"),
    }
    for name in HOSTED:  # health and reflection: every peer of our CA, the operator among them
        rules = policy.rules_for(name)
        assert rules["grpc.health.v1.Health/*"] == frozenset({ANY_PEER})
    store = policy.rules_for("storage")["streammesh.storage.v1.StorageService/StoreEvents"]
    assert store == frozenset({f"spiffe://{TRUST_DOMAIN}/service/processor"})


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return path


def _line(text: str, needle: str) -> int:
    return next(n for n, line in enumerate(text.splitlines(), 1) if needle in line)


STORE = '"streammesh.storage.v1.StorageService/StoreEvents",'


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        (
            '"operator/admin" = ["streammesh.auth',
            '"robot/admin" = ["streammesh.auth',
            "[auth.allow] \"robot/admin\": unknown identity kind 'robot'",
        ),
        (
            '"service/ingest" = [',
            '"service/ingset" = [',
            "[storage.allow] \"service/ingset\": no service is named 'ingset' (known: gateway,",
        ),
        (
            STORE,
            '"streammesh.storage.v1.StorageService/StoreEvent",',
            '[storage.allow] "streammesh.storage.v1.StorageService/StoreEvent": '
            "streammesh.storage.v1.StorageService has no method 'StoreEvent'",
        ),
        (
            STORE,
            '"streammesh.storage.v1.EventService/StoreEvents",',
            "storage hosts no service 'streammesh.storage.v1.EventService'",
        ),
        (
            STORE,
            '"streammesh.auth.v1.AuthService/CreateUser",',
            "storage hosts no service 'streammesh.auth.v1.AuthService'",
        ),
        (
            STORE,
            '"StoreEvents",',
            '"StoreEvents": write package.Service/Method or package.Service/*',
        ),
        (
            '"operator/admin" = ["streammesh.processor',
            '"spiffe://other.domain/operator/admin" = ["streammesh.processor',
            "not in this mesh's trust domain test.streammesh",
        ),
    ],
    ids=[
        "identity-kind",
        "service-name",
        "method",
        "service",
        "not-hosted-here",
        "no-service",
        "trust-domain",
    ],
)
def test_a_wrong_entry_is_named_with_its_line(
    tmp_path: Path, old: str, new: str, problem: str
) -> None:
    assert old in SHIPPED
    text = SHIPPED.replace(old, new, 1)
    path = _write(tmp_path, text)
    with pytest.raises(PolicyFileError) as caught:
        load_policy_file(path, trust_domain=TRUST_DOMAIN)
    message = str(caught.value)
    assert message.startswith(f"{path}:{_line(text, new.split(' = ')[0])}: "), message
    assert problem in message, message


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        (
            "[gateway.allow]\n\"service/auth\" = ['x.Y/*']\n",
            "no internal service is named 'gateway'",
        ),
        (
            '[storage.deny]\n"streammesh.storage.v1.StorageService/StoreEvents" = "no"\n',
            "denied here but allowed on storage (streammesh.storage.v1.StorageService/StoreEvents)",
        ),
        (
            '[all.deny]\n"grpc.health.v1.Health/List" = "no"\n',
            '[all.deny] "grpc.health.v1.Health/List": denied here but allowed on auth',
        ),
        (
            '[processor.deny]\n"streammesh.processor.v1.ProcessorService/GetStatus" = ""\n',
            "an explicit deny needs its reason",
        ),
        ("[storage.permit]\n", "holds only [<service>.allow] and .deny tables"),
        ("[auth.allow\n", "not valid TOML"),
    ],
    ids=[
        "unknown-destination",
        "deny-and-allow",
        "deny-everywhere-and-allow",
        "deny-without-reason",
        "unknown-table",
        "toml",
    ],
)
def test_a_wrong_table_is_refused(tmp_path: Path, extra: str, problem: str) -> None:
    path = _write(tmp_path, SHIPPED + "\n" + extra)
    with pytest.raises(PolicyFileError) as caught:
        load_policy_file(path, trust_domain=TRUST_DOMAIN)
    assert problem in str(caught.value), caught.value


def test_version_is_required(tmp_path: Path) -> None:
    with pytest.raises(PolicyFileError, match="version = 1 is required"):
        load_policy_file(
            _write(tmp_path, SHIPPED.replace("version = 1", "")), trust_domain=TRUST_DOMAIN
        )


def test_a_method_nobody_may_call_is_denied_in_writing(tmp_path: Path) -> None:
    status = '"operator/admin" = ["streammesh.processor.v1.ProcessorService/GetStatus"]'
    without = SHIPPED.replace(status, "")
    policy = load_policy_file(_write(tmp_path, without), trust_domain=TRUST_DOMAIN)
    assert policy.uncovered("processor") == ["streammesh.processor.v1.ProcessorService/GetStatus"]
    denied = without + (
        '\n[processor.deny]\n"streammesh.processor.v1.ProcessorService/GetStatus" = '
        '"nobody reads worker status here"\n'
    )
    policy = load_policy_file(_write(tmp_path, denied), trust_domain=TRUST_DOMAIN)
    assert policy.uncovered("processor") == []
    assert policy.deny["processor"] == {
        "streammesh.processor.v1.ProcessorService/GetStatus": "nobody reads worker status here"
    }


def test_the_setting_points_a_service_at_another_file(tmp_path: Path) -> None:
    text = SHIPPED.replace(
        '"operator/admin" = ["streammesh.processor',
        '"operator/admin" = ["streammesh.processor.v1.ProcessorService/GetStatus"]\n'
        '"service/gateway" = ["streammesh.processor',
    )
    settings = ServiceSettings(trust_domain=TRUST_DOMAIN, policy_file=_write(tmp_path, text))
    policy = PeerPolicy.load(settings, "processor")
    assert policy.allowed("/streammesh.processor.v1.ProcessorService/GetStatus") == {
        OPERATOR,
        f"spiffe://{TRUST_DOMAIN}/service/gateway",
    }
    broken = ServiceSettings(trust_domain=TRUST_DOMAIN, policy_file=tmp_path / "absent.toml")
    with pytest.raises(StartupError, match="invalid peer policy: cannot read the policy file"):
        PeerPolicy.load(broken, "processor")


async def test_a_service_with_a_wrong_policy_file_does_not_start(
    pki_dir: Path, tmp_path: Path, database_url: str, pg_schema: str
) -> None:
    """A real storage process: one CRITICAL line naming the entry, exit status 78."""
    text = SHIPPED.replace('"service/ingest" = [', '"service/ingset" = [')
    path = _write(tmp_path, text)
    env = {
        "STREAMMESH_STORAGE_PORT": "0",
        "STREAMMESH_STORAGE_HOST": "127.0.0.1",
        "STREAMMESH_STORAGE_TLS_DIR": str(pki_dir),
        "STREAMMESH_STORAGE_TRUST_DOMAIN": TRUST_DOMAIN,
        "STREAMMESH_STORAGE_DATABASE_URL": database_url,
        "STREAMMESH_STORAGE_DB_SCHEMA": pg_schema,
        "STREAMMESH_STORAGE_POLICY_FILE": str(path),
    }
    exited = await run_until_exit("storage", env)
    assert exited.status == EXIT_CONFIG, exited.output
    assert "Traceback" not in exited.output
    [line] = exited.critical_lines()
    assert line == (
        f"invalid peer policy: {path}:{_line(text, 'service/ingset')}: [storage.allow] "
        "\"service/ingset\": no service is named 'ingset' "
        "(known: gateway, auth, ingest, processor, storage)"
    )
