"""Every method of every service of the real stack, fed random and mutated bytes through generic
calls (no stubs, no serializers), over the same TLS and mTLS a client uses.

The methods are what each server lists through reflection, resolved in the protos' descriptors,
so a new RPC or service is fuzzed without touching this file. The promise checked: a request
that does not decode is INVALID_ARGUMENT (or refused by the guard before decoding), a request
that does decode is never UNKNOWN or INTERNAL, no service logs an ERROR or a traceback, and
every service is still SERVING afterwards. The inputs come from a seeded RNG: a failure names
the case, and the same seed replays it.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc
import pyotp
import pytest
from google.protobuf.descriptor import MethodDescriptor
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from streammesh.cli.admin import create_user_as_operator
from streammesh.cli.stack import GRPC_SERVICE, START_ORDER, StackConfig, check_health
from streammesh.client import GatewayClient
from streammesh.mesh import TlsMaterial, create_channel
from streammesh.mesh.policy_file import ANY_PEER, load_policy_file
from tests.e2e.conftest import new_stack_config, running_stack
from tests.fuzzing import FuzzCase, decodes, fuzz_cases, hosted_methods, load_descriptors

pytestmark = pytest.mark.slow


# This module's own stack (module-scoped fixtures), so its logs hold only what the fuzz caused.
@pytest.fixture(scope="module")
def stack_config(tmp_path_factory: pytest.TempPathFactory) -> StackConfig:
    return new_stack_config(tmp_path_factory.mktemp("fuzz-stack"))


@pytest.fixture(scope="module")
async def stack(stack_config: StackConfig) -> AsyncIterator[StackConfig]:
    async with running_stack(stack_config) as config:
        yield config


SEED = 20261201
RANDOM_CASES = 6
MUTATIONS = 10
EDGE_VALUES = 8
DEADLINE_SECONDS = 5.0
IN_FLIGHT = 12

NEVER = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL})
UNDECODABLE_ANSWERS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        # The guard runs before decoding: a caller who may not call the method learns nothing
        # about the request.
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
    }
)


@dataclass(frozen=True)
class Target:
    """One way in: a service's channel and the credentials sent with each call."""

    label: str
    channel: grpc.aio.Channel
    metadata: tuple[tuple[str, str], ...] = ()
    only: frozenset[str] = frozenset()
    """When set, the methods (`pkg.Service/Method`) this target calls; else every one hosted."""


@dataclass(frozen=True)
class Outcome:
    target: str
    method: MethodDescriptor
    case: FuzzCase
    decodable: bool
    code: grpc.StatusCode
    details: str

    def __str__(self) -> str:
        return (
            f"{self.target} {self.method.full_name} [{self.case.label}, "
            f"{'decodes' if self.decodable else 'undecodable'}, {self.case.data[:40].hex()}] "
            f"-> {self.code.name}: {self.details[:120]}"
        )


async def _hosted_services(channel: grpc.aio.Channel) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    async for answer in stub.ServerReflectionInfo(iter([request]), timeout=10):
        return sorted(s.name for s in answer.list_services_response.service)
    raise AssertionError("reflection answered nothing")


async def _admin_token(stack: StackConfig) -> str:
    """A logged-in admin: the admin role may call every role-guarded gateway method."""
    name, password = f"fuzz-{uuid.uuid4().hex[:8]}", "correct horse battery staple"
    await create_user_as_operator(stack, name, password, ["admin"])
    async with GatewayClient(stack.address("gateway"), stack.pki_dir / "ca.pem") as client:
        totp = pyotp.TOTP((await client.begin_totp(name, password)).secret)
        await client.confirm_totp(name, password, totp.now())
        tokens = await client.login(name, password, totp.at(time.time() + 30))
    return str(tokens.access_token)


def _channel(stack: StackConfig, name: str, caller: str = "admin") -> grpc.aio.Channel:
    if name == "gateway":
        return grpc.aio.secure_channel(
            stack.address(name),
            grpc.ssl_channel_credentials((stack.pki_dir / "ca.pem").read_bytes()),
            options=[("grpc.ssl_target_name_override", "gateway")],
        )
    return create_channel(
        stack.address(name),
        TlsMaterial.load(stack.pki_dir, caller),
        server_name=name,
        config={"methodConfig": []},
    )


def _callers(
    stack: StackConfig, name: str, methods: Sequence[MethodDescriptor]
) -> dict[str, set[str]]:
    """Per certificate (file name), the methods of internal service `name` the peer policy
    grants it, so that the fuzz reaches decoding and the handlers: each method is called as
    one identity it allows (the operator for those open to every peer)."""
    rules = load_policy_file(None, trust_domain=stack.trust_domain).rules_for(name)
    callers: dict[str, set[str]] = {}
    for method in methods:
        path = f"{method.containing_service.full_name}/{method.name}"
        allowed = rules.get(path, frozenset()) | rules.get(
            f"{method.containing_service.full_name}/*", frozenset()
        )
        if not allowed:
            continue  # nobody may call it: nothing behind the guard to fuzz
        caller = "admin" if ANY_PEER in allowed else sorted(allowed)[0].rpartition("/")[2]
        callers.setdefault(caller, set()).add(path)
    return callers


