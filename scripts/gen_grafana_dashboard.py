"""Write docs/grafana/streammesh.json: a Grafana dashboard of the stack's Prometheus metrics.

The panels are listed here, each with its PromQL; the JSON is generated so that the dashboard is
reviewed as this short list rather than as a thousand lines of Grafana's model.
tests/mesh/test_grafana_dashboard.py checks that the file is fresh, that every query parses
(promtool) and that every metric it names is one the services export.

    .venv/bin/python scripts/gen_grafana_dashboard.py          # rewrite it
    .venv/bin/python scripts/gen_grafana_dashboard.py --check  # exit 1 if it is stale

Import in Grafana: Dashboards > New > Import, upload the file, pick the Prometheus data source
that scrapes the stack (docs/prometheus/prometheus.yml: job "streammesh", label "service").
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "grafana" / "streammesh.json"

# Every query is scoped to the chosen job; `$__rate_interval` is Grafana's own safe rate window.
JOB = 'job="$job"'
FAULTS = 'grpc_code=~"Unknown|DeadlineExceeded|Unimplemented|Internal|Unavailable|DataLoss"'


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str
    queries: tuple[tuple[str, str], ...]
    """(PromQL, legend) pairs."""
    description: str = ""


ROWS: tuple[tuple[str, tuple[Panel, ...]], ...] = (
    (
        "Pipeline",
        (
            Panel(
                "Events in and stored",
                "ops",
                (
                    (
                        f"sum(rate(streammesh_ingest_events_accepted_total{{{JOB}}}[$__rate_interval]))",
                        "acknowledged",
                    ),
                    (
                        f"sum(rate(streammesh_storage_events_stored_total{{{JOB}}}[$__rate_interval]))",
                        "stored",
                    ),
                    (
                        f"sum(rate(streammesh_ingest_events_refused_total{{{JOB}}}[$__rate_interval]))",
                        "refused (schema)",
                    ),
                ),
                "Acknowledged by ingest, inserted by storage: the two lines meet when nothing queues up.",
            ),
            Panel(
                "Queue backlog",
                "short",
                (
                    (
                        f"sum(max by (partition) (streammesh_queue_unacked_events{{{JOB}}}))",
                        "unacked events",
                    ),
                    (f"sum(streammesh_processor_partition_lag{{{JOB}}})", "lag (not delivered)"),
                    (
                        f"sum(streammesh_processor_partition_pending{{{JOB}}})",
                        "pending (not acked)",
                    ),
                ),
            ),
            Panel(
                "Lag by partition",
                "short",
                (
                    (
                        f"max by (partition) (streammesh_processor_partition_lag{{{JOB}}})",
                        "p{{partition}}",
                    ),
                ),
            ),
            Panel(
                "Partitions owned, takeovers",
                "short",
                (
                    (f"streammesh_processor_partitions_owned{{{JOB}}}", "{{instance}}"),
                    (
                        f"sum(increase(streammesh_processor_takeovers_total{{{JOB}}}[$__rate_interval]))",
                        "takeovers",
                    ),
                ),
            ),
            Panel(
                "Back-pressure and dead letters",
                "ops",
                (
                    (
                        f"sum(rate(streammesh_ingest_backpressure_refusals_total{{{JOB}}}[$__rate_interval]))",
                        "batches refused (busy)",
                    ),
                    (
                        f"sum(rate(streammesh_processor_dead_letters_total{{{JOB}}}[$__rate_interval]))",
                        "dead letters",
                    ),
                    (
                        f"sum(rate(streammesh_processor_store_failures_total{{{JOB}}}[$__rate_interval]))",
                        "store failures (retried)",
                    ),
                ),
            ),
            Panel(
                "Stream processing outputs",
                "ops",
                (
                    (
                        f"sum(rate(streammesh_processor_window_results_total{{{JOB}}}[$__rate_interval]))",
                        "window results",
                    ),
                    (
                        f"sum(rate(streammesh_processor_alerts_total{{{JOB}}}[$__rate_interval]))",
                        "alerts",
                    ),
                    (
                        f"sum(rate(streammesh_processor_late_events_total{{{JOB}}}[$__rate_interval]))",
                        "late events",
                    ),
                ),
            ),
        ),
    ),
    (
        "gRPC",
        (
            Panel(
                "Requests by service",
                "reqps",
                (
                    (
                        f'sum by (service) (rate(grpc_server_handled_total{{{JOB},grpc_service!="grpc.health.v1.Health"}}[$__rate_interval]))',
                        "{{service}}",
                    ),
                ),
            ),
            Panel(
                "Server-error ratio by service",
                "percentunit",
                (
                    (
                        f"sum by (service) (rate(grpc_server_handled_total{{{JOB},{FAULTS}}}[$__rate_interval]))"
                        f" / sum by (service) (rate(grpc_server_handled_total{{{JOB}}}[$__rate_interval]))",
                        "{{service}}",
                    ),
                ),
                "Codes that are the server's fault, as in the shipped error-ratio alert.",
            ),
            Panel(
                "Unary p99 by service",
                "s",
                (
                    (
                        f'histogram_quantile(0.99, sum by (service, le) (rate(grpc_server_handling_seconds_bucket{{{JOB},grpc_type="unary"}}[$__rate_interval])))',
                        "{{service}}",
                    ),
                ),
            ),
            Panel(
                "Client calls by code",
                "reqps",
                (
                    (
                        f"sum by (service, grpc_code) (rate(grpc_client_handled_total{{{JOB}}}[$__rate_interval]))",
                        "{{service}} {{grpc_code}}",
                    ),
                ),
            ),
        ),
    ),
    (
        "Security",
        (
            Panel(
                "Refusals",
                "ops",
                (
                    (
                        f"sum by (reason) (rate(streammesh_gateway_token_refusals_total{{{JOB}}}[$__rate_interval]))",
                        "token: {{reason}}",
                    ),
                    (
                        f"sum by (reason) (rate(streammesh_policy_denials_total{{{JOB}}}[$__rate_interval]))",
                        "policy: {{reason}}",
                    ),
                    (
                        f"sum by (reason) (rate(streammesh_auth_failures_total{{{JOB}}}[$__rate_interval]))",
                        "login: {{reason}}",
                    ),
                ),
            ),
            Panel(
                "Lockouts",
                "short",
                (
                    (
                        f"sum(increase(streammesh_auth_lockouts_total{{{JOB}}}[$__rate_interval]))",
                        "accounts locked",
                    ),
                ),
            ),
            Panel(
                "Certificate expiry",
                "s",
                (
                    (
                        f"min by (service, identity) (streammesh_tls_certificate_expiry_timestamp_seconds{{{JOB}}}) - time()",
                        "{{service}} {{identity}}",
                    ),
                ),
                "Seconds until each service's certificate expires.",
            ),
        ),
    ),
    (
        "Processes",
        (
            Panel(
                "CPU by service",
                "percentunit",
                (
                    (
                        f"sum by (service) (rate(process_cpu_seconds_total{{{JOB}}}[$__rate_interval]))",
                        "{{service}}",
                    ),
                ),
            ),
            Panel(
                "Resident memory by service",
                "bytes",
                ((f"sum by (service) (process_resident_memory_bytes{{{JOB}}})", "{{service}}"),),
            ),
        ),
    ),
)


def queries() -> list[str]:
    """Every PromQL expression of the dashboard (for the tests)."""
    return [expr for _, panels in ROWS for panel in panels for expr, _ in panel.queries]


def _panel(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    return {
        "id": panel_id,
        "type": "timeseries",
        "title": panel.title,
        "description": panel.description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"x": x, "y": y, "w": 12, "h": 8},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
        "targets": [
            {
                "refId": chr(ord("A") + index),
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "expr": expr,
                "legendFormat": legend,
            }
            for index, (expr, legend) in enumerate(panel.queries)
        ],
    }


def dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    y = 0
    for title, row in ROWS:
        panels.append(
            {
                "id": len(panels) + 1,
                "type": "row",
                "title": title,
                "collapsed": False,
                "gridPos": {"x": 0, "y": y, "w": 24, "h": 1},
                "panels": [],
            }
        )
        y += 1
        for index, panel in enumerate(row):
            panels.append(_panel(panel, len(panels) + 1, 12 * (index % 2), y + 8 * (index // 2)))
        y += 8 * ((len(row) + 1) // 2)
    return {
        "uid": "streammesh",
        "title": "StreamMesh",
        "description": "The stack's pipeline, gRPC, security and process metrics (generated by "
        "scripts/gen_grafana_dashboard.py).",
        "tags": ["streammesh"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                },
                {
                    "name": "job",
                    "label": "job",
                    "type": "query",
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "query": "label_values(streammesh_build_info, job)",
                    "refresh": 1,
                    "current": {"text": "streammesh", "value": "streammesh"},
                },
            ]
        },
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(f"{OUTPUT} is stale: run scripts/gen_grafana_dashboard.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
