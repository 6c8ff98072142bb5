"""Lint for the Grafana dashboards and provisioning under deploy/grafana.

Every dashboard JSON is checked the way a reviewer would: a fixed uid, the
``datasource`` variable used by every panel and query, a unit and a place on
the grid for every panel, no hard-coded ``rate()`` windows, only metric names
recoveryd really exports, and every expression parsed by the real ``promtool``.
The checker functions return problems as strings, so the tests at the bottom
can prove each check fails on a small bad input.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from recoveryd.metrics import AgentMetrics, CoordinatorMetrics

GRAFANA = Path(__file__).resolve().parents[2] / "deploy" / "grafana"
DASHBOARD_FILES = sorted((GRAFANA / "dashboards").glob("*.json"))
DATASOURCES_YML = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARDS_YML = GRAFANA / "provisioning" / "dashboards" / "recoveryd.yml"
DASHBOARDS_PATH = "/var/lib/grafana/dashboards/recoveryd"

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "6h",
    "$namespace": ".*",  # the dashboard's job filter, at "All"
}
"""The only variables an expression may use, and what they become for promtool
(and for an end-to-end run against a real Prometheus)."""

RATE_FUNCTIONS = frozenset({"rate", "irate", "increase"})

UNITS = frozenset(
    {
        "none", "short", "locale", "string", "percent", "percentunit",
        "ns", "µs", "ms", "s", "m", "h", "d", "dtdurations", "dthms",
        "bytes", "decbytes", "bits", "decbits", "Bps", "binBps", "bps",
        "ops", "reqps", "cps", "hertz",
        "dateTimeFromNow", "dateTimeAsIso", "dateTimeAsSystem",
    }
)  # fmt: skip
"""Grafana unit ids (a subset; add to it when a panel needs another): catches
``"seconds"`` and other ids Grafana would silently show as plain numbers."""

_SUFFIXES: dict[str, tuple[str, ...]] = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum"),
    "summary": ("", "_count", "_sum"),
    "info": ("_info",),
    "stateset": ("",),
    "unknown": ("",),
}
"""Series names per metric type, as the text exposition writes them
(``_created`` left out: a dashboard has no use for it)."""

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_WINDOW = re.compile(r"\[([^\]]*)\]")
_METRIC = re.compile(r"(?<![A-Za-z0-9_:])recoveryd_[A-Za-z0-9_:]*")
_VARIABLE = re.compile(r"\$\{?([A-Za-z_]\w*)\}?")  # not $1 (label_replace)
_FUNCTION_BEFORE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*$")


@dataclass(frozen=True, slots=True)
class Query:
    """One PromQL expression of a dashboard and where it is."""

    where: str
    expr: str
    instant: bool


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, rows included, and the panels nested in (collapsed) rows."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def _where(panel: dict[str, Any]) -> str:
    return f"panel {panel.get('id')} {panel.get('title', '')!r}"


def queries(dashboard: dict[str, Any]) -> list[Query]:
    """Every panel target's expression."""
    out = []
    for panel in iter_panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            out.append(
                Query(
                    where=f"{_where(panel)} target {target.get('refId')}",
                    expr=str(target.get("expr", "")),
                    instant=bool(target.get("instant")) and not target.get("range", False),
                )
            )
    return out


