"""Rules and windows through the real gateway over TLS, with real auth tokens and real storage
(Postgres): create, update and disable as versions, INVALID_ARGUMENT naming the bad part, the
roles (rule-admin changes, analyst reads), and tenant isolation (another tenant's ids are
NOT_FOUND, its listings empty)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import grpc
import pytest

from streammesh.api.gateway.v1 import admin_pb2
from streammesh.api.gateway.v1 import rules_pb2 as pb
from streammesh.api.gateway.v1 import rules_pb2_grpc as pb_grpc
from tests.gateway.conftest import PASSWORD, Person, Stack
from tests.gateway.test_query_api import _cli, _cli_config
from tests.gateway.test_schema_registry import violations_of
from tests.gateway.test_tenants import login
from tests.storage.test_definitions import HOT, PER_MINUTE

if TYPE_CHECKING:
    Rules = pb_grpc.RuleServiceAsyncStub
else:
    Rules = pb_grpc.RuleServiceStub

pytestmark = pytest.mark.timeout(180)


@dataclass
class People:
    """Per tenant ("a", "b"): a rule-admin and an analyst; "a-producer" has neither role."""

    by_name: dict[str, Person]

    def call(self, name: str) -> dict[str, Any]:
        return {"metadata": self.by_name[name].bearer(), "timeout": 10}


@pytest.fixture(scope="module")
async def people(stack: Stack) -> People:
    run = uuid.uuid4().hex[:6]
    platform = stack.admin_person.bearer()
    roles = {"rules": ("rule-admin",), "analyst": ("analyst",), "producer": ("producer",)}
    found: dict[str, Person] = {}
    for prefix in ("a", "b"):
        tenant = f"r{prefix}-{run}"
        await stack.admin.CreateTenant(
            admin_pb2.CreateTenantRequest(tenant_id=tenant, display_name=tenant),
            metadata=platform,
            timeout=10,
        )
        for kind, granted in roles.items():
            username = f"{prefix}-{kind}-{run}"
            await stack.admin.CreateUser(
                admin_pb2.CreateUserRequest(
                    username=username, password=PASSWORD, roles=list(granted), tenant=tenant
                ),
                metadata=platform,
                timeout=10,
            )
            found[f"{prefix}-{kind}"] = await login(stack, username, tenant, granted)
    return People(found)


@pytest.fixture
def rules(stack: Stack) -> Rules:
    return cast(Rules, pb_grpc.RuleServiceStub(stack.gateway_channel))


async def failure(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def test_a_rule_admin_manages_rules_as_versions(rules: Rules, people: People) -> None:
    admin = people.call("a-rules")
    created = await rules.CreateRule(pb.CreateRuleRequest(definition_json=json.dumps(HOT)), **admin)
    assert (created.rule.id, created.rule.version, created.rule.enabled) == ("hot-sensor", 1, True)
    assert created.rule.created_by == people.by_name["a-rules"].username
    assert json.loads(created.rule.definition_json)["tenant"].startswith("ra-")
    updated = await rules.UpdateRule(
        pb.UpdateRuleRequest(
            rule_id="hot-sensor", definition_json=json.dumps({**HOT, "value": 95})
        ),
        **admin,
    )
    assert updated.rule.version == 2
    disabled = await rules.SetRuleEnabled(
        pb.SetRuleEnabledRequest(rule_id="hot-sensor", enabled=False), **admin
    )
    assert (disabled.changed, disabled.rule.version, disabled.rule.enabled) == (True, 3, False)
    # Analysts read; the first version is still there.
    reader = people.call("a-analyst")
    first = await rules.GetRule(pb.GetRuleRequest(rule_id="hot-sensor", version=1), **reader)
    assert (json.loads(first.rule.definition_json)["value"], first.latest_version) == (80, 3)
    listed = await rules.ListRules(pb.ListRulesRequest(), **reader)
    assert [(r.id, r.version, r.enabled) for r in listed.rules] == [("hot-sensor", 3, False)]


async def test_windows_have_their_own_calls(rules: Rules, people: People) -> None:
    admin = people.call("a-rules")
    created = await rules.CreateWindow(
        pb.CreateWindowRequest(definition_json=json.dumps(PER_MINUTE)), **admin
    )
    assert created.window.version == 1
    off = await rules.SetWindowEnabled(
        pb.SetWindowEnabledRequest(window_id="orders-per-minute", enabled=False), **admin
    )
    assert (off.window.version, off.window.enabled) == (2, False)
    listed = await rules.ListWindows(pb.ListWindowsRequest(), **people.call("a-analyst"))
    assert [w.id for w in listed.windows] == ["orders-per-minute"]
    # The window's id is no rule.
    missing = await failure(
        rules.GetRule(pb.GetRuleRequest(rule_id="orders-per-minute"), **people.call("a-analyst"))
    )
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    results = await rules.ListWindowResults(
        pb.ListWindowResultsRequest(window_id="orders-per-minute"), **people.call("a-analyst")
    )
    assert list(results.window_results) == [] and results.next_page_token == ""


async def test_a_bad_definition_is_refused_naming_the_bad_part(
    rules: Rules, people: People
) -> None:
    admin = people.call("b-rules")
    rule = {"id": "seq", "kind": "sequence", "steps": [{"type": "a"}, {"type": "b"}], "within": "x"}
    error = await failure(
        rules.CreateRule(pb.CreateRuleRequest(definition_json=json.dumps(rule)), **admin)
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations_of(error)[0][0] == "definition.within"
    window = {**PER_MINUTE, "aggregates": [{"name": "x", "fn": "median"}]}
    error = await failure(
        rules.CreateWindow(pb.CreateWindowRequest(definition_json=json.dumps(window)), **admin)
    )
    assert violations_of(error)[0][0] == "definition.aggregates[0].fn"
    error = await failure(rules.CreateRule(pb.CreateRuleRequest(definition_json="{"), **admin))
    assert violations_of(error)[0][0] == "definition_json"


async def test_roles(rules: Rules, people: People) -> None:
    document = json.dumps({**HOT, "id": "by-analyst"})
    for who, call in (
        (
            "a-analyst",
            rules.CreateRule(
                pb.CreateRuleRequest(definition_json=document), **people.call("a-analyst")
            ),
        ),
        ("a-producer", rules.ListRules(pb.ListRulesRequest(), **people.call("a-producer"))),
        ("a-producer", rules.ListAlerts(pb.ListAlertsRequest(), **people.call("a-producer"))),
    ):
        error = await failure(call)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED, who
    # A rule-admin reads too (to see what it changes).
    await rules.ListAlerts(pb.ListAlertsRequest(), **people.call("a-rules"))


async def test_tenants_are_isolated(rules: Rules, people: People) -> None:
    mine = {**HOT, "id": "a-only"}
    await rules.CreateRule(
        pb.CreateRuleRequest(definition_json=json.dumps(mine)), **people.call("a-rules")
    )
    other = people.call("b-rules")
    for call in (
        rules.GetRule(pb.GetRuleRequest(rule_id="a-only"), **people.call("b-analyst")),
        rules.UpdateRule(
            pb.UpdateRuleRequest(rule_id="a-only", definition_json=json.dumps(mine)), **other
        ),
        rules.SetRuleEnabled(pb.SetRuleEnabledRequest(rule_id="a-only", enabled=False), **other),
    ):
        assert (await failure(call)).code() == grpc.StatusCode.NOT_FOUND
    listed = await rules.ListRules(pb.ListRulesRequest(), **people.call("b-analyst"))
    assert "a-only" not in [r.id for r in listed.rules]
    # A document naming another tenant is refused, not written there.
    forged = json.dumps({**HOT, "id": "forged", "tenant": people.by_name["a-rules"].username})
    error = await failure(rules.CreateRule(pb.CreateRuleRequest(definition_json=forged), **other))
    assert violations_of(error)[0][0] == "definition.tenant"
    # The id is free in B.
    created = await rules.CreateRule(
        pb.CreateRuleRequest(definition_json=json.dumps(mine)), **other
    )
    assert created.rule.version == 1


WINDOW_YAML = """\
# per account, every 10 seconds
id: cli-amounts
event_type: payment
kind: tumbling
size: 10s
aggregates:
  - {name: payments, fn: count}
  - {name: p95, fn: p95, field: payload.amount}
