"""deploy/prometheus/alerts.yml and deploy/grafana/dnd-client.json against the metrics we export.

The alert rules are checked and unit-tested by promtool itself (Debian's
`prometheus` package; .ci/install-promtool installs it). Without promtool these
tests fail, with the command that installs it: they never skip.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from worker.metrics import METRIC_NAMES

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "dnd-client.json"
# Prometheus's own series a rule may use besides ours.
PROMETHEUS_SERIES = {"up"}
METRIC_RE = re.compile(r"\b(dnd_[a-z_]+)\b")


def promtool(*args: str, cwd: Path = PROMETHEUS) -> subprocess.CompletedProcess[str]:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not installed: run .ci/install-promtool "
            "(apt-get install prometheus), then run the tests again"
        )
    return subprocess.run(
        [path, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def test_promtool_checks_the_rules():
    done = promtool("check", "rules", "alerts.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 7 rules found" in done.stdout


def test_promtool_unit_tests_of_the_rules_pass():
    done = promtool("test", "rules", "alerts.test.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_the_rule_tests_can_fail(tmp_path):
    # The same tests against rules whose lag threshold is wrong must fail.
    rules = (PROMETHEUS / "alerts.yml").read_text().replace("for: 2m\n", "for: 20m\n", 1)
    (tmp_path / "alerts.yml").write_text(rules)
    (tmp_path / "alerts.test.yml").write_text((PROMETHEUS / "alerts.test.yml").read_text())
    done = promtool("test", "rules", "alerts.test.yml", cwd=tmp_path)
    assert done.returncode != 0
    assert "DndRecoveryPointAboveTarget" in done.stdout + done.stderr


def _rule_exprs() -> list[str]:
    doc = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    return [rule["expr"] for group in doc["groups"] for rule in group["rules"]]


def test_every_alert_names_only_metrics_we_export():
    for expr in _rule_exprs():
        names = set(METRIC_RE.findall(expr))
        assert names or "up{" in expr, expr
        assert names <= set(METRIC_NAMES), (expr, names - set(METRIC_NAMES))


def _dashboard_exprs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        return found + [e for value in node.values() for e in _dashboard_exprs(value)]
    if isinstance(node, list):
        return [e for item in node for e in _dashboard_exprs(item)]
    return []


def test_the_dashboard_is_valid_json_and_shows_lag_throughput_outcomes_kept():
    dashboard = json.loads(DASHBOARD.read_text())
    titles = " / ".join(panel["title"] for panel in dashboard["panels"])
    for topic in ("Recovery point", "Throughput", "Run outcomes", "kept-aside"):
        assert topic in titles, titles
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_every_dashboard_expr_names_a_metric_we_export():
    exprs = _dashboard_exprs(json.loads(DASHBOARD.read_text()))
    assert len(exprs) >= 10
    for expr in exprs:
        names = set(METRIC_RE.findall(expr))
        assert names, f"names no metric of ours: {expr}"
        assert names <= set(METRIC_NAMES), (expr, names - set(METRIC_NAMES))


def test_every_dashboard_expr_is_valid_promql(tmp_path):
    # promtool parses each expression as a recording rule.
    exprs = _dashboard_exprs(json.loads(DASHBOARD.read_text()))
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:expr_{i}", "expr": expr} for i, expr in enumerate(exprs)
                ],
            }
        ]
    }
    (tmp_path / "dashboard.yml").write_text(yaml.safe_dump(rules))
    done = promtool("check", "rules", "dashboard.yml", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