def structure_problems(dashboard: dict[str, Any]) -> list[str]:
    """uid, id, the datasource variable, datasources, units and descriptions."""
    problems = []
    uid = dashboard.get("uid")
    if not isinstance(uid, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", uid):
        problems.append(f"uid must be a fixed, non-empty id of at most 40 characters, got {uid!r}")
    if "id" not in dashboard or dashboard["id"] is not None:
        problems.append(f"id must be null (Grafana assigns it), got {dashboard.get('id')!r}")
    if not dashboard.get("title"):
        problems.append("the dashboard has no title")
    variables = dashboard.get("templating", {}).get("list", [])
    ds = [v for v in variables if v.get("name") == "datasource"]
    if len(ds) != 1 or ds[0].get("type") != "datasource" or ds[0].get("query") != "prometheus":
        problems.append("needs one variable 'datasource' of type datasource, query prometheus")
    ns = [v for v in variables if v.get("name") == "namespace"]
    if len(ns) != 1 or ns[0].get("type") != "query" or ns[0].get("allValue") != ".*":
        problems.append("needs one variable 'namespace' of type query with allValue '.*'")
    elif ns[0].get("datasource", {}).get("uid") != "${datasource}":
        problems.append("variable 'namespace' must query the ${datasource} variable")
    for v in variables:
        if v.get("name") not in ("datasource", "namespace"):
            problems.append(
                f"variable {v.get('name')!r}: only 'datasource' and 'namespace' are expected "
                "(the end-to-end test substitutes those; add it to GRAFANA_VARIABLES first)"
            )
    ids: set[int] = set()
    for panel in iter_panels(dashboard.get("panels", [])):
        where = _where(panel)
        if panel.get("id") in ids:
            problems.append(f"{where}: duplicate panel id")
        ids.add(panel.get("id", -1))
        if panel.get("datasource") != DATASOURCE:
            problems.append(
                f"{where}: datasource must be {DATASOURCE}, got {panel.get('datasource')}"
            )
        if panel.get("type") == "row":
            if not panel.get("collapsed") and panel.get("panels"):
                problems.append(f"{where}: an open row keeps its panels at the top level")
            continue
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
        if unit not in UNITS:
            problems.append(
                f"{where}: fieldConfig.defaults.unit must be a Grafana unit, got {unit!r}"
            )
        if not panel.get("description"):
            problems.append(f"{where}: no description")
        targets = panel.get("targets", [])
        if not targets:
            problems.append(f"{where}: no targets")
        ref_ids = [t.get("refId") for t in targets]
        if len(set(ref_ids)) != len(ref_ids):
            problems.append(f"{where}: duplicate refIds {ref_ids}")
        for target in targets:
            if target.get("datasource") != DATASOURCE:
                problems.append(
                    f"{where} target {target.get('refId')}: datasource must be {DATASOURCE}, "
                    f"got {target.get('datasource')}"
                )
            if not str(target.get("expr", "")).strip():
                problems.append(f"{where} target {target.get('refId')}: empty expr")
    return problems


def _overlaps(panels: list[dict[str, Any]]) -> list[str]:
    problems = []
    boxes = []
    for panel in panels:
        gp = panel.get("gridPos")
        where = _where(panel)
        if not isinstance(gp, dict) or not all(isinstance(gp.get(k), int) for k in "hwxy"):
            problems.append(f"{where}: gridPos needs integer h, w, x, y, got {gp!r}")
            continue
        if gp["w"] < 1 or gp["h"] < 1 or gp["x"] < 0 or gp["y"] < 0 or gp["x"] + gp["w"] > 24:
            problems.append(f"{where}: gridPos {gp} is off the 24-column grid")
        boxes.append((where, gp["x"], gp["y"], gp["x"] + gp["w"], gp["y"] + gp["h"]))
    for i, (a, ax0, ay0, ax1, ay1) in enumerate(boxes):
        for b, bx0, by0, bx1, by1 in boxes[i + 1 :]:
            if ax0 < bx1 and bx0 < ax1 and ay0 < by1 and by0 < ay1:
                problems.append(f"{a} and {b} overlap")
    return problems


def layout_problems(dashboard: dict[str, Any]) -> list[str]:
    """A gridPos on every panel; no two overlap (top level, and within each row's panels)."""
    top = dashboard.get("panels", [])
    problems = _overlaps(top)
    for panel in top:
        if panel.get("panels"):
            problems += _overlaps(panel["panels"])
    return problems


def _enclosing_function(code: str, pos: int) -> str:
    """The name of the call whose parentheses hold position ``pos`` ('' if none)."""
    depth = 0
    for i in range(pos - 1, -1, -1):
        if code[i] == ")":
            depth += 1
        elif code[i] == "(":
            if depth == 0:
                m = _FUNCTION_BEFORE.search(code[:i])
                return m.group(1) if m else ""
            depth -= 1
    return ""


def window_problems(query: Query) -> list[str]:
    """Range windows: Grafana's variables only, never a hard-coded duration.

    ``$__rate_interval`` anywhere; ``$__range`` only in instant queries (a total
    over the dashboard's range); ``$__interval`` only in ``*_over_time`` (it can
    be shorter than two scrapes, which leaves ``rate()`` empty).
    """
    problems = []
    code = _STRING.sub('""', query.expr)
    for m in _WINDOW.finditer(code):
        function = _enclosing_function(code, m.start())
        for part in m.group(1).split(":"):
            window = re.sub(r"^\$\{(\w+)\}$", r"$\1", part.strip())
            if not window and ":" in m.group(1):
                continue  # a subquery's default resolution
            if window not in GRAFANA_VARIABLES:
                problems.append(
                    f"{query.where}: window [{m.group(1)}] in {function or 'a selector'}(): use "
                    "$__rate_interval (or $__range in an instant query), never a fixed duration"
                )
            elif window == "$__range" and not query.instant:
                problems.append(
                    f"{query.where}: $__range in a range query; make the target instant"
                )
            elif window == "$__interval" and function in RATE_FUNCTIONS:
                problems.append(f"{query.where}: $__interval in {function}(); use $__rate_interval")
    return problems


def substitute(expr: str) -> str:
    """The expression with Grafana's variables replaced as ``GRAFANA_VARIABLES`` says."""
    for name, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace("${" + name[1:] + "}", value).replace(name, value)
    return expr


def namespace_problems(query: Query) -> list[str]:
    """Every recoveryd selector filters by the dashboard's namespace (one job at a time)."""
    out = []
    for m in re.finditer(r"\b(recoveryd_[a-z0-9_]+)(\{[^}]*\})?", query.expr):
        if 'namespace=~"$namespace"' not in (m.group(2) or ""):
            out.append(f'{query.where}: {m.group(1)} without namespace=~"$namespace"')
    return out


def variable_problems(query: Query) -> list[str]:
    """Variables other than Grafana's built-ins that ``substitute`` knows.

    Strings are searched too: Grafana interpolates inside label values.
    """
    left = _VARIABLE.findall(substitute(query.expr))
    return [f"{query.where}: unknown variable ${name}" for name in left]


def exported_metric_names() -> set[str]:
    """Series names of every metric recoveryd defines, taken from real registries.

    From each family's name and type, not from samples: a labelled metric with
    no child yet exposes no sample but is still a name a dashboard may use.
    """
    names = set()
    for build in (CoordinatorMetrics, AgentMetrics):
        registry = CollectorRegistry()
        build(registry)
        for family in registry.collect():
            names |= {family.name + suffix for suffix in _SUFFIXES[family.type]}
    return names


def metric_problems(query: Query, known: set[str]) -> list[str]:
    """``recoveryd_*`` names the expression uses that recoveryd does not export."""
    used = set(_METRIC.findall(_STRING.sub('""', query.expr)))
    return [f"{query.where}: {name} is not exported by recoveryd" for name in sorted(used - known)]


def promtool_problems(promtool: str, qs: list[Query], tmp_path: Path) -> list[str]:
    """``promtool check rules`` on every expression, each as a recording rule of its own group."""
    groups = [
        {
            "name": f"{i}: {q.where}",
            "rules": [{"record": f"recoveryd_dashboard:expr_{i}", "expr": substitute(q.expr)}],
        }
        for i, q in enumerate(qs)
    ]
    rules = tmp_path / "dashboard_rules.yml"
    rules.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    done = subprocess.run(
        [promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60
    )
    if done.returncode == 0:
        return []
    return [line for line in (done.stdout + done.stderr).splitlines() if "group" in line] or [
        done.stdout + done.stderr
    ]


def _promtool() -> str:
    promtool = shutil.which("promtool") or (
        "/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None
    )
    if promtool is None:
        pytest.skip(
            "promtool not installed (Debian package prometheus; scripts/tools.sh installs it "
            "as root): the PromQL of the dashboards is not parsed"
        )
    return promtool


def _load(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict), f"{path}: not a JSON object"
    return data


@pytest.fixture(scope="module")
def known_metrics() -> set[str]:
    return exported_metric_names()


# ---- the dashboards in the repository


def test_there_is_a_dashboard() -> None:
    assert [p.name for p in DASHBOARD_FILES] == ["recoveryd.json"]


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.name)
def test_dashboard_structure(path: Path) -> None:
    dashboard = _load(path)
    assert structure_problems(dashboard) == []
    assert dashboard["uid"] == "recoveryd-recovery"
    assert dashboard["schemaVersion"] >= 39
    assert dashboard["refresh"] == "30s"
    assert dashboard["time"]["from"] == "now-6h"
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows == ["Recovery", "Transfers", "Cluster", "Coordinator"]


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.name)
def test_dashboard_layout(path: Path) -> None:
    assert layout_problems(_load(path)) == []


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.name)
def test_dashboard_windows_and_variables(path: Path) -> None:
    qs = queries(_load(path))
    assert qs
    assert [
        p for q in qs for p in window_problems(q) + variable_problems(q) + namespace_problems(q)
    ] == []


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.name)
def test_dashboard_uses_only_exported_metrics(path: Path, known_metrics: set[str]) -> None:
    qs = queries(_load(path))
    assert [p for q in qs for p in metric_problems(q, known_metrics)] == []
    used = {name for q in qs for name in _METRIC.findall(q.expr)}
    # The panels the dashboard promises, by the metric behind them.
    for name in (
        "recoveryd_recovery_seconds_bucket",
        "recoveryd_recovery_throughput_bytes_per_second_bucket",
        "recoveryd_agent_transfer_throughput_bytes_per_second_bucket",
        "recoveryd_recovery_bytes_total",
        "recoveryd_coordinator_plans_total",
        "recoveryd_agent_transfers_total",
        "recoveryd_coordinator_replicas",
        "recoveryd_coordinator_ranks",
        "recoveryd_coordinator_transfers_in_flight",
        "recoveryd_coordinator_last_recovery_timestamp_seconds",
        "recoveryd_coordinator_replica_step",
        "recoveryd_coordinator_heartbeats_total",
        "recoveryd_coordinator_heartbeat_misses_total",
        "recoveryd_coordinator_unknown_heartbeats_total",
        "recoveryd_coordinator_donor_decision_seconds_bucket",
        "recoveryd_build_info",
    ):
        assert name in used, f"no panel shows {name}"


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.name)
def test_dashboard_promql_parses(path: Path, tmp_path: Path) -> None:
    promtool = _promtool()
    qs = queries(_load(path))
    assert promtool_problems(promtool, qs, tmp_path) == []


