"""`ebpf-telemetry health`, the DaemonSet's startup and liveness probe: the
textfile's age against three of the config's intervals (or --max-age), one
line and exit 1 when it is missing or older. Then the probe's own command
line from deploy/daemonset.yaml against a real agent, and against the same
agent hung (SIGSTOP): the probe fails within a few intervals, and passes again
once the agent writes."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import yaml

from agentlab import cli
from netlab import wait_until
from test_reliability import DEFAULTS, INTERVAL, AgentProc, one_error_line, toml

ROOT = Path(__file__).resolve().parents[1]


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_fresh_old_and_missing_textfile(tmp_path: Path) -> None:
    tf = tmp_path / "t.prom"
    cfg = toml(tmp_path, f'textfile = "{tf}"\ninterval_seconds = 10\n')
    line = one_error_line(cli("health", "--config", str(cfg)))
    assert f"{tf} does not exist" in line, line

    tf.write_text("# a textfile\n")
    age(tf, 25)  # 3 x 10 s allowed
    r = cli("health", "--config", str(cfg))
    assert r.returncode == 0 and r.stdout.startswith(f"ok: {tf} written 25."), r
    age(tf, 35)
    line = one_error_line(cli("health", "--config", str(cfg)))
    assert "last written 35." in line and "more than 30 s" in line, line
    assert cli("health", "--config", str(cfg), "--max-age", "60").returncode == 0

    other = tmp_path / "other.prom"  # --textfile over the config's
    other.write_text("# another\n")
    r = cli("health", "--config", str(cfg), "--textfile", str(other))
    assert r.returncode == 0 and str(other) in r.stdout, r


def probe() -> list[str]:
    """The agent's liveness probe in deploy/daemonset.yaml (the startup probe is the same)."""
    docs = {
        d["kind"]: d for d in yaml.safe_load_all((ROOT / "deploy" / "daemonset.yaml").read_text())
    }
    pod = docs["DaemonSet"]["spec"]["template"]["spec"]
    agent = next(c for c in pod["containers"] if c["name"] == "ebpf-telemetry")
    command: list[str] = agent["livenessProbe"]["exec"]["command"]
    assert agent["startupProbe"]["exec"]["command"] == command
    return command


def test_the_probe_follows_a_real_agent(pin_dir: str, tmp_path: Path) -> None:
    tf = tmp_path / "a.prom"
    cfg = toml(tmp_path, f'{DEFAULTS}textfile = "{tf}"\ninterval_seconds = {INTERVAL:g}\n')
    command = probe()
    assert command[:2] == ["ebpf-telemetry", "health"] and command[2].startswith("--config=")
    args = ["health", f"--config={cfg}"]  # the probe's, with this test's config

    agent = AgentProc(cfg, pin_dir, tf)
    try:
        agent.wait_write()
        r = cli(*args)
        assert r.returncode == 0 and r.stdout.startswith("ok: "), r
        os.kill(agent.proc.pid, signal.SIGSTOP)  # hung: alive, not writing
        failed = wait_until(lambda: cli(*args).returncode == 1 or None, 60, 0.2, "probe fails")
        assert failed
        line = one_error_line(cli(*args))
        assert "the agent is not writing" in line, line
        os.kill(agent.proc.pid, signal.SIGCONT)
        wait_until(lambda: cli(*args).returncode == 0, 60, 0.2, "probe passes again")
        assert agent.stop() == 0
    finally:
        if agent.proc.poll() is None:
            os.kill(agent.proc.pid, signal.SIGCONT)
        agent.kill()
