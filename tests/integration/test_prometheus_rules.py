"""deploy/prometheus: the real promtool checks the config, the alert rules and their unit tests.

Also ties the rules to recoveryd/metrics.py: every ``recoveryd_*`` name and
every label value they match on must be something the code exports.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.utils import floatToGoString

from recoveryd.metrics import (
    BUCKETS_S,
    PLAN_RESULTS,
    AgentMetrics,
    CoordinatorMetrics,
)
from recoveryd.protocol import REPLICA_STATES

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"
CONFIG = PROM / "prometheus.yml"
RULES = PROM / "rules" / "recoveryd.yml"
RULE_TESTS = PROM / "tests" / "recoveryd_test.yml"


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (scripts/tools.sh installs it as root)")
    return promtool


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_promtool(), *map(str, args)], capture_output=True, text=True, timeout=60
    )


def _load(path: Path) -> Any:
    with path.open() as f:
        return yaml.safe_load(f)


def _dump(data: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _alerts() -> list[dict[str, Any]]:
    return [r for g in _load(RULES)["groups"] for r in g["rules"] if "alert" in r]


# -- promtool check / test ----------------------------------------------------


def test_rules_pass_promtool_check_rules() -> None:
    done = _run("check", "rules", RULES)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in done.stdout


def test_rule_unit_tests_pass() -> None:
    done = _run("test", "rules", RULE_TESTS)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def _copy_tree(tmp_path: Path) -> Path:
    """deploy/prometheus copied to tmp_path, so relative paths still resolve."""
    dst = tmp_path / "prometheus"
    shutil.copytree(PROM, dst)
    return dst


def _first_check(
    tests: list[dict[str, Any]], *, firing: bool, alertname: str | None = None
) -> dict[str, Any]:
    """The first alert_rule_test (of ``alertname``, if given) that expects a firing alert, or none."""
    for case in tests:
        for check in case.get("alert_rule_test", []):
            if alertname in (None, check["alertname"]) and bool(check.get("exp_alerts")) == firing:
                return check  # type: ignore[no-any-return]
    raise AssertionError(f"no {'firing' if firing else 'quiet'} check for {alertname}")


@pytest.mark.parametrize(
    "wrong",
    ["severity", "annotation", "expects_quiet_when_firing", "expects_firing_when_quiet"],
)
def test_rule_unit_tests_catch_a_wrong_expectation(tmp_path: Path, wrong: str) -> None:
    """Proof that the unit tests can fail: promtool rejects a wrong expectation."""
    tree = _copy_tree(tmp_path)
    path = tree / "tests" / "recoveryd_test.yml"
    data = _load(path)
    tests: list[dict[str, Any]] = data["tests"]
    firing = _first_check(tests, firing=True)
    if wrong == "severity":
        firing["exp_alerts"][0]["exp_labels"]["severity"] = "page"
    elif wrong == "annotation":
        firing["exp_alerts"][0]["exp_annotations"]["summary"] += " (not what the rule says)"
    elif wrong == "expects_quiet_when_firing":
        firing["exp_alerts"] = []
    else:
        quiet = _first_check(tests, firing=False, alertname=firing["alertname"])
        quiet["exp_alerts"] = copy.deepcopy(firing["exp_alerts"])
    _dump(data, path)

    done = _run("test", "rules", path)
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    # Failed on the expectation (promtool prints the alerts it expected and
    # got), not on a file it could not read.
    assert "FAILED:" in out, out
    assert "alertname: RecoverydRecoverySlow" in out, out


def test_promtool_check_rules_catches_a_broken_expression(tmp_path: Path) -> None:
    data = _load(RULES)
    data["groups"][0]["rules"][0]["expr"] = "increase(recoveryd_recovery_seconds_count[15m] > 0"
    done = _run("check", "rules", _dump(data, tmp_path / "broken.yml"))
    assert done.returncode != 0, done.stdout + done.stderr


# -- the scrape config --------------------------------------------------------

_K8S_SD_MISSING = "field kubernetes_sd_configs not found"


def test_config_passes_promtool_check_config() -> None:
    done = _run("check", "config", CONFIG)
    if done.returncode != 0 and _K8S_SD_MISSING in done.stdout + done.stderr:
        version = _run("--version").stdout.splitlines()[0]
        pytest.skip(
            f"this promtool ({version}) is built without Kubernetes service discovery "
            "(Debian's package leaves it out); the tests below check the same config "
            "with the discovery swapped for static targets"
        )
    assert done.returncode == 0, done.stdout + done.stderr


def _pod(
    name: str,
    *,
    component: str,
    port_name: str,
    port: int,
    ip: str,
    part_of: str = "recoveryd",
    phase: str = "Running",
    namespace: str = "recoveryd",
) -> dict[str, Any]:
    """One target as Kubernetes pod discovery makes it: a pod's container port."""
    return {
        "targets": [f"{ip}:{port}"],
        "labels": {
            "__meta_kubernetes_namespace": namespace,
            "__meta_kubernetes_pod_name": name,
            "__meta_kubernetes_pod_ip": ip,
            "__meta_kubernetes_pod_phase": phase,
            "__meta_kubernetes_pod_label_app_kubernetes_io_part_of": part_of,
            "__meta_kubernetes_pod_labelpresent_app_kubernetes_io_part_of": "true",
            "__meta_kubernetes_pod_label_app_kubernetes_io_component": component,
            "__meta_kubernetes_pod_labelpresent_app_kubernetes_io_component": "true",
            "__meta_kubernetes_pod_container_name": component,
            "__meta_kubernetes_pod_container_port_name": port_name,
            "__meta_kubernetes_pod_container_port_number": str(port),
            "__meta_kubernetes_pod_container_port_protocol": "TCP",
        },
    }