def test_metric_names_match_the_real_exposition(known_metrics: set[str]) -> None:
    """The type-suffix rule gives exactly the names a real scrape shows (``_created`` aside)."""
    coordinator, agent = CollectorRegistry(), CollectorRegistry()
    cm, am = CoordinatorMetrics(coordinator), AgentMetrics(agent)
    cm.decision("plan", 0.001)
    cm.plan_finished(
        "done", phases={"plan": 0.1}, end_to_end_s=1.0, nbytes=10, rank_bytes_per_s=1e9
    )
    cm.ranks.labels(state="healthy").set(2)
    cm.step.labels(which="slowest").set(1)
    am.transfer("joiner", "gloo", "ok", seconds=1.0, nbytes=10, phases={"data": 0.5})
    am.recoveries.labels(result="recovered").inc()
    am.recovery_seconds.observe(1.0)
    scraped = {
        sample.name
        for registry in (coordinator, agent)
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
        if not sample.name.endswith("_created")
    }
    assert scraped == known_metrics


def test_provisioned_datasource_is_the_dashboards_default() -> None:
    config = yaml.safe_load(DATASOURCES_YML.read_text())
    assert config["apiVersion"] == 1
    (ds,) = config["datasources"]
    assert ds["type"] == "prometheus"
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", ds["uid"])
    assert ds["url"] == "http://prometheus:9090"
    assert "`url` is the one line to change" in DATASOURCES_YML.read_text()
    for path in DASHBOARD_FILES:
        (variable,) = (v for v in _load(path)["templating"]["list"] if v["name"] == "datasource")
        assert variable["current"].get("value") in (None, ds["uid"]), path.name


