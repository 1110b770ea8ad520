"""Replies as people and scripts see them: tables, and JSON with every field."""

from __future__ import annotations

import json

import pytest
from google.protobuf import timestamp_pb2
from google.protobuf.message import Message

from streammesh.api.gateway.v1 import admin_pb2
from streammesh.cli.output import print_reply, reply_to_dict


def _at(seconds: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds)


ADA = admin_pb2.User(
    user_id="u-1", username="ada", roles=["analyst", "producer"], created_at=_at(1_780_000_000)
)
PAGED = {"next_page_token": ""}
LIST_REPLIES: list[tuple[Message, dict[str, object], str]] = [
    (admin_pb2.ListUsersResponse(), {"users": [], **PAGED}, "users: none"),
    (admin_pb2.ListSigningKeysResponse(), {"keys": []}, "keys: none"),
    (admin_pb2.ListAuditEventsResponse(), {"events": [], **PAGED}, "events: none"),
    (admin_pb2.ListDeadLettersResponse(), {"dead_letters": [], **PAGED}, "dead letters: none"),
]


def test_json_keeps_false_zero_and_empty_fields_and_nulls_unset_ones() -> None:
    data = reply_to_dict(admin_pb2.ListUsersResponse(users=[ADA]))
    assert data["next_page_token"] == ""
    (user,) = data["users"]
    assert user["disabled"] is False and user["mfa_enabled"] is False
    assert user["locked_until"] is None
    assert user["created_at"] == "2026-05-28T20:26:40Z"
    assert list(user) == [f.name for f in admin_pb2.User.DESCRIPTOR.fields]


@pytest.mark.parametrize(("reply", "as_json", "empty"), LIST_REPLIES)
def test_empty_lists_are_lists_in_json_and_said_in_tables(
    reply: Message, as_json: dict[str, object], empty: str, capsys: pytest.CaptureFixture[str]
) -> None:
    print_reply(reply, as_json=True)
    assert json.loads(capsys.readouterr().out) == as_json
    print_reply(reply, as_json=False)
    assert capsys.readouterr().out.splitlines() == [empty]


def test_users_table_and_the_next_page_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    locked = admin_pb2.User(
        user_id="u-2", username="bob", disabled=True, mfa_enabled=True, locked_until=_at(0)
    )
    print_reply(
        admin_pb2.ListUsersResponse(users=[ADA, locked], next_page_token="tok"), as_json=False
    )
    captured = capsys.readouterr()
    header, rule, *rows = captured.out.splitlines()
    assert header.split() == [
        "username",
        "roles",
        "disabled",
        "mfa",
        "locked",
        "until",
        "created",
        "tenant",
        "id",
    ]
    assert set(rule) <= {"-", " "}
    assert rows[0].split() == [
        "ada",
        "analyst,producer",
        "no",
        "no",
        "-",
        "2026-05-28",
        "20:26:40Z",
        "-",
        "u-1",
    ]
    assert rows[1].split()[:5] == ["bob", "-", "yes", "yes", "1970-01-01"]
    assert captured.err == "more: repeat with --page-token tok\n"


def test_single_records_print_as_lines(capsys: pytest.CaptureFixture[str]) -> None:
    print_reply(admin_pb2.SetUserDisabledResponse(user=ADA), as_json=False)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "user:"
    assert "  username: ada" in lines and "  disabled: no" in lines
    assert "  locked until: -" in lines
    print_reply(admin_pb2.RevokeSessionsResponse(revoked=0), as_json=False)
    assert capsys.readouterr().out == "revoked: 0\n"
    print_reply(admin_pb2.RevokeSessionsResponse(revoked=0), as_json=True)
    assert json.loads(capsys.readouterr().out) == {"revoked": 0}


def test_a_table_among_other_fields_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    key = admin_pb2.SigningKey(kid="k1", alg="EdDSA", created_at=_at(0))
    print_reply(admin_pb2.RotateSigningKeyResponse(active=key, retired=[key]), as_json=False)
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["active:", "  kid: k1"]
    assert lines[lines.index("retired:") + 1].split() == [
        "kid",
        "alg",
        "active",
        "created",
        "retired",
    ]
    print_reply(admin_pb2.RotateSigningKeyResponse(active=key), as_json=False)
    assert capsys.readouterr().out.splitlines()[-1] == "retired: none"


def test_a_dead_letter_with_its_events(capsys: pytest.CaptureFixture[str]) -> None:
    from streammesh.api.common.v1 import event_pb2

    event = event_pb2.QueuedEvent(
        event=event_pb2.Event(id="e1", key="k", type="t", payload=b"abc"), producer="p"
    )
    reply = admin_pb2.GetDeadLetterResponse(
        dead_letter=admin_pb2.DeadLetter(id=7, partition=2, event_ids=["e1"], error="refused"),
        events=[event],
        raw_fields=[admin_pb2.RawField(name=b"n", value=b"v")],
    )
    print_reply(reply, as_json=False)
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == ["dead letter:", "  id: 7", "  stream: -"]
    assert "  replayed at: -" in lines
    header = lines.index("events:") + 1
    assert lines[header].split() == [
        "id",
        "key",
        "type",
        "payload",
        "bytes",
        "producer",
        "ingested",
    ]
    assert lines[header + 2].split() == ["e1", "k", "t", "3", "p", "-"]
    assert lines[-1] == "raw fields: 1 item(s) (see --json)"
    print_reply(reply, as_json=True)
    data = json.loads(capsys.readouterr().out)
    assert data["dead_letter"]["replayed_at"] is None and data["dead_letter"]["replay_count"] == 0
    assert data["events"][0]["event"]["payload"] == "YWJj"
    assert data["events"][0]["event"]["event_time"] is None
    assert data["raw_fields"] == [{"name": "bg==", "value": "dg=="}]
