"""The Kubernetes manifests (deploy/k8s, deploy/overlays) render and agree with the code.

`kubectl kustomize` (offline) renders the base and both autoscaling overlays; the checks then read
the rendered objects, not the source files, so a kustomize patch that breaks something is caught:
the container port is the default ``PORT``, the probe paths are routes of the app ``create_app``
builds, every environment variable the pods get is a documented setting (README configuration
table) and the ConfigMap's values are accepted by ``from_env``, the grace period covers the drain,
the pod runs as non-root on a read-only root filesystem, the requests cover the per-pod cap at the
cost per call measured in BENCHMARKS.md, and the autoscalers scale on a metric the bridge exports.

Needs kubectl (``.ci/run`` makes sure it is on PATH); skipped with the reason when it is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge.config import from_env
from bridge.phone.stream import STREAM_PREFIX
from bridge.web import create_app

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "k8s"
OVERLAYS = REPO / "deploy" / "overlays"
README = (REPO / "README.md").read_text()

# BENCHMARKS.md, session 3: 0.62 % of a core per call (0.616-0.647 % at 50-150 calls), RSS ~48 MB
# at rest plus up to ~100 KB per call (93 KB from a fresh process).
CPU_PER_CALL_MILLICORES = 6.2
RSS_BASELINE_BYTES = 48 * 2**20
RSS_PER_CALL_BYTES = 100 * 2**10
# server.py: after DRAIN_SECONDS, ending the remaining calls and closing the HTTP server.
SHUTDOWN_AFTER_DRAIN_S = 8


def _kubectl() -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not on PATH (.ci/run installs it): cannot render deploy/k8s")
    return kubectl


@cache
def _render_cached(directory: Path) -> tuple[dict[str, Any], ...]:
    out = subprocess.run(
        [_kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, f"kubectl kustomize {directory} failed:\n{out.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def render(directory: Path) -> list[dict[str, Any]]:
    return list(_render_cached(directory))


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    (bridge,) = pod["containers"]
    return dict(bridge)


def documented_settings() -> set[str]:
    return set(re.findall(r"^\| `([A-Z][A-Z0-9_]+)` \|", README, re.MULTILINE))


def secret_template() -> dict[str, Any]:
    doc = yaml.safe_load((K8S / "secret.example.yaml").read_text())
    assert doc["kind"] == "Secret"
    return dict(doc)


def configmap_data(docs: list[dict[str, Any]]) -> dict[str, str]:
    return dict(one(docs, "ConfigMap")["data"])


def pod_env_names(docs: list[dict[str, Any]]) -> set[str]:
    c = container(docs)
    names = {e["name"] for e in c.get("env", [])}
    for source in c.get("envFrom", []):
        assert set(source) == {"configMapRef"}, f"unexpected envFrom source {source}"
        assert source["configMapRef"]["name"] == one(docs, "ConfigMap")["metadata"]["name"]
        names |= set(configmap_data(docs))
    return names


def settings_of(docs: list[dict[str, Any]]) -> Any:
    """The Settings a pod would build: the ConfigMap plus the Secret template's keys with
    well-formed stand-ins (the template's own values are placeholders)."""
    secrets = {key: "x" * 32 for key in secret_template()["stringData"]}
    secrets["REDIS_URL"] = "redis://:password@redis.example.svc:6379/0"
    secrets["RECORDS_URL"] = "postgresql://bridge:password@postgres.example.svc:5432/bridge"
    secrets["TWILIO_ACCOUNT_SID"] = "AC" + "0" * 32
    return from_env({**configmap_data(docs), **secrets})


def _all_docs() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    yield "deploy/k8s", render(K8S)
    for overlay in sorted(OVERLAYS.iterdir()):
        yield f"deploy/overlays/{overlay.name}", render(overlay)


def test_the_base_renders_without_custom_resources() -> None:
    kinds = sorted(d["kind"] for d in render(K8S))
    assert kinds == sorted(
        ["Namespace", "ConfigMap", "Deployment", "Service", "Ingress", "Ingress", "Ingress", "PodDisruptionBudget"]
    )
    # The Secret is a template the user fills in; the base must never overwrite a real one.
    assert "Secret" not in kinds
    for doc in render(K8S):
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "voice-agent-bridge", doc["metadata"]["name"]


def test_the_container_port_is_the_default_port_and_the_service_reaches_it() -> None:
    docs = render(K8S)
    default_port = from_env({"ASSEMBLYAI_API_KEY": "k", "PUBLIC_HOSTNAME": "https://example.com"}).port
    (port,) = container(docs)["ports"]
    assert port["containerPort"] == default_port == settings_of(docs).port
    service = one(docs, "Service")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == [port["name"]]
    template = one(docs, "Deployment")["spec"]["template"]
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    assert template["metadata"]["annotations"]["prometheus.io/port"] == str(default_port)
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()


def test_the_probe_paths_are_routes_of_the_app() -> None:
    docs = render(K8S)
    app = create_app(settings_of(docs))
    get_routes = {r.rule for r in app.quart.url_map.iter_rules() if "GET" in (r.methods or ())}
    c = container(docs)
    probes = {kind: c[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    for kind, probe in probes.items():
        assert probe["path"] in get_routes, f"{kind} {probe['path']} is not a GET route of the app"
        assert probe["port"] == c["ports"][0]["name"]


def test_every_env_name_is_a_documented_setting() -> None:
    documented = documented_settings()
    for where, docs in _all_docs():
        undocumented = pod_env_names(docs) - documented
        assert undocumented == set(), f"{where}: not in README's configuration table: {sorted(undocumented)}"
    template_keys = set(secret_template()["stringData"])
    assert template_keys - documented == set()


def test_the_configmap_is_accepted_by_the_settings_parser() -> None:
    settings = settings_of(render(K8S))
    assert settings.workers == 1  # one process per pod: the pod is what is sized and scaled
    assert settings.public.secure, "Twilio opens Media Streams only over wss://"


def test_every_secret_reference_is_in_the_template() -> None:
    template = secret_template()
    for where, docs in _all_docs():
        refs = [e["valueFrom"]["secretKeyRef"] for e in container(docs)["env"] if "valueFrom" in e]
        assert refs, where
        for ref in refs:
            assert ref["name"] == template["metadata"]["name"], where
            assert ref["key"] in template["stringData"], f"{where}: {ref['key']} missing from secret.example.yaml"
    # The settings the issue names come from the Secret (they carry passwords).
    names = {e["name"] for e in container(render(K8S))["env"]}
    assert {"REDIS_URL", "RECORDS_URL", "STREAM_TOKEN_SECRET", "TWILIO_AUTH_TOKEN"} <= names
    # A template only: placeholders, no real credentials.
    assert all("REPLACE_ME" in value for value in template["stringData"].values())


def test_the_grace_period_covers_the_drain() -> None:
    docs = render(K8S)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    drain_s = settings_of(docs).drain_seconds
    pre_stop = container(docs)["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > float(pre_stop[1]) + drain_s + SHUTDOWN_AFTER_DRAIN_S


def test_the_pod_is_non_root_on_a_read_only_root_filesystem() -> None:
    docs = render(K8S)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    c = container(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False
    # What must stay writable is an emptyDir: /tmp (Hypercorn's private socket) and the
    # default SQLite records directory.
    empty = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts.keys() == {"/tmp", "/app/data"}
    assert set(mounts.values()) <= empty


def _millicores(text: str) -> float:
    return float(text[:-1]) if text.endswith("m") else float(text) * 1000


def _bytes(text: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    return int(text[:-2]) * units[text[-2:]] if text[-2:] in units else int(text)


def test_the_requests_cover_the_per_pod_cap_at_the_measured_cost() -> None:
    docs = render(K8S)
    calls = settings_of(docs).max_concurrent_calls
    resources = container(docs)["resources"]
    cpu_request = _millicores(resources["requests"]["cpu"])
    assert cpu_request >= calls * CPU_PER_CALL_MILLICORES
    assert _millicores(resources["limits"]["cpu"]) >= max(cpu_request, 1000)  # never below one event loop
    memory_request = _bytes(resources["requests"]["memory"])
    assert memory_request >= RSS_BASELINE_BYTES + calls * RSS_PER_CALL_BYTES
    assert _bytes(resources["limits"]["memory"]) >= 2 * memory_request  # an OOM kill drops every call


def test_the_ingress_keeps_streams_open_for_a_call_and_metrics_private() -> None:
    docs = render(K8S)
    settings = settings_of(docs)
    by_path: dict[str, dict[str, Any]] = {}
    for ingress in (d for d in docs if d["kind"] == "Ingress"):
        assert ingress["spec"]["ingressClassName"] == "nginx"
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                assert path["backend"]["service"]["name"] == one(docs, "Service")["metadata"]["name"]
                by_path[path["path"]] = ingress["metadata"].get("annotations", {})
    assert set(by_path) == {STREAM_PREFIX, "/", "/metrics"}
    stream = by_path[STREAM_PREFIX]
    for timeout in ("proxy-read-timeout", "proxy-send-timeout"):
        assert int(stream[f"nginx.ingress.kubernetes.io/{timeout}"]) >= settings.max_call_seconds
    assert "http_503" in stream["nginx.ingress.kubernetes.io/proxy-next-upstream"]
    assert stream["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert by_path["/metrics"]["nginx.ingress.kubernetes.io/whitelist-source-range"] == "127.0.0.1/32"


def test_the_autoscalers_scale_the_deployment_on_active_calls() -> None:
    exported = create_app(settings_of(render(K8S))).metrics.render().decode()
    assert re.search(r"^bridge_active_calls ", exported, re.M), "the bridge no longer exports bridge_active_calls"
    assert sorted(p.name for p in OVERLAYS.iterdir()) == ["hpa", "keda"]

    keda = render(OVERLAYS / "keda")
    scaled = one(keda, "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == one(keda, "Deployment")["metadata"]["name"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert "bridge_active_calls" in trigger["metadata"]["query"]
    calls = settings_of(keda).max_concurrent_calls
    assert 0 < float(trigger["metadata"]["threshold"]) < calls  # scale out before pods fill

    hpa_docs = render(OVERLAYS / "hpa")
    hpa = one(hpa_docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == one(hpa_docs, "Deployment")["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == "bridge_active_calls"
    assert 0 < float(metric["pods"]["target"]["averageValue"]) < calls

    for docs in (keda, hpa_docs):
        # The autoscaler owns the replica count: a fixed one would reset it on every apply.
        assert "replicas" not in one(docs, "Deployment")["spec"]
        assert len([d for d in docs if d["kind"] in ("ScaledObject", "HorizontalPodAutoscaler")]) == 1
    assert "replicas" in one(render(K8S), "Deployment")["spec"]


def test_ci_has_kubectl() -> None:
    """Guards the skip: on CI these tests must run, not skip (``.ci/run`` installs kubectl)."""
    if not os.environ.get("CI"):
        pytest.skip("only CI must have kubectl")
    assert shutil.which("kubectl"), ".ci/run should have put kubectl on PATH"


def test_the_pod_user_and_paths_are_the_images() -> None:
    """Static: the Containerfile's user and working directory are what the pod expects (the image
    itself is built and checked by tests/test_image.py)."""
    containerfile = (REPO / "Containerfile").read_text()
    docs = render(K8S)
    uid = one(docs, "Deployment")["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    assert re.search(rf"useradd [^\n]*--uid {uid}\b", containerfile)
    assert re.search(rf"^USER {uid}:{uid}$", containerfile, re.M)
    workdir = re.findall(r"^WORKDIR (\S+)$", containerfile, re.M)[-1]
    data_mounts = [m["mountPath"] for m in container(docs)["volumeMounts"] if m["name"] == "data"]
    # RECORDS_URL's default (sqlite:///data/calls.sqlite3) is relative to the working directory.
    assert data_mounts == [f"{workdir}/data"]
    (args,) = {tuple(container(d)["args"]) for _, d in _all_docs()}
    assert args == ("serve",) and '["serve"]' in containerfile