"""
RULE_YAML = """\
id: cli-large
kind: threshold
activation: 2026-12-01T12:00:00Z
match: {type: payment}
field: payload.amount
op: gt
value: 900
mode: level
count: 3
within: 10s
"""


async def test_the_cli_creates_lists_and_disables_from_yaml_files(
    stack: Stack, people: People, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`streammesh window|rule create` from the YAML form the docs show, `list` and `disable`
    (tenant b: the tests above list tenant a's rules and windows exactly)."""
    (tmp_path / "state").mkdir()
    config = _cli_config(stack, people.by_name["b-rules"], tmp_path / "state")
    files = {}
    for name, text in (("window", WINDOW_YAML), ("rule", RULE_YAML)):
        files[name] = tmp_path / f"{name}.yaml"
        files[name].write_text(text, encoding="utf-8")
        assert await _cli(config, name, "create", str(files[name])) == 0
    out = capsys.readouterr().out
    assert "created window cli-amounts version 1" in out
    assert "created rule cli-large version 1" in out

    def row(listing: str, definition_id: str) -> list[str]:
        return next(line.split() for line in listing.splitlines() if line.startswith(definition_id))

    for kind, definition_id, shape in (
        ("rule", "cli-large", "threshold"),
        ("window", "cli-amounts", "tumbling"),
    ):
        assert await _cli(config, kind, "list") == 0
        assert row(capsys.readouterr().out, definition_id)[1:4] == ["1", "yes", shape]
        assert await _cli(config, kind, "disable", definition_id) == 0
        assert f"disabled {kind} {definition_id}: version 2" in capsys.readouterr().out
        assert await _cli(config, kind, "list") == 0
        assert row(capsys.readouterr().out, definition_id)[1:3] == ["2", "no"]
    assert await _cli(config, "rule", "show", "cli-large", "--version", "1") == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["activation"], shown["within"], shown["count"]) == (
        "2026-12-01T12:00:00Z",
        "10s",
        3,
    )

    # A YAML typo is named with its line before anything is sent (the service's refusals of
    # what the engine cannot run: tests/e2e/test_cli.py).
    files["rule"].write_text(
        RULE_YAML.replace("{type: payment}", "{type: payment"), encoding="utf-8"
    )
    assert await _cli(config, "rule", "update", "cli-large", str(files["rule"])) == 2
    err = capsys.readouterr().err
    assert "is neither JSON nor YAML" in err and "at line 5 column 6" in err
