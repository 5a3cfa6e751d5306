"""deploy/daemonset.yaml and deploy/uninstall.yaml against the Kubernetes
API's own schemas (kubernetes-validate, --strict) for the oldest and newest
Kubernetes we support; what the Node watch needs of the DaemonSet (its
account, a role that may only read Nodes, the node's name from the downward
API); its day two: no hostPID, the sidecar on the node's address only, a
liveness probe; and the uninstall DaemonSet's agreement with it."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from ebpf_telemetry import config

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "deploy" / "daemonset.yaml"
UNINSTALL = ROOT / "deploy" / "uninstall.yaml"
VERSIONS = ("1.30.0", "1.37.0")


def validate(path: Path, version: str) -> subprocess.CompletedProcess[str]:
    tool = Path(sys.executable).parent / "kubernetes-validate"
    return subprocess.run(
        [str(tool), "--strict", "--quiet", "-k", version, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("manifest", [MANIFEST, UNINSTALL], ids=lambda p: p.name)
@pytest.mark.parametrize("version", VERSIONS)
def test_manifest_is_valid(manifest: Path, version: str) -> None:
    r = validate(manifest, version)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_misspelt_field_fails(tmp_path: Path) -> None:
    """The check above can fail: --strict rejects a field the API lacks."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(MANIFEST.read_text().replace("serviceAccountName:", "serviceAcountName:"))
    r = validate(bad, VERSIONS[-1])
    assert r.returncode != 0 and "serviceAcountName" in r.stdout + r.stderr


def docs(path: Path = MANIFEST) -> dict[str, Any]:
    return {d["kind"]: d for d in yaml.safe_load_all(path.read_text())}


def containers(pod: dict[str, Any], key: str = "containers") -> dict[str, Any]:
    return {c["name"]: c for c in pod.get(key, [])}


def test_the_node_watch_has_what_it_needs_and_no_more() -> None:
    d = docs()
    account = d["ServiceAccount"]["metadata"]
    assert d["ClusterRole"]["rules"] == [
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]}
    ]
    binding = d["ClusterRoleBinding"]
    assert binding["roleRef"]["name"] == d["ClusterRole"]["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["name"], "namespace": account["namespace"]}
    ]
    pod = d["DaemonSet"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account["name"]
    assert pod["automountServiceAccountToken"] is True
    agent = next(c for c in pod["containers"] if c["name"] == "ebpf-telemetry")
    env = {e["name"]: e for e in agent["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert "--node-name=$(NODE_NAME)" in agent["args"]
    cfg = config.from_mapping(tomllib.loads(d["ConfigMap"]["data"]["config.toml"]), "configmap")
    assert cfg.kubernetes.enabled and cfg.kubernetes.kubeconfig is None  # in-cluster


def test_day_two_of_the_daemonset() -> None:
    """No hostPID; the sidecar listens on the node's address (status.hostIP),
    not on every interface; the agent's liveness is `health` on its own config."""
    d = docs()
    pod = d["DaemonSet"]["spec"]["template"]["spec"]
    assert "hostPID" not in pod and pod["hostNetwork"] is True
    exporter = containers(pod)["node-exporter"]
    env = {e["name"]: e for e in exporter["env"]}
    assert env["HOST_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.hostIP"}}
    assert "--web.listen-address=[$(HOST_IP)]:9436" in exporter["args"]
    assert [p["hostPort"] for p in exporter["ports"]] == [9436]
    agent = containers(pod)["ebpf-telemetry"]
    config_arg = next(a for a in agent["args"] if a.startswith("--config="))
    for probe in ("startupProbe", "livenessProbe"):
        assert agent[probe]["exec"]["command"] == ["ebpf-telemetry", "health", config_arg], probe
    # liveness waits for three failed checks: with three intervals of age
    # allowed by each, a slow write never restarts the agent
    assert agent["livenessProbe"]["failureThreshold"] >= 3


def test_uninstall_agrees_with_the_daemonset() -> None:
    """Same image and nodes; it unloads the ConfigMap's pin dir, never with
    --force (a node whose agent still runs refuses and is retried), as root
    with no capability, from an init container (ready = unloaded)."""
    ds = docs()
    agent_pod = ds["DaemonSet"]["spec"]["template"]["spec"]
    agent = containers(agent_pod)["ebpf-telemetry"]
    pin_dir = tomllib.loads(ds["ConfigMap"]["data"]["config.toml"])["pin_dir"]
    (un,) = yaml.safe_load_all(UNINSTALL.read_text())
    assert un["kind"] == "DaemonSet"
    assert un["metadata"]["namespace"] == ds["DaemonSet"]["metadata"]["namespace"]
    labels = un["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/name"] != "ebpf-telemetry"  # not the agent's selector
    pod = un["spec"]["template"]["spec"]
    assert pod["tolerations"] == agent_pod["tolerations"]
    assert pod["nodeSelector"] == agent_pod["nodeSelector"]
    init = containers(pod, "initContainers")["unload"]
    assert init["image"] == agent["image"]
    assert [*init["command"], *init["args"]] == [
        "ebpf-telemetry", "unload", f"--pin-dir={pin_dir}"
    ]  # fmt: skip
    sc = init["securityContext"]
    assert sc["runAsUser"] == 0 and sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    annotations = un["spec"]["template"]["metadata"]["annotations"]
    assert annotations["container.apparmor.security.beta.kubernetes.io/unload"] == "unconfined"
    (mount,) = init["volumeMounts"]
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["hostPath"]["path"] == mount["mountPath"] == "/sys/fs/bpf"
    assert pin_dir.startswith("/sys/fs/bpf/")
    assert list(containers(pod)) == ["done"]