# What discovery finds in a namespace running the job of deploy/k8s, plus
# targets that must not be scraped.
_DISCOVERED = [
    _pod("coord-0", component="coordinator", port_name="grpc", port=29400, ip="10.8.0.12"),
    _pod("coord-0", component="coordinator", port_name="metrics", port=9400, ip="10.8.0.12"),
    _pod(
        "coord-old",
        component="coordinator",
        port_name="metrics",
        port=9400,
        ip="10.8.0.9",
        phase="Succeeded",
    ),
    _pod("trainer-0", component="trainer", port_name="rendezvous", port=29401, ip="10.8.0.20"),
    _pod("trainer-0", component="trainer", port_name="metrics", port=9401, ip="10.8.0.20"),
    _pod(
        "trainer-1",
        component="trainer",
        port_name="metrics",
        port=9401,
        ip="10.8.0.21",
        phase="Pending",
    ),
    _pod(
        "web-0",
        component="frontend",
        port_name="metrics",
        port=8080,
        ip="10.8.0.30",
        part_of="shop",
        namespace="shop",
    ),
]


def _static_copy(tmp_path: Path) -> Path:
    """The config with each job's Kubernetes discovery replaced by _DISCOVERED (same relabeling)."""
    tree = _copy_tree(tmp_path)
    data = _load(CONFIG)
    for job in data["scrape_configs"]:
        assert job.pop("kubernetes_sd_configs") == [{"role": "pod"}], job["job_name"]
        job["static_configs"] = _DISCOVERED
    return _dump(data, tree / "prometheus.yml")


def test_config_with_static_targets_passes_promtool_check_config(tmp_path: Path) -> None:
    done = _run("check", "config", _static_copy(tmp_path))
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    # The relative rule_files glob found the rules, and they were checked too.
    assert f"SUCCESS: {len(_alerts())} rules found" in out, out


def test_config_sets_the_documented_globals() -> None:
    data = _load(CONFIG)
    assert data["global"]["scrape_interval"] == "15s"
    assert data["rule_files"] == ["rules/*.yml"]
    # The rules find the coordinator by {job="recoveryd", component="coordinator"}.
    assert [j["job_name"] for j in data["scrape_configs"]] == ["recoveryd"]
    up = [a["expr"] for a in _alerts() if a["alert"].startswith("RecoverydCoordinator")]
    assert up
    assert all('up{job="recoveryd", component="coordinator"}' in e for e in up), up


def _scraped(config: Path, job: str) -> list[dict[str, str]]:
    """Target labels after relabeling, from promtool's real service discovery."""
    # promtool collects targets for the whole timeout; static ones come at once.
    done = _run("check", "service-discovery", "--timeout=2s", config, job)
    assert done.returncode == 0, done.stdout + done.stderr
    found = json.loads(done.stdout)
    assert len(found) == len(_DISCOVERED), found
    kept = [t["labels"] for t in found if t["labels"]]
    # In instance order: promtool lists them in no fixed order.
    return sorted(
        ({k: v for k, v in t.items() if not k.startswith("__")} for t in kept),
        key=lambda t: t["instance"],
    )


