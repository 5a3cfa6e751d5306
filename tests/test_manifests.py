"""deploy/daemonset.yaml against the Kubernetes API's own schemas
(kubernetes-validate, --strict) for the oldest and newest Kubernetes we
support, and what the Node watch needs of it: its account, a role that may
only read Nodes, the node's name from the downward API."""

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
VERSIONS = ("1.30.0", "1.37.0")


def validate(path: Path, version: str) -> subprocess.CompletedProcess[str]:
    tool = Path(sys.executable).parent / "kubernetes-validate"
    return subprocess.run(
        [str(tool), "--strict", "--quiet", "-k", version, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("version", VERSIONS)
def test_manifest_is_valid(version: str) -> None:
    r = validate(MANIFEST, version)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_misspelt_field_fails(tmp_path: Path) -> None:
    """The check above can fail: --strict rejects a field the API lacks."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(MANIFEST.read_text().replace("serviceAccountName:", "serviceAcountName:"))
    r = validate(bad, VERSIONS[-1])
    assert r.returncode != 0 and "serviceAcountName" in r.stdout + r.stderr


def docs() -> dict[str, Any]:
    return {d["kind"]: d for d in yaml.safe_load_all(MANIFEST.read_text())}


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
