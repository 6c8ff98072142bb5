"""A real Prometheus server scrapes a running demo; every dashboard and alert query is run on it.

The demo (coordinator + 3 replicas x 2 ranks, one replica killed and
recovered) serves ``/metrics`` on the coordinator and every rank and lists
them for Prometheus (``file_sd_configs``). Prometheus (the Debian package,
installed by ``scripts/tools.sh``) scrapes them every second and evaluates
the alert rules of ``deploy/prometheus/rules``. Then, while the demo is still
up: every expression of every Grafana dashboard returns data (with finite
values), every alert expression evaluates, every rule is healthy on the
server, and every metric the dashboards and rules name is in the real
output.
"""

from __future__ import annotations

import io
import json
import math
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from recoveryd.demo.run import DemoConfig, run_demo
from recoveryd.testing.prometheus import LocalPrometheus, grafana_to_promql

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        shutil.which("prometheus") is None,
        reason="no prometheus binary (scripts/tools.sh installs the Debian package as root)",
    ),
]

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULE_FILES = sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
STEPS = 150


def dashboard_queries(path: Path) -> list[tuple[str, str]]:
    """(panel title, expression) of every target of every panel, rows included."""
    out: list[tuple[str, str]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for p in panels:
            walk(p.get("panels", []))
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((p.get("title", "?"), t["expr"]))

    walk(json.loads(path.read_text())["panels"])
    return out


def rule_queries() -> list[tuple[str, str]]:
    """(alert or record name, expression) of every rule."""
    return [
        (r.get("alert") or r.get("record"), r["expr"])
        for f in RULE_FILES
        for g in yaml.safe_load(f.read_text())["groups"]
        for r in g["rules"]
    ]


def metric_names(expr: str) -> set[str]:
    """The recoveryd metric names an expression reads."""
    return set(re.findall(r"\brecoveryd_[a-z0-9_]+", expr))


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalPrometheus, float]]:
    """A Prometheus that scraped a whole demo; yields it and a time the demo was still up."""
    work = tmp_path_factory.mktemp("prom")
    sd = work / "targets.json"
    with LocalPrometheus(work / "server", sd_file=sd, rule_files=RULE_FILES) as prom:
        prom.wait_ready()
        out = io.StringIO()
        result: list[int] = []
        config = DemoConfig(steps=STEPS, kill_at=30, hidden=128, prometheus_sd=str(sd), linger_s=25)
        demo = threading.Thread(
            target=lambda: result.append(run_demo(config, out=out, as_json=True))
        )
        demo.start()
        try:
            # Every replica, the restarted one included, is healthy at the last
            # step, and all six ranks are scraped: the demo now lingers.
            end = time.monotonic() + 150
            while time.monotonic() < end and demo.is_alive():
                done = prom.query(
                    f'recoveryd_coordinator_replica_step{{which="slowest"}} >= {STEPS}'
                    ' and on() recoveryd_coordinator_replicas{state="healthy"} == 3'
                    ' and on() count(up{component="agent"} == 1) == 6'
                )
                if done:
                    break
                time.sleep(0.5)
            else:
                pytest.fail(f"the demo never finished under Prometheus' eyes: {out.getvalue()}")
            time.sleep(4)  # a few more scrapes of the final state, every rank included
            at = time.time()
            targets = prom.api("targets")["activeTargets"]
            yield prom, at
        finally:
            demo.join(180)
        assert result == [0], out.getvalue()
        assert {t["labels"]["component"] for t in targets} == {"coordinator", "agent"}
        assert [t for t in targets if t["health"] != "up"] == []


def test_prometheus_scraped_the_coordinator_and_every_rank(
    scraped: tuple[LocalPrometheus, float],
) -> None:
    prom, at = scraped
    up = prom.query("up", at)
    by_component: dict[str, int] = {}
    for s in up:
        assert s["value"][1] == "1", s
        by_component[s["metric"]["component"]] = by_component.get(s["metric"]["component"], 0) + 1
    assert by_component == {"coordinator": 1, "agent": 6}
    # The restarted replica's recovery (and one at start-up, when a replica
    # starts after the others have stepped: it recovers too).
    recovered = prom.query('recoveryd_coordinator_plans_total{result="done"}', at)
    assert [float(s["value"][1]) >= 1 for s in recovered] == [True]
    joined = prom.query('sum(recoveryd_agent_recoveries_total{result="recovered"})', at)
    assert float(joined[0]["value"][1]) >= 2  # both ranks of the restarted replica


@pytest.mark.parametrize("dashboard", DASHBOARDS, ids=lambda p: p.name)
def test_every_dashboard_query_returns_data(
    scraped: tuple[LocalPrometheus, float], dashboard: Path
) -> None:
    prom, at = scraped
    queries = dashboard_queries(dashboard)
    assert len(queries) >= 10
    empty, not_finite = [], []
    for title, expr in queries:
        result = prom.query(grafana_to_promql(expr), at)
        if not result:
            empty.append((title, expr))
        elif not any(math.isfinite(float(s["value"][1])) for s in result):
            not_finite.append((title, expr, result))
    assert empty == []
    assert not_finite == []
    names = set().union(*(metric_names(e) for _, e in queries))
    assert names - prom.metric_names() == set()


def test_every_alert_rule_evaluates_on_real_data(scraped: tuple[LocalPrometheus, float]) -> None:
    prom, at = scraped
    rules = rule_queries()
    assert len(rules) >= 4
    for _name, expr in rules:
        prom.query(expr, at)  # raises on any error
        for metric in metric_names(expr):
            assert prom.query(f'count({{__name__=~"{metric}"}})', at), (_name, metric)
    loaded = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
    assert {r["name"] for r in loaded} == {n for n, _ in rules}
    assert [(r["name"], r.get("lastError")) for r in loaded if r["health"] != "ok"] == []
    # A clean demo (quick recoveries, nothing failed) fires nothing, and has
    # nothing pending either (most rules wait minutes before they fire).
    active = [(a["labels"]["alertname"], a["state"]) for a in prom.api("alerts")["alerts"]]
    assert active == []


def test_the_grafana_substitution_refuses_unknown_variables() -> None:
    from recoveryd.testing.prometheus import PrometheusError

    assert grafana_to_promql("rate(x[$__rate_interval])") == "rate(x[2m])"
    assert grafana_to_promql('x{namespace=~"$namespace"}') == 'x{namespace=~".*"}'
    with pytest.raises(PrometheusError, match="cluster"):
        grafana_to_promql('x{c="$cluster"}')