def test_relabeling_keeps_the_running_metrics_ports_and_labels_them(tmp_path: Path) -> None:
    assert _scraped(_static_copy(tmp_path), "recoveryd") == [
        {
            "instance": "10.8.0.12:9400",
            "job": "recoveryd",
            "namespace": "recoveryd",
            "pod": "coord-0",
            "component": "coordinator",
        },
        {
            "instance": "10.8.0.20:9401",
            "job": "recoveryd",
            "namespace": "recoveryd",
            "pod": "trainer-0",
            "component": "trainer",
        },
    ]


def test_relabeling_check_catches_a_missing_port_filter(tmp_path: Path) -> None:
    """Proof that the relabeling check can fail: without the port filter, gRPC is scraped too."""
    config = _static_copy(tmp_path)
    data = _load(config)
    job = data["scrape_configs"][0]
    job["relabel_configs"] = [
        r
        for r in job["relabel_configs"]
        if r.get("source_labels") != ["__meta_kubernetes_pod_container_port_name"]
    ]
    instances = [t["instance"] for t in _scraped(_dump(data, config), job["job_name"])]
    assert instances == ["10.8.0.12:29400", "10.8.0.12:9400", "10.8.0.20:29401", "10.8.0.20:9401"]


# -- the rules against recoveryd/metrics.py -----------------------------------


def _exported_names() -> set[str]:
    """Every series name the coordinator and an agent can export, from real registries."""
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_count", "_sum"),
        "info": ("_info",),
        "gauge": ("",),
    }
    names: set[str] = set()
    for build in (CoordinatorMetrics, AgentMetrics):
        registry = CollectorRegistry()
        build(registry)
        for family in registry.collect():
            names.update(family.name + s for s in suffixes[family.type])
            names.update(s.name for s in family.samples)
    return names


_SELECTOR = re.compile(r"\b(recoveryd_[a-z0-9_]+)\s*(?:\{([^}]*)\})?")
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')


def _selectors(expr: str) -> list[tuple[str, dict[str, str]]]:
    """(name, {label: value}) of every recoveryd_* selector in ``expr`` (equality matchers)."""
    out = []
    for m in _SELECTOR.finditer(expr):
        labels = {k: v for k, op, v in _MATCHER.findall(m.group(2) or "") if op == "="}
        out.append((m.group(1), labels))
    return out


_LABEL_VALUES = {
    "state": set(REPLICA_STATES),
    "result": set(PLAN_RESULTS),
    # As the client writes them ("60.0"); Prometheus 3 normalises to the same.
    "le": {floatToGoString(b) for b in BUCKETS_S} | {"+Inf"},  # type: ignore[no-untyped-call]
}
"""Label values the rules may match on, as the code writes them."""


def test_every_metric_and_label_value_the_rules_use_is_exported() -> None:
    exported = _exported_names()
    used = [(a["alert"], s) for a in _alerts() for s in _selectors(a["expr"])]
    assert len({name for _, (name, _) in used}) >= 4
    for alert, (name, labels) in used:
        assert name in exported, f"{alert}: {name} is not exported by recoveryd/metrics.py"
        for label, value in labels.items():
            allowed = _LABEL_VALUES.get(label)
            assert allowed is None or value in allowed, f"{alert}: {label}={value!r}"


def test_the_rule_tests_use_real_bucket_bounds() -> None:
    for case in _load(RULE_TESTS)["tests"]:
        for series in case.get("input_series", []):
            for name, labels in _selectors(series["series"]):
                assert name in _exported_names(), name
                if "le" in labels and name.startswith("recoveryd_recovery_seconds"):
                    assert labels["le"] in _LABEL_VALUES["le"], series["series"]


def test_every_alert_is_complete_and_tested_both_ways() -> None:
    tested: dict[str, set[bool]] = {}
    for case in _load(RULE_TESTS)["tests"]:
        for check in case.get("alert_rule_test", []):
            tested.setdefault(check["alertname"], set()).add(bool(check.get("exp_alerts")))
    for alert in _alerts():
        name = alert["alert"]
        assert "for" in alert, name
        assert alert["labels"]["severity"] in {"warning", "critical"}, name
        assert set(alert["annotations"]) == {"summary", "description", "runbook"}, name
        assert tested.get(name) == {True, False}, f"{name}: tested firing/quiet: {tested.get(name)}"
