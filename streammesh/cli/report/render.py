"""The report as text for the terminal, Markdown, and one self-contained HTML file whose plots
(matplotlib, drawn to PNG and embedded as data: URIs) travel with it."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterator

from streammesh.cli.report.analyse import Analysis

__all__ = ["to_html", "to_markdown", "to_text"]

TITLES = {
    "throughput": "Throughput",
    "latency": "Latency",
    "clustering": "Clustering",
    "persistence": "Persistence",
    "security": "Security posture",
}


def _header(taken: str, window: float) -> str:
    return f"StreamMesh report, {taken}, measured over {window:.1f} s"


def to_text(report: Analysis, taken: str, window: float) -> str:
    lines = [_header(taken, window), ""]
    for topic, rows in report.sections.items():
        lines.append(TITLES.get(topic, topic))
        width = max((len(name) for name, _ in rows), default=0)
        lines += [f"  {name:<{width}}  {value}" for name, value in rows]
        lines.append("")
    lines.append("Findings, by impact")
    ranked = report.ranked()
    if not ranked:
        lines.append("  none: every measured figure is within its bound")
    for n, finding in enumerate(ranked, 1):
        lines.append(f"  {n}. [{finding.severity}] {finding.title}")
        lines.append(f"     measured: {finding.figure}")
        lines.append(f"     do: {finding.recommendation}")
    return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def to_markdown(report: Analysis, taken: str, window: float) -> str:
    out = [f"# {_header(taken, window)}", ""]
    for topic, rows in report.sections.items():
        out += [f"## {TITLES.get(topic, topic)}", "", "| figure | value |", "|---|---|"]
        out += [f"| {_md(name)} | {_md(value)} |" for name, value in rows]
        out.append("")
    out += ["## Findings, by impact", ""]
    ranked = report.ranked()
    if not ranked:
        out.append("None: every measured figure is within its bound.")
    for n, finding in enumerate(ranked, 1):
        out.append(f"{n}. **[{finding.severity}] {_md(finding.title)}**  ")
        out.append(f"   measured: {_md(finding.figure)}  ")
        out.append(f"   do: {_md(finding.recommendation)}")
    return "\n".join(out) + "\n"


def _plots(report: Analysis) -> Iterator[tuple[str, str]]:
    """(title, PNG as base64) of each plot there is data for."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    charts = (
        ("CPU per stored event (us), by service", report.cpu_us_per_event),
        ("Ack-to-stored latency (ms)", report.ack_to_stored_ms),
        ("Partitions owned, by processor replica", report.partitions_by_replica),
    )
    for title, data in charts:
        if not data:
            continue
        figure, axes = plt.subplots(figsize=(6, 2.8), dpi=100)
        names = [str(k) for k in data]
        axes.barh(names, [float(v) for v in data.values()], color="#3a6ea5")
        axes.set_title(title, fontsize=10)
        axes.invert_yaxis()
        for index, value in enumerate(data.values()):
            axes.text(float(value), index, f" {float(value):,.1f}", va="center", fontsize=8)
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        plt.close(figure)
        yield title, base64.b64encode(buffer.getvalue()).decode()


def to_html(report: Analysis, taken: str, window: float) -> str:
    e = html.escape
    body = [f"<h1>{e(_header(taken, window))}</h1>"]
    ranked = report.ranked()
    body.append("<h2>Findings, by impact</h2>")
    if not ranked:
        body.append("<p>None: every measured figure is within its bound.</p>")
    else:
        body.append("<ol>")
        for f in ranked:
            body.append(
                f'<li class="{e(f.severity)}"><b>[{e(f.severity)}] {e(f.title)}</b><br>'
                f"measured: {e(f.figure)}<br>do: {e(f.recommendation)}</li>"
            )
        body.append("</ol>")
    for topic, rows in report.sections.items():
        body.append(f"<h2>{e(TITLES.get(topic, topic))}</h2><table>")
        body += [f"<tr><th>{e(name)}</th><td>{e(value)}</td></tr>" for name, value in rows]
        body.append("</table>")
    for title, png in _plots(report):
        body.append(f'<figure><img alt="{e(title)}" src="data:image/png;base64,{png}"></figure>')
    style = (
        "body{font-family:sans-serif;max-width:60em;margin:2em auto;color:#222}"
        "table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:.2em .6em;"
        "text-align:left;vertical-align:top}th{font-weight:normal;color:#555}"
        "li.critical b{color:#b00}li.high b{color:#c60}li.medium b{color:#886}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{e(_header(taken, window))}"
        f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    )
