"""docs/grafana/streammesh.json: generated from scripts/gen_grafana_dashboard.py and fresh, every
query valid PromQL (promtool parses it as a recording rule), every metric it names one that the
services export (the README's metrics table, which tests of the metrics keep true)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from tests.mesh.test_prometheus import PROMTOOL, needs_prometheus

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gen_grafana_dashboard.py"
METRIC = re.compile(r"\b((?:grpc|streammesh|process)_[a-z_]+)\s*[{(\[]")


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_grafana_dashboard", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def test_the_dashboard_file_is_fresh_and_loads() -> None:
    checked = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stderr
    board = json.loads((ROOT / "docs" / "grafana" / "streammesh.json").read_text())
    graphs = [p for p in board["panels"] if p["type"] == "timeseries"]
    assert len(graphs) >= 12 and all(p["targets"] for p in graphs)
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))


def test_every_metric_the_dashboard_names_is_exported() -> None:
    readme = (ROOT / "README.md").read_text()
    named = {m for query in generator().queries() for m in METRIC.findall(query)}
    assert named, "no metric found in the dashboard's queries"
    missing = []
    for name in sorted(named):
        base = re.sub(r"_bucket$", "", name).replace("grpc_client_", "grpc_server_")
        if f"`{base}`" not in readme and not (
            base.startswith("process_") and "`process_*`" in readme
        ):
            missing.append(name)
    assert not missing, f"not in the README's metrics table: {missing}"


@needs_prometheus
def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    assert PROMTOOL is not None
    rules = [
        {
            "record": f"dashboard:query_{index}",
            "expr": query.replace("$__rate_interval", "5m").replace("$job", "streammesh"),
        }
        for index, query in enumerate(generator().queries())
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = subprocess.run(
        [PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rules)} rules found" in checked.stdout
