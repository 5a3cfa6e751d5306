"""deploy/uninstall.yaml's unload, as far as this machine goes without a
cluster: its init container's command line, run as the manifest runs it (root
with no capability: setpriv drops them all), against real pins. It detaches
(the pinned links' ids are gone from the kernel), removes the pins, and run
again exits 0 ("nothing to unload"), so a re-applied or retried uninstall is
harmless. Under a running agent it refuses with one line and exit 1 (the init
container fails and kubelet retries it), and succeeds once the agent is gone.
(The same command in the image under runc: tests/test_packaging.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import tomllib
from pathlib import Path

import yaml

from agentlab import cli
from test_reliability import DEFAULTS, AgentProc, one_error_line, toml

ROOT = Path(__file__).resolve().parents[1]
NO_CAPS = ("setpriv", "--bounding-set=-all", "--inh-caps=-all", "--ambient-caps=-all")


def unload_args(pin_dir: str) -> list[str]:
    """The init container's command and args, the ConfigMap's pin dir replaced by this test's."""
    (ds,) = yaml.safe_load_all((ROOT / "deploy" / "uninstall.yaml").read_text())
    init = next(c for c in ds["spec"]["template"]["spec"]["initContainers"])
    command = [*init["command"], *init["args"]]
    cm = next(
        d for d in yaml.safe_load_all((ROOT / "deploy" / "daemonset.yaml").read_text())
        if d["kind"] == "ConfigMap"
    )  # fmt: skip
    configured = tomllib.loads(cm["data"]["config.toml"])["pin_dir"]
    assert command == ["ebpf-telemetry", "unload", f"--pin-dir={configured}"], command
    return [*command[1:-1], f"--pin-dir={pin_dir}"]


def link_ids(pin_dir: str) -> list[int]:
    links = Path(pin_dir) / "links"
    return [
        json.loads(subprocess.run(["bpftool", "-j", "link", "show", "pinned", str(p)],
                                  capture_output=True, text=True, check=True).stdout)["id"]
        for p in sorted(links.iterdir())
    ]  # fmt: skip


def link_exists(link_id: int) -> bool:
    r = subprocess.run(["bpftool", "link", "show", "id", str(link_id)], capture_output=True)
    return r.returncode == 0


def test_uninstall_unloads_and_can_run_again(pin_dir: str, tmp_path: Path) -> None:
    cfg = toml(tmp_path, DEFAULTS)
    r = cli("run", "--once", "--config", str(cfg), "--pin-dir", pin_dir,
            "--textfile", str(tmp_path / "t.prom"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    ids = link_ids(pin_dir)
    assert ids and all(link_exists(i) for i in ids)

    r = cli(*unload_args(pin_dir), prefix=NO_CAPS)
    assert r.returncode == 0 and r.stdout.startswith("removed "), r
    assert not os.path.lexists(pin_dir)
    assert not any(link_exists(i) for i in ids), "a program still attached"

    r = cli(*unload_args(pin_dir), prefix=NO_CAPS)  # applied again, or retried
    assert r.returncode == 0 and r.stdout.startswith("nothing to unload"), r


def test_uninstall_refuses_while_an_agent_runs(pin_dir: str, tmp_path: Path) -> None:
    cfg = toml(tmp_path, DEFAULTS)
    agent = AgentProc(cfg, pin_dir, tmp_path / "a.prom")
    try:
        agent.wait_write()
        line = one_error_line(cli(*unload_args(pin_dir), prefix=NO_CAPS))
        assert "stop it first" in line, line
        assert link_ids(pin_dir)
        assert agent.stop() == 0
    finally:
        agent.kill()
    r = cli(*unload_args(pin_dir), prefix=NO_CAPS)  # kubelet's retry, the agent gone
    assert r.returncode == 0 and r.stdout.startswith("removed "), r
    assert not os.path.lexists(pin_dir)
