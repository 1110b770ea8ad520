"""The processing part's lines in `streammesh bench`'s report (bench_processing measures), and
the counts that fail the run."""

from __future__ import annotations

import math
from typing import Any

from streammesh.cli.bench_processing import MEASURED

__all__ = ["processing_problems", "render_processing"]


def processing_problems(report: dict[str, Any] | None) -> list[str]:
    """A count off the reference (or a lost event): the run fails."""
    if report is None:
        return []
    problems = []
    cl, ol = report["closed_loop"], report["open_loop"]
    if cl["acked"] != cl["stored"]:
        problems.append(
            f"processing closed loop: {cl['acked']} acknowledged, {cl['stored']} stored"
        )
    if ol["acked"] != ol["stored"]:
        problems.append(f"processing open loop: {ol['acked']} acknowledged, {ol['stored']} stored")
    for name in ("alerts", "window_results"):
        c = ol[name]
        if c["received"] != c["expected"] or c["distinct"] != c["total"] or c["unexpected"]:
            problems.append(
                f"processing {name.replace('_', ' ')}: expected {c['expected']}, received "
                f"{c['received']}, {c['total'] - c['distinct']} doubled, {c['unexpected']} "
                "unexpected"
            )
    problems += [f"processing subscription failed: {e}" for e in ol["subscription_errors"]]
    return [f"PROCESSING COUNT WRONG: {p}" for p in problems]


def _f(value: Any, spec: str = ",.0f") -> str:
    return (
        "-"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else format(value, spec)
    )


def _lat(summary: dict[str, float]) -> str:
    return f"p50 {_f(summary['p50'], ',.1f')} ms, p99 {_f(summary['p99'], ',.1f')} ms " \
        f"({summary['count']:,.0f})"  # fmt: skip


def render_processing(report: dict[str, Any] | None) -> list[str]:
    if report is None:
        return []
    engine, cl, ol = report["engine_alone"], report["closed_loop"], report["open_loop"]
    cpu = report["processing_cpu_us_per_event"]
    t = report["targets"]
    services = ", ".join(f"{name} {_f(cpu[name], '+.1f')}" for name in MEASURED)
    alerts, results = ol["alerts"], ol["window_results"]
    return [
        "processing (3 windows: tumbling, hopping with p99, session; 5 rules: threshold, rate, "
        "sequence, absence, strict sequence)",
        f"  engine alone, one core: {_f(engine['events_per_s'])} events/s "
        f"({engine['cpu_us_per_event']:.2f} CPU us/event; target >= {t['engine_events_per_s']:,})",
        f"  closed loop with processing: {_f(cl['stored_eps'])} stored/s against "
        f"{_f(report['stored_eps_without'])} without: {report['stored_ratio']:.2f} (target >= "
        f"{t['stored_ratio']})",
        f"  processing CPU us/event (with - without): {services}",
        f"  open loop at {ol['offered_eps']:,.0f}/s: {ol['acked']:,} acknowledged, "
        f"{ol['stored']:,} stored; publish-ack {_lat(ol['publish_ack_ms'])}",
        f"  alert on SubscribeAlerts after the trigger's ack: {_lat(ol['alert_ms'])} (target p99 "
        f"< {t['alert_p99_ms']} ms; includes the {report['out_of_orderness_ms']:,} ms "
        "out-of-orderness the engine holds events for)",
        f"    ... after the watermark passed the trigger: {_lat(ol['alert_after_watermark_ms'])}",
        f"  window result stored after the watermark passed its end: "
        f"{_lat(ol['window_result_stored_ms'])} (target p99 < {t['window_result_p99_ms']} ms); "
        f"seen on SubscribeWindowResults: {_lat(ol['window_result_seen_ms'])}",
        f"  alerts: {sum(alerts['received'].values()):,} of {sum(alerts['expected'].values()):,} "
        f"expected, {alerts['total'] - alerts['distinct']} doubled; window results: "
        f"{sum(results['received'].values()):,} of {sum(results['expected'].values()):,} "
        f"expected, {results['total'] - results['distinct']} doubled, "
        f"{results['unexpected']} unexpected",
        *(
            f"  {name.replace('_', ' ')} subscription resumed {len(why)} times after: {why[0]}"
            for name, why in ol["subscription_resumes"].items()
            if why
        ),
    ]
