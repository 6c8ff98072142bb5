"""The Kubernetes manifests (deploy/k8s): every overlay renders with kustomize,
passes the Kubernetes API schemas strictly, and its objects fit together.

Real tools only: ``kubectl kustomize`` renders, ``kubernetes-validate --strict``
checks the core kinds against the API's OpenAPI schemas, and the PodMonitor
(a prometheus-operator CRD, unknown to kubernetes-validate) is checked against
models generated from its CRD schema (cloudcoil-models-prometheus-operator),
with unknown fields rejected. Each checker is also shown to fail on a typo.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "recoveryd.json"
PROMETHEUS_YML = REPO / "deploy" / "prometheus" / "prometheus.yml"
OVERLAYS = sorted(
    p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists()
)
KUBECTL = shutil.which("kubectl")
# The CLI installed with the dev extras, beside the interpreter running the tests.
KUBERNETES_VALIDATE = Path(sys.executable).parent / "kubernetes-validate"
# The oldest Kubernetes the README promises (native gRPC probes are GA in 1.27)
# and the newest whose schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.27", "1.37")
# Native sidecars (an init container with restartPolicy: Always) need 1.29.
VERSIONS = {"sidecar": ("1.29", "1.37")}
NAMESPACE = "recoveryd"
IMAGE = "ghcr.io/recoveryd/recoveryd"
# Per overlay: the image tag and the RECOVERYD_DEVICE it runs the trainer with.
EXPECTED = {
    "cpu": ("cpu", "cpu"),
    "gpu": ("cuda", "cuda"),
    "sidecar": ("cpu", "cpu"),
    "tls": ("cpu", "cpu"),
}
# kubectl apply (client side) stores the whole object in an annotation, and all
# of an object's annotations together may take at most 256 KiB.
MAX_APPLY_BYTES = 256 * 1024

Obj = dict[str, Any]

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(KUBECTL is None, reason="kubectl (with kustomize) is not on PATH"),
]


@functools.cache
def _rendered(overlay: str) -> str:
    assert KUBECTL is not None
    done = subprocess.run(
        [KUBECTL, "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"kubectl kustomize overlays/{overlay} failed:\n{done.stderr}"
    return done.stdout


@functools.cache
def _parsed(overlay: str) -> tuple[Obj, ...]:
    return tuple(d for d in yaml.safe_load_all(_rendered(overlay)) if d)


def _objects(overlay: str) -> list[Obj]:
    """A fresh copy of the overlay's rendered objects (tests may change theirs)."""
    return copy.deepcopy(list(_parsed(overlay)))