def test_provisioned_dashboards_point_at_their_folder() -> None:
    config = yaml.safe_load(DASHBOARDS_YML.read_text())
    assert config["apiVersion"] == 1
    (provider,) = config["providers"]
    assert provider["type"] == "file"
    assert provider["folder"] == "recoveryd"
    assert provider["allowUiUpdates"] is False
    assert provider["options"]["path"] == DASHBOARDS_PATH
    assert DASHBOARDS_PATH in (GRAFANA / "README.md").read_text()


# ---- the checks themselves fail on bad input


def _good() -> dict[str, Any]:
    """A minimal dashboard every check accepts."""
    target = {
        "refId": "A",
        "datasource": dict(DATASOURCE),
        "expr": "sum(rate(recoveryd_coordinator_heartbeats_total[$__rate_interval]))",
        "range": True,
        "instant": False,
    }
    panel = {
        "type": "timeseries",
        "id": 2,
        "title": "Heartbeats",
        "description": "Heartbeats per second.",
        "datasource": dict(DATASOURCE),
        "gridPos": {"h": 8, "w": 12, "x": 0, "y": 1},
        "fieldConfig": {"defaults": {"unit": "ops"}, "overrides": []},
        "targets": [target],
    }
    row = {
        "type": "row",
        "id": 1,
        "title": "Coordinator",
        "collapsed": False,
        "datasource": dict(DATASOURCE),
        "gridPos": {"h": 1, "w": 24, "x": 0, "y": 0},
        "panels": [],
    }
    return {
        "uid": "test-dashboard",
        "id": None,
        "title": "test",
        "templating": {
            "list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus"},
                {
                    "name": "namespace",
                    "type": "query",
                    "allValue": ".*",
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                },
            ]
        },
        "panels": [row, panel],
    }