async def _call(
    target: Target, method: MethodDescriptor, messages: Sequence[bytes]
) -> tuple[grpc.StatusCode, str]:
    """One raw call: the bytes go out as they are, the answers come back as bytes."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    kind = (method.client_streaming, method.server_streaming)
    factory = {
        (False, False): target.channel.unary_unary,
        (False, True): target.channel.unary_stream,
        (True, False): target.channel.stream_unary,
        (True, True): target.channel.stream_stream,
    }[kind]
    multicallable = factory(path, request_serializer=None, response_deserializer=None)

    async def requests() -> AsyncIterator[bytes]:
        for message in messages:
            yield message

    request = requests() if method.client_streaming else messages[0]
    try:
        call = multicallable(request, metadata=target.metadata, timeout=DEADLINE_SECONDS)
        if method.server_streaming:
            async for _ in call:
                pass
        else:
            await call
        return await call.code(), await call.details() or ""
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""


async def _fuzz_target(
    target: Target,
    methods: Sequence[MethodDescriptor],
    rng: random.Random,
    limit: asyncio.Semaphore,
) -> list[Outcome]:
    async def one(method: MethodDescriptor, case: FuzzCase, valid: bytes) -> Outcome:
        # A request stream opens with a valid message, so the bad one arrives mid-stream,
        # after the handler started its work.
        messages = [valid, case.data] if method.client_streaming else [case.data]
        async with limit:
            code, details = await _call(target, method, messages)
        return Outcome(
            target.label,
            method,
            case,
            decodes(method.input_type, case.data),
            code,
            details,
        )

    jobs = []
    for method in methods:
        cases = fuzz_cases(
            method.input_type,
            rng,
            random_count=RANDOM_CASES,
            mutation_count=MUTATIONS,
            edge_count=EDGE_VALUES,
        )
        jobs += [one(method, case, cases[0].data) for case in cases]
    return list(await asyncio.gather(*jobs))


CLIENT_WRITE_RACE = "Internal error from Core"
"""What grpc.aio's client reports, in place of the server's status, when it writes a request
message after the server already ended the call (grpc/grpc#36066): the server said nothing of
the kind, and its log is checked separately."""


def _wrong(outcome: Outcome) -> bool:
    if outcome.method.client_streaming and outcome.details == CLIENT_WRITE_RACE:
        return False
    if outcome.code in NEVER:
        return True
    return not outcome.decodable and outcome.code not in UNDECODABLE_ANSWERS


def _summary(outcomes: Sequence[Outcome]) -> str:
    """One line per target, method and status: how many, and the first case."""
    groups: dict[tuple[str, str, str], list[Outcome]] = {}
    for outcome in outcomes:
        key = (outcome.target, outcome.method.full_name, outcome.code.name)
        groups.setdefault(key, []).append(outcome)
    return "\n".join(f"{len(group):4} x {group[0]}" for group in groups.values())


def _log_problems(stack: StackConfig, name: str) -> tuple[list[str], int]:
    """Lines of the service's log at ERROR or above, with a traceback, or not JSON at all;
    and how many lines reported an undecodable request."""
    problems, undecodable = [], 0
    for line in (stack.state_dir / "logs" / f"{name}.log").read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            problems.append(line)
            continue
        if entry.get("level") in ("ERROR", "CRITICAL") or "exc" in entry or "Traceback" in line:
            problems.append(line[:600])
        elif "undecodable request" in str(entry.get("msg")):
            undecodable += 1
    return problems, undecodable


@pytest.mark.timeout(300)
async def test_fuzzed_requests_never_break_a_service(stack: StackConfig) -> None:
    load_descriptors()
    token = await _admin_token(stack)
    channels = {name: _channel(stack, name) for name in START_ORDER}
    started = time.monotonic()
    try:
        hosted = {name: await _hosted_services(channels[name]) for name in START_ORDER}
        targets = [Target("gateway", channels["gateway"])]
        for name in START_ORDER:
            if name == "gateway":
                continue
            for caller, paths in _callers(stack, name, hosted_methods(hosted[name])).items():
                label = f"{name}+{caller}-cert"
                channels[label] = _channel(stack, name, caller)
                targets.append(Target(label, channels[label], only=frozenset(paths)))
        targets.append(
            Target(
                "gateway+admin-token", channels["gateway"], (("authorization", f"Bearer {token}"),)
            )
        )
        rng = random.Random(SEED)
        limit = asyncio.Semaphore(IN_FLIGHT)
        outcomes: list[Outcome] = []
        for target in targets:
            methods = hosted_methods(hosted[target.label.split("+")[0]])
            if target.only:
                methods = [
                    m
                    for m in methods
                    if f"{m.containing_service.full_name}/{m.name}" in target.only
                ]
            outcomes += await _fuzz_target(target, methods, rng, limit)
    finally:
        for channel in channels.values():
            await channel.close()
    elapsed = time.monotonic() - started

    wrong = [o for o in outcomes if _wrong(o)]
    assert not wrong, f"{len(wrong)} of {len(outcomes)} calls answered wrongly:\n" + _summary(wrong)
    # Reflection named every service each process hosts, health and reflection included.
    for name in START_ORDER:
        assert {GRPC_SERVICE[name], "grpc.health.v1.Health"} <= set(hosted[name]), hosted[name]
        assert "grpc.reflection.v1alpha.ServerReflection" in hosted[name]
    # The fuzz reached the handlers too, not only the decoder: some calls of every target
    # decoded and succeeded.
    assert sum(o.decodable for o in outcomes) > len(outcomes) // 5
    for target in targets:
        assert any(o.code == grpc.StatusCode.OK for o in outcomes if o.target == target.label)

    for name in START_ORDER:
        assert await check_health(stack, name) == "SERVING", name
        problems, undecodable = _log_problems(stack, name)
        assert not problems, f"{name} logged:\n" + "\n".join(problems[:10])
        # One warning line at most per second, whatever the flood.
        assert 1 <= undecodable <= elapsed + 2, (name, undecodable, elapsed)
