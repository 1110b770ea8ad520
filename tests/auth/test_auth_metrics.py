"""Auth's security metrics on its real server (real Postgres, Redis, mTLS), read from its own
registry after real flows: an MFA enrolment, failed logins by reason, a lockout; no label
carries the user name."""

from __future__ import annotations

from tests.auth.conftest import AuthFactory
from tests.auth.flows import FakeClock, enrol, failure, register, start, unique_name


async def test_failures_by_reason_lockouts_and_enrolments_are_counted(
    auth_factory: AuthFactory, clock: FakeClock
) -> None:
    auth = await auth_factory(lockout_threshold=3)
    stub = auth.stub()
    username = unique_name()
    await register(stub, username)
    await enrol(stub, username, clock)
    await failure(start(stub, "nobody-" + username, "some password"))
    for guess in ("guess number 1", "guess number 2", "guess number 3"):
        await failure(start(stub, username, guess))
    await failure(start(stub, username))  # locked: the right password is refused too
    registry = auth.server.metrics.registry

    def sample(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    assert sample("streammesh_auth_mfa_enrolments_total") == 1
    assert sample("streammesh_auth_lockouts_total") == 1
    by_reason = {"action": "login_password"}
    assert sample("streammesh_auth_failures_total", **by_reason, reason="bad_credentials") == 3
    assert sample("streammesh_auth_failures_total", **by_reason, reason="unknown_user") == 1
    assert sample("streammesh_auth_failures_total", **by_reason, reason="locked") == 1
    labels = {
        value
        for family in registry.collect()
        if family.name.startswith("streammesh_auth")
        for sample_ in family.samples
        for value in sample_.labels.values()
    }
    assert not any(username in value for value in labels)