def _query(expr: str, *, instant: bool = False) -> Query:
    return Query(where="test", expr=expr, instant=instant)


def test_the_good_example_passes(known_metrics: set[str]) -> None:
    good = _good()
    assert structure_problems(good) == []
    assert layout_problems(good) == []
    (q,) = queries(good)
    assert window_problems(q) == variable_problems(q) == metric_problems(q, known_metrics) == []


@pytest.mark.parametrize(
    ("expr", "instant", "complaint"),
    [
        ("sum(rate(recoveryd_coordinator_heartbeats_total[5m]))", False, "window [5m]"),
        ("increase(recoveryd_recovery_bytes_total[1h])", True, "window [1h]"),
        ('max_over_time(recoveryd_coordinator_replicas{state="healthy"}[30s])', False, "[30s]"),
        ("max_over_time(recoveryd_coordinator_replicas[$__range:1m])", True, "[$__range:1m]"),
        ("sum(increase(recoveryd_recovery_bytes_total[$__range]))", False, "range query"),
        ("rate(recoveryd_recovery_bytes_total[$__interval])", False, "$__interval in rate()"),
    ],
)
def test_window_check_rejects(expr: str, instant: bool, complaint: str) -> None:
    problems = window_problems(_query(expr, instant=instant))
    assert len(problems) == 1
    assert complaint in problems[0]


@pytest.mark.parametrize(
    ("expr", "instant"),
    [
        ("sum(increase(recoveryd_recovery_bytes_total[$__range]))", True),
        ("max_over_time(recoveryd_coordinator_replicas[$__interval])", False),
        ("max_over_time(recoveryd_coordinator_replicas[${__rate_interval}])", False),
        ('sum(recoveryd_coordinator_replicas{state=~"[a-z]+"})', False),  # a regex, no window
    ],
)
def test_window_check_accepts(expr: str, instant: bool) -> None:
    assert window_problems(_query(expr, instant=instant)) == []


def test_unknown_variable_is_reported() -> None:
    expr = 'sum(rate(recoveryd_coordinator_heartbeats_total{ns=~"$cluster"}[${__rate_interval}]))'
    assert variable_problems(_query(expr)) == ["test: unknown variable $cluster"]
    assert variable_problems(_query(expr.replace("$cluster", ".*"))) == []
    assert substitute(expr.replace("$cluster", "$namespace")) == (
        'sum(rate(recoveryd_coordinator_heartbeats_total{ns=~".*"}[1m]))'
    )