def _one(objects: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = [
        o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _pod_spec(workload: Obj) -> Obj:
    spec: Obj = workload["spec"]["template"]["spec"]
    return spec


def _pod_labels(workload: Obj) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


def _containers(workload: Obj) -> Iterator[Obj]:
    spec = _pod_spec(workload)
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def _port_names(workload: Obj) -> dict[str, int]:
    return {
        p["name"]: p["containerPort"]
        for c in _containers(workload)
        for p in c.get("ports", [])
        if "name" in p
    }


def _env(container: Obj) -> dict[str, Obj]:
    return {e["name"]: e for e in container.get("env", [])}


def _selects(match_labels: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(match_labels) and match_labels.items() <= labels.items()


def _workloads(objects: list[Obj]) -> list[Obj]:
    return [o for o in objects if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job")]


def _coordinator(objects: list[Obj]) -> Obj:
    return _one(objects, "Deployment", "recoveryd-coordinator")


def _trainer(objects: list[Obj]) -> Obj:
    return _one(objects, "StatefulSet", "trainer")


def _kubernetes_validate(
    path: Path, versions: tuple[str, ...] = K8S_VERSIONS
) -> subprocess.CompletedProcess[str]:
    assert KUBERNETES_VALIDATE.exists(), f"{KUBERNETES_VALIDATE}: install the dev extras"
    args = [str(KUBERNETES_VALIDATE), "--strict"]
    for version in versions:
        args += ["-k", f"{version}.0"]
    return subprocess.run(
        [*args, str(path)], capture_output=True, text=True, timeout=60, check=False
    )


def _write_objects(path: Path, objects: list[Obj]) -> Path:
    path.write_text(yaml.safe_dump_all(objects, sort_keys=False))
    return path


# -- real tools ---------------------------------------------------------------


def test_there_are_overlays() -> None:
    assert OVERLAYS, f"no overlay with a kustomization.yaml under {K8S / 'overlays'}"
    assert set(OVERLAYS) <= EXPECTED.keys(), f"add the new overlays to EXPECTED: {OVERLAYS}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_passes_the_kubernetes_schemas_strictly(overlay: str, tmp_path: Path) -> None:
    objects = _objects(overlay)
    path = tmp_path / f"{overlay}.yaml"
    path.write_text(_rendered(overlay))
    versions = VERSIONS.get(overlay, K8S_VERSIONS)
    done = _kubernetes_validate(path, versions)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    # kubernetes-validate only warns on a kind it has no schema for: make sure
    # that every object but the CRD kinds was really checked, at every version.
    crd_kinds = {"PodMonitor", "Certificate", "Issuer"}
    for o in objects:
        kind, name = o["kind"], o["metadata"]["name"]
        if kind in crd_kinds:
            continue
        for version in versions:
            line = f"passed for resource {kind.lower()}/{name} against version {version}"
            assert line in out, f"{kind}/{name} not validated against {version}:\n{out}"
    warned = set(re.findall(r"schema for kind (\S+)", out))
    assert warned <= crd_kinds, out


def test_kubernetes_validate_rejects_an_unknown_field(tmp_path: Path) -> None:
    objects = _objects(OVERLAYS[0])
    container = _pod_spec(_coordinator(objects))["containers"][0]
    container["securityContext"]["readOnlyRootFileSystem"] = True  # capital S: a typo
    done = _kubernetes_validate(_write_objects(tmp_path / "typo.yaml", objects))
    assert done.returncode != 0
    assert "'readOnlyRootFileSystem' was unexpected" in done.stdout


@functools.cache
def _cert_manager_models() -> dict[str, type[pydantic.BaseModel]]:
    from cloudcoil.models.cert_manager.v1 import Certificate, Issuer

    return {"Certificate": Certificate, "Issuer": Issuer}


def _check_cert_manager(obj: Obj) -> None:
    _cert_manager_models()[obj["kind"]].model_validate(obj, strict=True, extra="forbid")


@pytest.mark.parametrize("overlay", [o for o in OVERLAYS if o == "tls"])
def test_cert_manager_objects_match_the_crd_schema_and_serve_the_coordinator(
    overlay: str,
) -> None:
    objects = _objects(overlay)
    certs = {
        (o["kind"], o["metadata"]["name"]): o
        for o in objects
        if o["kind"] in ("Certificate", "Issuer")
    }
    for o in certs.values():
        _check_cert_manager(o)
    served = certs["Certificate", "recoveryd-coordinator"]["spec"]
    # The name agents dial is in the certificate, so TLS checks pass without overrides.
    trainer = _trainer(objects)
    (container,) = _pod_spec(trainer)["containers"]
    dialled = _env(container)["RECOVERYD_COORDINATOR"]["value"].rpartition(":")[0]
    assert dialled in served["dnsNames"]
    assert served["issuerRef"]["name"] == "recoveryd-ca"
    assert certs["Certificate", "recoveryd-ca"]["spec"]["isCA"] is True
    assert certs["Issuer", "recoveryd-ca"]["spec"]["ca"]["secretName"] == "recoveryd-ca"
    coordinator = _coordinator(objects)
    (server,) = _pod_spec(coordinator)["containers"]
    args: list[str] = server["args"]
    mounts = {m["mountPath"]: m["name"] for m in server["volumeMounts"]}
    volumes = {v["name"]: v for v in _pod_spec(coordinator)["volumes"]}
    cert_dir = args[args.index("--tls-cert") + 1].rpartition("/")[0]
    assert volumes[mounts[cert_dir]]["secret"]["secretName"] == served["secretName"]
    ca = _env(container)["RECOVERYD_TLS_CA"]["value"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in _pod_spec(trainer)["volumes"]}
    assert volumes[mounts[ca.rpartition("/")[0]]]["secret"]["secretName"] == served["secretName"]
    bad = copy.deepcopy(certs["Certificate", "recoveryd-coordinator"])
    bad["spec"]["dnsName"] = ["typo"]
    with pytest.raises(pydantic.ValidationError, match="Extra inputs are not permitted"):
        _check_cert_manager(bad)


@functools.cache
def _podmonitor_model() -> type[pydantic.BaseModel]:
    # Imported here: the generated module takes a few seconds to import.
    from cloudcoil.models.prometheus_operator.v1 import PodMonitor

    return PodMonitor


def _check_podmonitor(obj: Obj) -> None:
    # extra="forbid" (pydantic >= 2.12) rejects a field the CRD schema does not
    # have, at any depth, as `kubectl apply`'s strict field validation does.
    _podmonitor_model().model_validate(obj, strict=True, extra="forbid")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_podmonitor_matches_the_crd_schema(overlay: str) -> None:
    _check_podmonitor(_one(_objects(overlay), "PodMonitor"))


@pytest.mark.parametrize(
    ("path", "change", "error"),
    [
        # A typo'd field, as `kubectl apply` would reject it with field validation.
        (("spec", "podMetricsEndpoints", 0), {"prot": "metrics"}, "Extra inputs are not permitted"),
        (("spec",), {"namespaceSelecter": {"any": True}}, "Extra inputs are not permitted"),
        # Values the CRD constrains.
        (("spec", "podMetricsEndpoints", 0), {"interval": "15 seconds"}, "should match pattern"),
        (("spec", "podMetricsEndpoints", 0), {"port": 9400}, "should be a valid string"),
    ],
    ids=["endpoint-typo", "spec-typo", "bad-interval", "port-not-a-name"],
)
def test_podmonitor_check_rejects_bad_fields(
    path: tuple[str | int, ...], change: Obj, error: str
) -> None:
    good = _one(_objects(OVERLAYS[0]), "PodMonitor")
    _check_podmonitor(good)
    bad = copy.deepcopy(good)
    target: Any = bad
    for key in path:
        target = target[key]
    target.update(change)
    with pytest.raises(pydantic.ValidationError, match=error) as info:
        _check_podmonitor(bad)
    assert next(iter(change)) in str(info.value)


# -- how the objects fit together ---------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_everything_is_in_the_namespace_and_tagged(overlay: str) -> None:
    objects = _objects(overlay)
    assert _one(objects, "Namespace")["metadata"]["name"] == NAMESPACE
    for o in objects:
        if o["kind"] != "Namespace":
            assert o["metadata"].get("namespace") == NAMESPACE, o["metadata"]
    tag, _ = EXPECTED[overlay]
    images = {c["image"] for w in _workloads(objects) for c in _containers(w)}
    assert images == {f"{IMAGE}:{tag}"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_is_locked_down_and_requests_resources(overlay: str) -> None:
    for workload in _workloads(_objects(overlay)):
        pod = _pod_spec(workload)
        pod_sc = pod.get("securityContext", {})
        assert pod.get("automountServiceAccountToken") is False
        # Service links would inject RECOVERYD_COORDINATOR_PORT=tcp://... etc.
        assert pod.get("enableServiceLinks") is False
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in _containers(workload):
            where = f"{overlay}: {workload['kind']}/{workload['metadata']['name']}/{c['name']}"
            sc = c.get("securityContext", {})
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, where
            assert sc.get("runAsUser", pod_sc.get("runAsUser")) not in (None, 0), where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("privileged", False) is False, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not sc.get("capabilities", {}).get("add"), where
            seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
            assert seccomp.get("type") == "RuntimeDefault", where
            requests = c.get("resources", {}).get("requests", {})
            assert {"cpu", "memory"} <= requests.keys(), where
            assert "memory" in c["resources"].get("limits", {}), where
            # A read-only root needs somewhere to write: /tmp on an emptyDir.
            mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
            assert "/tmp" in mounts, where
            tmp = mounts["/tmp"]
            assert "emptyDir" in volumes[tmp["name"]], where
            assert not tmp.get("readOnly"), where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_coordinator_deployment_and_service(overlay: str) -> None:
    objects = _objects(overlay)
    coordinator = _coordinator(objects)
    assert coordinator["spec"]["replicas"] == 1
    assert coordinator["spec"]["strategy"]["type"] == "Recreate"
    (container,) = _pod_spec(coordinator)["containers"]
    args: list[str] = container["args"]
    assert args[0] == "coordinator"
    ports = _port_names(coordinator)
    assert args[args.index("--bind") + 1] == f"0.0.0.0:{ports['grpc']}"
    assert int(args[args.index("--metrics-port") + 1]) == ports["metrics"]
    grace = float(args[args.index("--grace") + 1]) if "--grace" in args else 5.0
    assert _pod_spec(coordinator)["terminationGracePeriodSeconds"] > grace
    # Over TLS the kubelet's gRPC probes (plaintext) go to the health-only port.
    probed = int(args[args.index("--health-port") + 1]) if "--health-port" in args else None
    if probed is not None:
        assert probed == ports["health"]
        assert "--tls-cert" in args
    for probe in ("readinessProbe", "livenessProbe"):
        # Native gRPC probe (grpc.health.v1) on the gRPC port; no service: the
        # server's overall health.
        assert container[probe]["grpc"]["port"] == (probed or ports["grpc"]), probe
        assert container[probe]["grpc"].get("service", "") == "", probe

    service = _one(objects, "Service", "recoveryd-coordinator")
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert _selects(service["spec"]["selector"], _pod_labels(coordinator))
    for workload in _workloads(objects):
        if workload is not coordinator:
            assert not _selects(service["spec"]["selector"], _pod_labels(workload))
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert service_ports.keys() == {"grpc", "metrics"}
    for name, p in service_ports.items():
        assert p["port"] == ports[name]
        assert p["targetPort"] in (name, ports[name])


def _token_path(workload: Obj, container: Obj) -> str:
    """Where the container sees the Secret recoveryd-token's ``token`` key ("" if nowhere)."""
    secrets = {
        v["name"]: v["secret"]
        for v in _pod_spec(workload).get("volumes", [])
        if v.get("secret", {}).get("secretName") == "recoveryd-token"
    }
    for m in container.get("volumeMounts", []):
        if m["name"] in secrets:
            assert m.get("readOnly") is True, container["name"]
            assert not secrets[m["name"]].get("optional", False)
            assert secrets[m["name"]].get("defaultMode", 0o644) & 0o007 == 0  # not world-readable
            return f"{m['mountPath']}/token"
    return ""


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_party_of_the_control_plane_presents_the_job_token(overlay: str) -> None:
    objects = _objects(overlay)
    coordinator = _coordinator(objects)
    (container,) = _pod_spec(coordinator)["containers"]
    args: list[str] = container["args"]
    assert "--insecure" not in args
    assert args[args.index("--token-file") + 1] == _token_path(coordinator, container)
    trainer = _trainer(objects)
    talkers = [
        c
        for c in _containers(trainer)
        if c["args"][0] == "agent" or "RECOVERYD_SIDECAR_SOCKET" not in _env(c)
    ]
    assert talkers, "no container of the trainer pod talks to the coordinator"
    for c in talkers:
        assert _env(c)["RECOVERYD_TOKEN_FILE"]["value"] == _token_path(trainer, c), c["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_trainer_statefulset_is_configured_for_recovery(overlay: str) -> None:
    objects = _objects(overlay)
    trainer = _trainer(objects)
    spec = trainer["spec"]
    assert spec["replicas"] == 3
    assert spec["podManagementPolicy"] == "Parallel"
    assert spec["updateStrategy"]["type"] == "RollingUpdate"
    assert spec["minReadySeconds"] > 0  # time to recover before the next pod goes
    budget = _one(objects, "PodDisruptionBudget", "trainer")
    assert budget["spec"]["maxUnavailable"] == 1
    assert _selects(budget["spec"]["selector"]["matchLabels"], _pod_labels(trainer))
    assert _pod_spec(trainer)["terminationGracePeriodSeconds"] > 0
    headless = _one(objects, "Service", spec["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert _selects(headless["spec"]["selector"], _pod_labels(trainer))

    (container,) = _pod_spec(trainer)["containers"]
    assert container["args"][0] == "example-trainer"
    env = _env(container)
    ports = _port_names(trainer)
    coordinator_ports = {
        p["name"]: p["port"]
        for p in _one(objects, "Service", "recoveryd-coordinator")["spec"]["ports"]
    }
    assert (
        env["RECOVERYD_COORDINATOR"]["value"]
        == f"recoveryd-coordinator:{coordinator_ports['grpc']}"
    )
    field_refs = {
        name: e["valueFrom"]["fieldRef"]["fieldPath"]
        for name, e in env.items()
        if "fieldRef" in e.get("valueFrom", {})
    }
    assert field_refs["RECOVERYD_REPLICA_ID"] == "metadata.name"
    assert field_refs["RECOVERYD_HOST"] == "status.podIP"
    assert field_refs["NODE_NAME"] == "spec.nodeName"
    assert int(env["RECOVERYD_RENDEZVOUS_PORT"]["value"]) == ports["rendezvous"]
    assert int(env["RECOVERYD_METRICS_PORT"]["value"]) == ports["metrics"]
    assert env["RECOVERYD_LABELS"]["value"] == "node=$(NODE_NAME)"
    # $(VAR) expands only variables defined earlier in the list; a later or
    # missing one would be passed on literally.
    defined: set[str] = set()
    for e in container["env"]:
        for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", e.get("value", "")):
            assert ref in defined, f"{e['name']} uses $({ref}) before it is defined"
        defined.add(e["name"])

    volumes = {v["name"]: v for v in _pod_spec(trainer)["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_device_and_gpus_match_the_overlay(overlay: str) -> None:
    trainer = _trainer(_objects(overlay))
    (container,) = _pod_spec(trainer)["containers"]
    _, device = EXPECTED[overlay]
    assert _env(container)["RECOVERYD_DEVICE"]["value"] == device
    gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu")
    if device == "cuda":
        assert gpus == 1
        assert "NCCL_SOCKET_IFNAME" in _env(container)
        assert _pod_spec(trainer)["tolerations"]
    else:
        assert gpus is None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_admit_only_the_job_and_monitoring(overlay: str) -> None:
    objects = _objects(overlay)
    trainer, coordinator = _trainer(objects), _coordinator(objects)
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]

    def policy_for(workload: Obj) -> Obj:
        found = [
            p
            for p in policies
            if _selects(p["spec"]["podSelector"]["matchLabels"], _pod_labels(workload))
        ]
        assert len(found) == 1, f"{workload['metadata']['name']}: {len(found)} policies"
        assert "Ingress" in found[0]["spec"]["policyTypes"]
        return found[0]

    def rules_from(policy: Obj, workload: Obj) -> list[Obj]:
        rules: list[Obj] = []
        for rule in policy["spec"]["ingress"]:
            assert rule.get("from"), "a rule without `from` admits every source"
            for peer in rule["from"]:
                if "namespaceSelector" not in peer and _selects(
                    peer.get("podSelector", {}).get("matchLabels", {}), _pod_labels(workload)
                ):
                    rules.append(rule)
        return rules

    # Trainers: from trainers on every TCP port (Gloo/NCCL use ephemeral ones).
    (job_rule,) = rules_from(policy_for(trainer), trainer)
    assert job_rule["ports"] == [{"protocol": "TCP"}]
    # Coordinator: from trainers, on gRPC only; nothing from the coordinator's
    # own pods is needed.
    (agent_rule,) = rules_from(policy_for(coordinator), trainer)
    assert [p["port"] for p in agent_rule["ports"]] in (
        ["grpc"],
        [_port_names(coordinator)["grpc"]],
    )
    assert not rules_from(policy_for(coordinator), coordinator)
    # Both: Prometheus from the monitoring namespace, on the metrics port only.
    for workload in (trainer, coordinator):
        monitoring = [
            rule
            for rule in policy_for(workload)["spec"]["ingress"]
            if any("namespaceSelector" in peer for peer in rule["from"])
        ]
        assert len(monitoring) == 1
        assert [p["port"] for p in monitoring[0]["ports"]] == ["metrics"]
        assert "metrics" in _port_names(workload)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_podmonitor_selects_the_coordinator_and_the_trainers(overlay: str) -> None:
    objects = _objects(overlay)
    monitor = _one(objects, "PodMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    for workload in (_coordinator(objects), _trainer(objects)):
        assert _selects(selector, _pod_labels(workload)), workload["metadata"]["name"]
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert endpoint["port"] in _port_names(workload), workload["metadata"]["name"]
            assert endpoint["interval"] == "15s"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_dashboard_configmap_carries_the_dashboard(overlay: str) -> None:
    configmap = _one(_objects(overlay), "ConfigMap", "recoveryd-grafana-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    ((key, text),) = configmap["data"].items()
    assert key.endswith(".json")
    dashboard = json.loads(text)
    assert dashboard["uid"]
    assert len(json.dumps(configmap).encode()) < MAX_APPLY_BYTES, (
        "too large for client-side `kubectl apply`: document --server-side"
    )
    if DASHBOARD.exists():
        assert dashboard["uid"] == json.loads(DASHBOARD.read_text())["uid"]


def _relabel(labels: dict[str, str], configs: list[Obj]) -> dict[str, str] | None:
    """Prometheus relabelling (replace, keep, drop), for configs written in
    either spelling (prometheus.yml's snake_case, the PodMonitor's camelCase);
    None when the target is dropped."""
    labels = dict(labels)
    for raw in configs:
        cfg = {re.sub(r"_([a-z])", lambda m: m[1].upper(), k): v for k, v in raw.items()}
        value = cfg.get("separator", ";").join(
            labels.get(s, "") for s in cfg.get("sourceLabels", [])
        )
        match = re.fullmatch(cfg.get("regex", "(.*)"), value)
        action = cfg.get("action", "replace").lower()
        if action in ("keep", "drop"):
            if (match is None) == (action == "keep"):
                return None
        elif action == "replace":
            if match is None:
                continue
            replacement = re.sub(r"\$\{?(\d+)\}?", r"\\\1", cfg.get("replacement", "$1"))
            result = match.expand(replacement)
            if result:
                labels[cfg["targetLabel"]] = result
            else:
                labels.pop(cfg["targetLabel"], None)
        else:
            raise AssertionError(f"relabel action {action!r} is not simulated here")
    return labels


def _pod_meta(workload: Obj, port: str) -> dict[str, str]:
    """The service-discovery labels of one of the workload's pods, on one port."""
    meta = {
        f"__meta_kubernetes_pod_label_{re.sub(r'[^a-zA-Z0-9_]', '_', k)}": v
        for k, v in _pod_labels(workload).items()
    }
    return {
        **meta,
        "__meta_kubernetes_namespace": NAMESPACE,
        "__meta_kubernetes_pod_name": f"{workload['metadata']['name']}-0",
        "__meta_kubernetes_pod_container_port_name": port,
        "__meta_kubernetes_pod_phase": "Running",
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_podmonitor_labels_targets_as_the_plain_scrape_config(overlay: str) -> None:
    """The alerts and the dashboard see the same job and component labels
    whether Prometheus scrapes through the PodMonitor or the plain config."""
    if not PROMETHEUS_YML.exists():
        pytest.skip(f"{PROMETHEUS_YML} is not there to compare with")
    objects = _objects(overlay)
    monitor = _one(objects, "PodMonitor")
    scrape_configs = yaml.safe_load(PROMETHEUS_YML.read_text())["scrape_configs"]
    for workload in (_coordinator(objects), _trainer(objects)):
        via_monitor = set()
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            # prometheus-operator has already kept the selected pods' named
            # port and set job to "<namespace>/<name>" when these run.
            start = {**_pod_meta(workload, endpoint["port"]), "job": f"{NAMESPACE}/recoveryd"}
            out = _relabel(start, endpoint.get("relabelings", []))
            assert out is not None
            via_monitor.add((out["job"], out.get("component")))
        via_config = set()
        for job in scrape_configs:
            for port in _port_names(workload):
                start = {**_pod_meta(workload, port), "job": job["job_name"]}
                out = _relabel(start, job.get("relabel_configs", []))
                if out is not None:
                    via_config.add((out["job"], out.get("component")))
        assert via_monitor == via_config, workload["metadata"]["name"]
        assert len(via_monitor) == 1, via_monitor


def test_sidecar_overlay_runs_the_agent_beside_the_trainer() -> None:
    trainer = _trainer(_objects("sidecar"))
    pod = _pod_spec(trainer)
    (agent,) = pod["initContainers"]
    (main,) = pod["containers"]
    assert agent["restartPolicy"] == "Always"  # a native sidecar: started first, kept running
    args = agent["args"]
    assert args[0] == "agent"
    socket_path = args[args.index("--socket") + 1]
    assert _env(main)["RECOVERYD_SIDECAR_SOCKET"]["value"] == socket_path
    # Both see the socket's directory on the same emptyDir.
    volumes = {v["name"]: v for v in pod["volumes"]}
    agent_mounts = {m["mountPath"]: m["name"] for m in agent["volumeMounts"]}
    main_mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
    where = str(Path(socket_path).parent)
    assert agent_mounts[where] == main_mounts[where]
    assert "emptyDir" in volumes[agent_mounts[where]]
    # The agent serves the pod's metrics port and advertises the pod IP.
    assert int(args[args.index("--metrics-port") + 1]) == _port_names(trainer)["metrics"]
    assert _env(agent)["RECOVERYD_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert args[args.index("--coordinator") + 1] == _env(main)["RECOVERYD_COORDINATOR"]["value"]
