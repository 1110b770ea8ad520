"""AIP-158 page tokens (streammesh.mesh.paging): bound to the query and the principal, refused
with INVALID_ARGUMENT when replayed with another query, by another principal, edited, forged,
expired or malformed; page sizes as AIP-158 says."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.storage.paging import event_page_scope
from streammesh.mesh.errors import InvalidArgument
from streammesh.mesh.paging import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    MAX_TOKEN_CHARS,
    PageTokens,
    Principal,
    derive_page_token_key,
    page_size,
)

KEY = derive_page_token_key(b"a service secret of 32 bytes....", "storage.events")
TOKENS = PageTokens([KEY], max_age_seconds=3600)
ALICE = Principal(tenant="acme", subject="alice")
NOW = 1_800_000_000.0
SCOPE = event_page_scope(
    tenant="acme",
    filter='payload.amount > 10 type:"order.*"',
    keys=["k2", "k1", "k1"],
    types=["order.created"],
    start_time=(100, 5),
    end_time=None,
)


def issued(position: dict[str, Any] | None = None, **overrides: Any) -> str:
    arguments: dict[str, Any] = {"scope": SCOPE, "principal": ALICE, "now": NOW} | overrides
    return TOKENS.issue(position or {"seq": 4711}, **arguments)


def refusal(token: str, **overrides: Any) -> str:
    arguments: dict[str, Any] = {"scope": SCOPE, "principal": ALICE, "now": NOW} | overrides
    with pytest.raises(InvalidArgument) as caught:
        TOKENS.open(token, **arguments)
    error = caught.value
    assert error.field_violations[0][0] == "page_token"
    return error.message


def test_round_trip_and_first_page() -> None:
    token = issued({"seq": 4711})
    assert TOKENS.open(token, scope=SCOPE, principal=ALICE, now=NOW + 10) == {"seq": 4711}
    assert TOKENS.open("", scope=SCOPE, principal=ALICE, now=NOW) is None
    assert (
        len(token) < 150
        and "alice" not in base64.urlsafe_b64decode(token.split(".")[0] + "==").decode()
    )


def test_keys_and_types_are_sets_and_page_size_is_not_bound() -> None:
    same = event_page_scope(
        tenant="acme",
        filter='payload.amount > 10 type:"order.*"',
        keys=["k1", "k2"],
        types=["order.created", "order.created"],
        start_time=(100, 5),
    )
    assert TOKENS.open(issued(), scope=same, principal=ALICE, now=NOW) == {"seq": 4711}


@pytest.mark.parametrize(
    "change",
    [
        {"filter": 'payload.amount > 11 type:"order.*"'},
        {"filter": 'payload.amount > 10  type:"order.*"'},  # the request differs: another query
        {"keys": ["k1"]},
        {"types": ["order.created", "order.shipped"]},
        {"start_time": (100, 6)},
        {"end_time": (200, 0)},
        {"tenant": "other"},
    ],
)
def test_another_query_is_refused_and_says_so(change: dict[str, Any]) -> None:
    fields: dict[str, Any] = {
        "tenant": "acme",
        "filter": 'payload.amount > 10 type:"order.*"',
        "keys": ["k1", "k2"],
        "types": ["order.created"],
        "start_time": (100, 5),
        "end_time": None,
    } | change
    message = refusal(issued(), scope=event_page_scope(**fields))
    assert "belongs to a different query" in message


@pytest.mark.parametrize(
    "other", [Principal("acme", "bob"), Principal("globex", "alice"), Principal("acme", "alice ")]
)
def test_another_principal_is_refused(other: Principal) -> None:
    assert "not a page token issued to this caller" in refusal(issued(), principal=other)


def test_tenant_and_subject_cannot_be_shifted_into_each_other() -> None:
    token = TOKENS.issue({"seq": 1}, scope=SCOPE, principal=Principal("ac", "mealice"), now=NOW)
    refusal(token, principal=Principal("acme", "alice"))


def test_an_edited_position_is_refused() -> None:
    body_text, _, tag = issued({"seq": 4711}).partition(".")
    body = json.loads(base64.urlsafe_b64decode(body_text + "=="))
    body["p"]["seq"] = 1
    forged = base64.urlsafe_b64encode(json.dumps(body).encode()).rstrip(b"=").decode()
    assert "not a page token issued" in refusal(f"{forged}.{tag}")


def test_every_single_character_edit_is_refused() -> None:
    token = issued()
    alphabet = "ABCabc019-_."
    for index, char in enumerate(token):
        for replacement in alphabet:
            if replacement == char:
                continue
            edited = token[:index] + replacement + token[index + 1 :]
            try:
                opened = TOKENS.open(edited, scope=SCOPE, principal=ALICE, now=NOW)
            except InvalidArgument:
                continue
            # base64 tails: a different last character can decode to the same bytes
            assert opened == {"seq": 4711}, (index, replacement)


def test_keys_rotate_and_a_retired_key_stops_verifying() -> None:
    new = derive_page_token_key(b"the next secret of 32 bytes.....", "storage.events")
    old_token = issued()
    rotated = PageTokens([new, KEY])
    assert rotated.open(old_token, scope=SCOPE, principal=ALICE, now=NOW) == {"seq": 4711}
    new_token = rotated.issue({"seq": 9}, scope=SCOPE, principal=ALICE, now=NOW)
    with pytest.raises(InvalidArgument):
        TOKENS.open(new_token, scope=SCOPE, principal=ALICE, now=NOW)
    with pytest.raises(InvalidArgument):
        PageTokens([new]).open(old_token, scope=SCOPE, principal=ALICE, now=NOW)


def test_purposes_get_different_keys() -> None:
    secret = b"a service secret of 32 bytes...."
    assert derive_page_token_key(secret, "a") != derive_page_token_key(secret, "b")
    with pytest.raises(ValueError, match="at least 16 bytes"):
        derive_page_token_key(b"short", "a")
    with pytest.raises(ValueError, match="at least 16 bytes"):
        PageTokens([b"short"])


def test_expired_and_future_tokens() -> None:
    assert "expired" in refusal(issued(), now=NOW + 3601)
    assert TOKENS.open(issued(), scope=SCOPE, principal=ALICE, now=NOW + 3600) is not None
    assert "not a page token" in refusal(issued(now=NOW + 600))
    forever = PageTokens([KEY])
    assert forever.open(issued(), scope=SCOPE, principal=ALICE, now=NOW + 10**9) is not None


@pytest.mark.parametrize(
    "token",
    ["x", ".", "a.b", "!!!.!!!", "e30.AAAA", "A" * (MAX_TOKEN_CHARS + 1), "bnVsbA.AAAA"],
)
def test_garbage_is_refused(token: str) -> None:
    assert "not a page token" in refusal(token)


def test_a_scope_with_values_json_does_not_hold_exactly_is_a_bug_not_a_token() -> None:
    with pytest.raises(TypeError):
        TOKENS.issue({"seq": 1}, scope={"keys": {"a"}}, principal=ALICE, now=NOW)


@settings(max_examples=500, deadline=None)
@given(token=st.one_of(st.text(max_size=200), st.text("ABCabc0123456789-_.", max_size=200)))
def test_any_text_opens_or_is_invalid_argument(token: str) -> None:
    try:
        position = TOKENS.open(token, scope=SCOPE, principal=ALICE, now=NOW)
    except InvalidArgument:
        return
    assert position is None and token == ""


def test_page_size_rules() -> None:
    assert page_size(0) == DEFAULT_PAGE_SIZE == 100
    assert page_size(1) == 1
    assert page_size(MAX_PAGE_SIZE) == MAX_PAGE_SIZE == 1000
    assert page_size(MAX_PAGE_SIZE + 1) == MAX_PAGE_SIZE  # coerced (AIP-158), not refused
    assert page_size(0, default=50, maximum=500) == 50
    with pytest.raises(InvalidArgument) as caught:
        page_size(-1)
    assert caught.value.field_violations[0][0] == "page_size"
