"""The report's analysis over hand-made observations (pure logic): each risky setting or state
gives its finding with the measured figure, ranked by impact; a clean observation gives none."""

from __future__ import annotations

import datetime as dt

from streammesh.cli.report.analyse import analyse
from streammesh.cli.report.observe import Certificate, Listener, Observation
from streammesh.cli.stack import ServiceState
from streammesh.cli.status_metrics import Reading

NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)


def _reading(at: float, **totals: float) -> Reading:
    return Reading(at=at, samples={name: [({}, value)] for name, value in totals.items()})


def _observation(**changes: object) -> Observation:
    states = [
        ServiceState("ingest", 1, True, "SERVING", "127.0.0.1:1"),
        ServiceState("storage", 2, True, "SERVING", "127.0.0.1:2"),
    ]
    seen = Observation(
        window_seconds=10.0,
        replicas=states,
        before={
            "ingest": _reading(
                0, streammesh_ingest_events_accepted_total=0, process_cpu_seconds_total=1
            ),
            "storage": _reading(
                0, streammesh_storage_events_stored_total=0, process_cpu_seconds_total=1
            ),
        },
        after={
            "ingest": _reading(
                10, streammesh_ingest_events_accepted_total=10_000, process_cpu_seconds_total=3
            ),
            "storage": _reading(
                10, streammesh_storage_events_stored_total=10_000, process_cpu_seconds_total=2
            ),
        },
        redis={"appendonly": "yes", "appendfsync": "everysec", "save": "", "used_memory": 1},
        postgres={
            "fsync": "on",
            "synchronous_commit": "on",
            "full_page_writes": "on",
            "wal_level": "replica",
        },
        certificates=[
            Certificate("ingest", NOW - dt.timedelta(hours=1), NOW + dt.timedelta(days=1))
        ],
        listeners=[Listener("ingest", True, True), Listener("gateway", True, False)],
        users=[
            {
                "tenant": "default",
                "username": "ada",
                "roles": ["admin"],
                "disabled": False,
                "mfa_enabled": True,
                "locked_until": None,
            }
        ],
        taken_at=NOW,
    )
    for name, value in changes.items():
        setattr(seen, name, value)
    return seen


def test_a_clean_stack_has_no_finding_and_its_figures() -> None:
    report = analyse(_observation())
    assert report.findings == []
    assert report.events_in_per_second == 1000 and report.stored_per_second == 1000
    # 2 CPU seconds of ingest over 10,000 stored events = 200 us/event, storage 100 us/event.
    assert report.cpu_us_per_event == {"ingest": 200.0, "storage": 100.0}
    throughput = dict(report.sections["throughput"])
    assert throughput["bottleneck stage (most CPU per event)"] == "ingest"
    persistence = dict(report.sections["persistence"])
    assert persistence["a power loss would lose"].startswith("up to ~1 s")


def test_each_risk_gives_its_finding_ranked_by_impact() -> None:
    seen = _observation(
        redis={"appendonly": "yes", "appendfsync": "no", "save": "", "used_memory": 1},
        postgres={
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "on",
            "wal_level": "minimal",
        },
        certificates=[
            Certificate("storage", NOW - dt.timedelta(days=2), NOW - dt.timedelta(minutes=1))
        ],
        listeners=[Listener("storage", False, False)],
        users=[
            {
                "tenant": "t1",
                "username": "bob",
                "roles": ["tenant-admin"],
                "disabled": False,
                "mfa_enabled": False,
                "locked_until": None,
            }
        ],
    )
    ranked = analyse(seen).ranked()
    titles = [f.title for f in ranked]
    assert [f.severity for f in ranked] == sorted(
        (f.severity for f in ranked), key=("critical", "high", "medium", "low").index
    )
    assert "PostgreSQL runs without fsync: a power loss can corrupt or lose stored events" in titles
    assert "PostgreSQL acknowledges commits before they are durable" in titles
    assert "certificate storage has expired" in titles
    assert "storage accepts a peer it should refuse" in titles
    mfa = next(f for f in ranked if "second factor" in f.title)
    assert mfa.severity == "high" and mfa.figure == "t1/bob"  # a privileged account
    fsync = next(f for f in ranked if f.title.startswith("Redis leaves fsync"))
    assert "~30,000 events" in fsync.figure  # 30 s at the measured 1,000/s


def test_aof_off_reports_the_backlog_at_risk() -> None:
    ingest_after = _reading(10, streammesh_ingest_events_accepted_total=10_000)
    ingest_after.samples["streammesh_queue_unacked_events"] = [
        ({"partition": "0"}, 40.0),
        ({"partition": "1"}, 2.0),
    ]
    seen = _observation(
        redis={"appendonly": "no", "appendfsync": "everysec", "save": "", "used_memory": 1}
    )
    seen.after["ingest"] = ingest_after
    finding = analyse(seen).ranked()[0]
    assert (
        finding.severity == "critical"
        and "Redis restart loses acknowledged events" in finding.title
    )
    assert finding.figure == "appendonly no; backlog now 42 events"


def test_missing_sources_are_gaps_not_guesses() -> None:
    seen = _observation(before={}, after={}, redis={}, postgres={}, users=None)
    seen.gaps = {"redis": "Redis did not answer", "accounts": "no admin session"}
    report = analyse(seen)
    assert report.findings == []
    assert dict(report.sections["persistence"])["Redis"] == "Redis did not answer"
    assert dict(report.sections["security"])["accounts"] == "no admin session"
    assert "not measured" in dict(report.sections["throughput"])["events/s"]