def test_a_selector_without_the_namespace_filter_is_reported() -> None:
    expr = (
        'sum(rate(recoveryd_coordinator_heartbeats_total{namespace=~"$namespace"}[1m]))'
        " / sum(recoveryd_coordinator_ranks)"
    )
    assert namespace_problems(_query(expr)) == [
        'test: recoveryd_coordinator_ranks without namespace=~"$namespace"'
    ]


def test_missing_unit_is_reported() -> None:
    bad = _good()
    del bad["panels"][1]["fieldConfig"]["defaults"]["unit"]
    assert structure_problems(bad) == [
        "panel 2 'Heartbeats': fieldConfig.defaults.unit must be a Grafana unit, got None"
    ]
    bad["panels"][1]["fieldConfig"]["defaults"]["unit"] = "seconds"
    assert "got 'seconds'" in structure_problems(bad)[0]


def test_datasource_not_using_the_variable_is_reported() -> None:
    bad = _good()
    bad["panels"][1]["datasource"] = {"type": "prometheus", "uid": "P1809F7CD0C75ACF3"}
    bad["panels"][1]["targets"][0]["datasource"] = {"type": "prometheus", "uid": "prometheus"}
    problems = structure_problems(bad)
    assert len(problems) == 2
    assert problems[0].startswith("panel 2 'Heartbeats': datasource must be")
    assert problems[1].startswith("panel 2 'Heartbeats' target A: datasource must be")


def test_dashboard_basics_are_reported() -> None:
    bad = _good()
    bad["uid"], bad["id"] = "", 7
    bad["templating"]["list"] = [{"name": "ds", "type": "datasource", "query": "prometheus"}]
    problems = structure_problems(bad)
    assert [p.split(" ")[0] for p in problems] == ["uid", "id", "needs", "needs", "variable"]
    assert "'namespace'" in problems[3]


def test_nested_row_panels_are_checked() -> None:
    bad = _good()
    row, panel = bad["panels"]
    row["collapsed"] = True
    row["panels"] = [copy.deepcopy(panel)]
    row["panels"][0]["id"] = 3
    row["panels"][0]["datasource"] = None
    bad["panels"] = [row]
    assert structure_problems(bad) == [
        "panel 3 'Heartbeats': datasource must be "
        "{'type': 'prometheus', 'uid': '${datasource}'}, got None"
    ]
    assert [q.where for q in queries(bad)] == ["panel 3 'Heartbeats' target A"]


def test_overlap_and_missing_grid_position_are_reported() -> None:
    bad = _good()
    second = copy.deepcopy(bad["panels"][1])
    second["id"] = 3
    second["gridPos"] = {"h": 8, "w": 12, "x": 11, "y": 8}  # one cell into panel 2
    bad["panels"].append(second)
    assert layout_problems(bad) == ["panel 2 'Heartbeats' and panel 3 'Heartbeats' overlap"]
    second["gridPos"] = {"h": 8, "w": 12, "x": 12, "y": 1}  # side by side
    assert layout_problems(bad) == []
    del second["gridPos"]
    assert layout_problems(bad) == [
        "panel 3 'Heartbeats': gridPos needs integer h, w, x, y, got None"
    ]


def test_unknown_metric_is_reported(known_metrics: set[str]) -> None:
    q = _query('sum(rate(recoveryd_recovery_seconds{phase="end_to_end"}[$__rate_interval]))')
    assert metric_problems(q, known_metrics) == [
        "test: recoveryd_recovery_seconds is not exported by recoveryd"
    ]


def test_promtool_rejects_bad_expressions(tmp_path: Path) -> None:
    promtool = _promtool()
    good = _query("sum(rate(recoveryd_coordinator_heartbeats_total[$__rate_interval]))")
    unclosed = Query(
        "panel 9 'unclosed'", "sum(rate(recoveryd_recovery_bytes_total[$__range])", True
    )
    no_range = Query("panel 10 'no range'", "rate(recoveryd_recovery_bytes_total)", False)
    assert promtool_problems(promtool, [good], tmp_path) == []
    problems = promtool_problems(promtool, [good, unclosed, no_range], tmp_path)
    assert len(problems) == 2, problems
    assert "panel 9 'unclosed'" in problems[0]
    assert "unclosed left parenthesis" in problems[0]
    assert "panel 10 'no range'" in problems[1]
    assert "range vector" in problems[1]
