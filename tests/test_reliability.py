"""Reliability and security (issue 6), provoked for real: restarts, kill -9,
SIGHUP, a full disk, bad paths, bad input, missing privileges, fuzzing.

The CLI runs as a subprocess (`python -m ebpf_telemetry`) wherever the case
is about the CLI: exit status, the one stderr line, what is left on disk.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from agentlab import EMULATED, cli
from ebpf_telemetry import config, host, loader
from ebpf_telemetry.binding import TelemetryError, ffi
from ebpf_telemetry.config import ConfigError
from ebpf_telemetry.histogram import MAX_SLOTS
from ebpf_telemetry.maps import Pins
from ebpf_telemetry.values import Hist, NodeMetrics, TelemetryEvent
from netlab import Netns, TcpEchoServer, TcpPingPong, veth_pair, wait_until

PROG = "ebpf-telemetry"
INTERVAL = 1.0  # the shortest interval_seconds there is
CUMULATIVE = ("_total", "_bucket", "_count", "_sum")
DEFAULTS = "sample_rate = 100\n"  # a config of defaults (an empty file is warned about)

# -- helpers ---------------------------------------------------------------------

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def one_error_line(r: subprocess.CompletedProcess[str]) -> str:
    """The run failed with exactly one line on stderr, ours, and no traceback."""
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode != 0, r
    assert "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and lines[0].startswith(f"{PROG}: error: "), r.stderr
    print(f"\n  stderr: {lines[0]}")
    return lines[0]


def series(text: str) -> Series:
    """Every counter/histogram/summary sample that must never decrease."""
    out: Series = {}
    for fam in text_string_to_metric_families(text):
        if fam.type not in ("counter", "histogram", "summary"):
            continue
        for s in fam.samples:
            if s.name.endswith(CUMULATIVE):
                out[s.name, frozenset(s.labels.items())] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float | None:
    want = set(labels.items())
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and want <= set(s.labels.items()):
                return s.value
    return None


def last_update(path: Path) -> float:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return 0.0
    return value(text, "ebpf_telemetry_last_update_timestamp_seconds") or 0.0


def rtt_count(path: Path, peer: str) -> float:
    return value(path.read_text(), "ebpf_tcp_rtt_seconds_count", peer=peer) or 0.0


def disk_state(pin_dir: str, *files: Path) -> dict[str, Any]:
    """What a failed command must leave as it was: pins (names, modes, the
    settings generation) and files (bytes, mtime)."""
    state: dict[str, Any] = {}
    if os.path.isdir(pin_dir):
        for root, dirs, names in os.walk(pin_dir):
            for n in dirs + names:
                p = os.path.join(root, n)
                state[p] = stat.S_IMODE(os.lstat(p).st_mode)
        with contextlib.suppress(TelemetryError), Pins(pin_dir) as pins:
            state["generation"] = pins.settings().generation  # peertable.apply bumps it
    for f in files:
        state[str(f)] = (f.read_bytes(), f.stat().st_mtime_ns) if f.exists() else None
    return state


def toml(tmp: Path, text: str, name: str = "c.toml") -> Path:
    """A config file of text; one with settings and no peer_detail gets every
    peer's histogram (conftest.FULL_DETAIL_TOML), as before the series budget."""
    from conftest import FULL_DETAIL_TOML

    p = tmp / name
    p.write_text(FULL_DETAIL_TOML + text if text.strip() and "peer_detail" not in text else text)
    return p


def peers_toml(peers: dict[str, list[str]]) -> str:
    lines = ["[peers]"]
    for name, cidrs in peers.items():
        quoted = ", ".join(f'"{c}"' for c in cidrs)
        lines.append(f'"{name}" = [{quoted}]')
    return "\n".join(lines) + "\n"


class AgentProc:
    """`ebpf-telemetry run` as a subprocess, its stderr in a file."""

    def __init__(self, cfg: Path, pin_dir: str, textfile: Path, *extra: str) -> None:
        self.log_path = cfg.parent / f"agent-{time.monotonic_ns()}.log"
        self.textfile = textfile
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ebpf_telemetry", "run", "--config", str(cfg),
                 "--pin-dir", pin_dir, "--textfile", str(textfile),
                 "--interval", str(INTERVAL), *extra],
                stdout=log, stderr=log,
            )  # fmt: skip

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def wait_write(self, after: float = 0.0, timeout: float | None = None) -> float:
        """Wait for a textfile written after the wall time `after` (emulated,
        loading and attaching alone can take a minute)."""
        timeout = timeout or (180 if EMULATED else 15)

        def written() -> float:
            assert self.proc.poll() is None, f"agent exited {self.proc.returncode}: {self.log}"
            ts = last_update(self.textfile)
            return ts if ts > after else 0.0

        return wait_until(written, timeout, 0.02, "a textfile write")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(30)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def lab() -> Iterator[tuple[Netns, Netns, Any]]:
    """a and b over a veth; b has a second address (10.241.1.50)."""
    with Netns("a") as a, Netns("b") as b:
        yield a, b, veth_pair(a, b, v6=None, extra_b=["10.241.1.50"])


# -- continuity: SIGTERM, kill -9, unload -----------------------------------------


def test_restart_kill9_and_unload(
    lab: Any, pin_dir: str, tmp_path: Path, agents: list[AgentProc]
) -> None:
    a, b, veth = lab
    cfg = toml(tmp_path, peers_toml({"b": [f"{veth.v4_b}/32"]}))
    tf = tmp_path / "t.prom"
    with TcpEchoServer(b, veth.v4_b) as srv, TcpPingPong(a, [(veth.v4_b, srv.port)]) as pp:
        agents.append(first := AgentProc(cfg, pin_dir, tf))
        first.wait_write()
        pp.run(200)
        ts = wait_until(lambda: rtt_count(tf, "b") >= 200 and last_update(tf), 10, what="200")
        text0 = tf.read_text()
        before = series(text0)

        # SIGTERM: exit 0, pins stay; traffic while no agent runs still counts
        assert first.stop() == 0, first.log
        assert Pins(pin_dir).exists()
        pp.run(100)
        agents.append(second := AgentProc(cfg, pin_dir, tf))
        second.wait_write(after=ts)
        after = series(tf.read_text())
        went_down = {k: (v, after.get(k)) for k, v in before.items() if after.get(k, -1) < v}
        assert not went_down, went_down  # Prometheus sees no reset
        assert len(after) >= len(before)
        assert (
            rtt_count(tf, "b") >= (value(text0, "ebpf_tcp_rtt_seconds_count", peer="b") or 0) + 100
        )

        # kill -9 while traffic flows: pinned links keep counting with no agent
        with Pins(pin_dir) as pins:
            node_b = next(i for i, n in peer_names_of(pins).items() if n == "b")

            def count() -> int:
                return int(pins.node_rows()[1][node_b].rtt_count)

            k0 = count()
            flow = threading.Thread(target=pp.run, args=(400,))
            flow.start()
            wait_until(lambda: count() >= k0 + 50, 10, what="traffic flowing")
            second.proc.kill()
            second.proc.wait()
            flow.join(30)
            assert not flow.is_alive()
            pp.run(150)  # with no agent at all
            k1 = count()
        assert k1 - k0 >= 550, (k0, k1)
        stale = tmp_path / ".t.prom.999999999.tmp"  # what a kill -9 mid-write leaves
        stale.write_text("half")
        r = cli("run", "--once", "--config", str(cfg), "--pin-dir", pin_dir,
                "--textfile", str(tf), "--interval", str(INTERVAL))  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert rtt_count(tf, "b") >= k1
        assert not stale.exists()

    # unload, then run: a clean start from zero
    r = cli("unload", "--pin-dir", pin_dir)
    assert r.returncode == 0 and not os.path.exists(pin_dir), r.stderr
    r = cli("run", "--once", "--config", str(cfg), "--pin-dir", pin_dir,
            "--textfile", str(tf), "--interval", str(INTERVAL))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert rtt_count(tf, "b") == 0
    assert value(tf.read_text(), "ebpf_tcp_retransmits_total", peer="b") == 0


def peer_names_of(pins: Pins) -> dict[int, str]:
    from ebpf_telemetry.nodes import peer_names

    return peer_names(pins)


# -- SIGHUP -------------------------------------------------------------------------


@pytest.mark.matrix
def test_sighup_reload_keeps_counters_and_reclassifies(
    lab: Any, pin_dir: str, tmp_path: Path, agents: list[AgentProc]
) -> None:
    a, b, veth = lab
    extra = veth.extra_b[0]
    cfg = toml(tmp_path, peers_toml({"keep": [f"{veth.v4_b}/32"], "move": [f"{extra}/32"]}))
    tf = tmp_path / "t.prom"
    with (
        TcpEchoServer(b, veth.v4_b) as s1,
        TcpEchoServer(b, extra) as s2,
        TcpPingPong(a, [(veth.v4_b, s1.port), (extra, s2.port)]) as pp,
    ):
        started = time.time()
        agents.append(agent := AgentProc(cfg, pin_dir, tf))
        agent.wait_write()
        text = tf.read_text()
        assert value(text, "ebpf_telemetry_interval_seconds", node=socket.gethostname()) == INTERVAL
        assert value(text, "ebpf_config_last_reload_successful") == 1
        loaded = value(text, "ebpf_config_last_reload_success_timestamp_seconds") or 0.0
        assert loaded >= started
        pp.run(300)
        wait_until(lambda: min(rtt_count(tf, "keep"), rtt_count(tf, "move")) >= 300, 10)
        keep0 = rtt_count(tf, "keep")
        hup = time.time()

        # `move` renamed (its id changes hands: starts from zero), a's address added
        toml(tmp_path, peers_toml({"keep": [f"{veth.v4_b}/32"], "renamed": [f"{extra}/32"],
                                   "a": [f"{veth.v4_a}/32"]}))  # fmt: skip
        agent.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "config reloaded" in agent.log, 10, what="reload")
        ts = agent.wait_write(after=time.time())
        text = tf.read_text()
        assert value(text, "ebpf_tcp_rtt_seconds_count", peer="move") is None
        assert value(text, "ebpf_config_last_reload_successful") == 1
        reloaded = value(text, "ebpf_config_last_reload_success_timestamp_seconds") or 0.0
        assert reloaded >= hup > loaded
        assert rtt_count(tf, "keep") >= keep0  # not reset
        assert rtt_count(tf, "renamed") == 0 and rtt_count(tf, "a") == 0

        # the same, already classified connections: re-classified (generation bump)
        pp.run(100)
        wait_until(lambda: rtt_count(tf, "renamed") >= 100 and rtt_count(tf, "a") >= 100, 10)
        assert rtt_count(tf, "keep") >= keep0 + 100
        assert rtt_count(tf, "renamed") < 300  # did not inherit `move`'s counts
        assert last_update(tf) > ts

        # an invalid config on SIGHUP: logged, the old one kept, still running
        toml(tmp_path, "colour = 1\n")
        agent.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "config not reloaded" in agent.log, 10, what="reload refused")
        agent.wait_write(after=time.time())
        assert rtt_count(tf, "renamed") >= 100
        text = tf.read_text()
        assert value(text, "ebpf_config_last_reload_successful") == 0
        assert value(text, "ebpf_config_last_reload_success_timestamp_seconds") == reloaded
        assert agent.stop() == 0


# -- textfile faults --------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill(directory: Path) -> Path:
    """Fill the filesystem of directory until ENOSPC; the filler file."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as f:
        chunk = b"\0" * 4096
        with contextlib.suppress(OSError):
            while True:
                f.write(chunk)
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0")
    with pytest.raises(OSError) as e:
        (directory / "probe").write_bytes(b"x" * 4096)
    assert e.value.errno == errno.ENOSPC
    (directory / "probe").unlink()
    return filler


def test_full_disk_keeps_previous_textfile_and_recovers(
    pin_dir: str, tmp_path: Path, agents: list[AgentProc]
) -> None:
    cfg = toml(tmp_path, peers_toml({"x": ["192.0.2.0/24"]}))  # a small, fixed textfile
    with tmpfs(tmp_path / "small", "size=256k,mode=0755") as d:
        tf = d / "t.prom"
        agents.append(agent := AgentProc(cfg, pin_dir, tf))
        agent.wait_write()
        filler = fill(d)
        wait_until(lambda: "textfile not written" in agent.log, 10, what="the error")
        kept = tf.read_bytes()
        time.sleep(4 * INTERVAL)  # several intervals fail: observe, not synchronise
        assert agent.proc.poll() is None
        assert tf.read_bytes() == kept  # the previous file, whole
        assert series(kept.decode()) and kept.endswith(b"\n")
        assert sorted(p.name for p in d.iterdir()) == ["filler", "t.prom"]  # no temp left
        ts = last_update(tf)
        filler.unlink()
        agent.wait_write(after=ts)
        assert agent.stop() == 0
    log = agent.log
    print("\n  " + next(x for x in log.splitlines() if "textfile not written" in x))
    assert log.count("textfile not written") == 1, log
    assert "textfile written again" in log


@pytest.mark.parametrize("kind", ["directory", "symlink", "readonly", "missing-dir"])
def test_bad_textfile_path_fails_at_start(kind: str, pin_dir: str, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.prom"
    target.write_text("untouched\n")
    with contextlib.ExitStack() as stack:
        if kind == "directory":
            tf = tmp_path / "dir.prom"
            tf.mkdir()
            want = "is not a regular file"
        elif kind == "symlink":
            tf = tmp_path / "link.prom"
            tf.symlink_to(target)
            want = "is a symlink; refusing to follow it"
        elif kind == "readonly":
            ro = stack.enter_context(tmpfs(tmp_path / "ro", "ro,size=64k"))
            tf = ro / "t.prom"
            want = "read-only filesystem"
        else:  # a typo: the directory is not created, node_exporter would never read it
            tf = tmp_path / "nodir" / "t.prom"
            want = f"textfile directory {tmp_path / 'nodir'} does not exist"
        r = cli("run", "--once", "--config", str(toml(tmp_path, DEFAULTS)), "--pin-dir", pin_dir,
                "--textfile", str(tf))  # fmt: skip
        assert want in one_error_line(r)
    assert target.read_text() == "untouched\n"
    assert not os.path.exists(tmp_path / "nodir")
    assert not os.path.exists(pin_dir)  # failed before loading anything


# -- bad input ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pinned(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A pinned, running state and a textfile that bad input must leave alone."""
    from conftest import require_kernel

    require_kernel()
    tmp = tmp_path_factory.mktemp("pinned")
    pin_dir = f"/sys/fs/bpf/ebt-test-{os.getpid()}-pinned"
    tf = tmp / "t.prom"
    r = cli("run", "--once", "--config", str(toml(tmp, DEFAULTS)), "--pin-dir", pin_dir,
            "--textfile", str(tf), "--interval", str(INTERVAL))  # fmt: skip
    assert r.returncode == 0, r.stderr
    yield pin_dir, tf
    loader.unload(pin_dir)


BAD_CONFIGS = [
    ("node_name = ", "invalid TOML"),
    ("colour = 1", "unknown key 'colour'"),
    ('interval_seconds = "5"', "interval_seconds must be int or float, not str"),
    ('[peers]\na = ["10.0.0.0/33"]', "bad CIDR '10.0.0.0/33'"),
    ('[peers]\na = ["10.0.0.0/24"]\nb = ["10.0.0.0/24"]', "listed under both 'a' and 'b'"),
    ("interval_seconds = 0", "interval_seconds must be >= 1"),
    ("interval_seconds = -0.5", "interval_seconds must be >= 1"),
    ("interval_seconds = inf", "interval_seconds must be >= 1"),
    ("interval_seconds = 0.001", "interval_seconds must be >= 1 (seconds)"),
    ("sample_rate = -1", "sample_rate must be >= 0"),
    ('listen = "x:99999"', "is not HOST:PORT"),
]


@pytest.mark.parametrize(("text", "message"), BAD_CONFIGS)
def test_bad_config_changes_nothing(
    pinned: tuple[str, Path], tmp_path: Path, text: str, message: str
) -> None:
    pin_dir, tf = pinned
    before = disk_state(pin_dir, tf)
    r = cli("run", "--once", "--config", str(toml(tmp_path, text)), "--pin-dir", pin_dir,
            "--textfile", str(tf))  # fmt: skip
    assert message in one_error_line(r)
    assert disk_state(pin_dir, tf) == before


def test_config_not_utf8_is_one_line(pinned: tuple[str, Path], tmp_path: Path) -> None:
    pin_dir, tf = pinned
    before = disk_state(pin_dir, tf)
    bad = tmp_path / "latin1.toml"
    bad.write_bytes('node_name = "café"\n'.encode("latin-1"))
    r = cli("run", "--once", "--config", str(bad), "--pin-dir", pin_dir, "--textfile", str(tf))
    assert "not UTF-8 text (byte 16)" in one_error_line(r)
    assert disk_state(pin_dir, tf) == before


def test_busy_listen_port_fails_before_the_kernel_is_touched(pin_dir: str, tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        r = cli("run", "--once", "--listen", f"127.0.0.1:{port}", "--pin-dir", pin_dir,
                "--textfile", str(tmp_path / "t.prom"))  # fmt: skip
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in one_error_line(r)
    assert not os.path.exists(pin_dir)  # nothing loaded, nothing pinned


def test_inspect_missing_pin_dir() -> None:
    r = cli("inspect", "--pin-dir", "/sys/fs/bpf/ebt-does-not-exist")
    assert "nothing pinned at /sys/fs/bpf/ebt-does-not-exist" in one_error_line(r)
    assert not os.path.exists("/sys/fs/bpf/ebt-does-not-exist")


def test_unload_refuses_a_dir_off_bpffs(tmp_path: Path) -> None:
    """A mistyped --pin-dir: ordinary files named like our pins are not ours."""
    d = tmp_path / "x"
    (d / "links").mkdir(parents=True)
    (d / "events").write_text("an ordinary file\n")
    (d / "links" / "sched_switch").write_text("also ordinary\n")
    r = cli("unload", "--pin-dir", str(d))
    assert "is not on a BPF filesystem; nothing deleted" in one_error_line(r)
    assert (d / "events").read_text() == "an ordinary file\n"
    assert (d / "links" / "sched_switch").exists()


def test_unload_is_idempotent(pin_dir: str) -> None:
    """Uninstall scripts re-run: a missing or empty pin dir is exit 0."""
    for _ in range(2):  # missing, then missing again
        r = cli("unload", "--pin-dir", pin_dir)
        assert (r.returncode, r.stdout.strip()) == (0, f"nothing to unload at {pin_dir}"), r
    os.makedirs(os.path.join(pin_dir, "links"), mode=0o700)  # what a crash at start leaves
    r = cli("unload", "--pin-dir", pin_dir)
    assert (r.returncode, r.stdout.strip()) == (0, f"nothing to unload at {pin_dir}"), r
    assert not os.path.exists(pin_dir)


def test_unload_refuses_a_bpffs_dir_without_our_pins(pin_dir: str) -> None:
    os.makedirs(pin_dir, mode=0o700)
    bpftool_map(f"{pin_dir}/someone_elses", "type", "array", "key", "4", "value", "8",
                "entries", "1", "name", "someone_elses")  # fmt: skip
    r = cli("unload", "--pin-dir", pin_dir)
    assert "holds no ebpf-telemetry pins; nothing deleted" in one_error_line(r)
    assert os.listdir(pin_dir) == ["someone_elses"]
    os.unlink(f"{pin_dir}/someone_elses")


def bpftool_map(path: str, *spec: str) -> None:
    subprocess.run(["bpftool", "map", "create", path, *spec], check=True)


def test_foreign_pins_are_refused_with_strict_pins(pin_dir: str, tmp_path: Path) -> None:
    os.makedirs(pin_dir, mode=0o700)
    bpftool_map(f"{pin_dir}/rtt_hist_map", "type", "percpu_array", "key", "4", "value", "8",
                "entries", "4", "name", "rtt_hist_map")  # fmt: skip
    bpftool_map(f"{pin_dir}/settings_map", "type", "array", "key", "4", "value", "8",
                "entries", "1", "name", "settings_map")  # fmt: skip
    tf = tmp_path / "t.prom"
    before = disk_state(pin_dir, tf)
    strict = toml(tmp_path, "strict_pins = true\n")
    r = cli("run", "--once", "--config", str(strict), "--pin-dir", pin_dir, "--textfile", str(tf))
    line = one_error_line(r)
    assert "value 8 B; expected" in line and "unload" in line and "strict_pins" in line
    r = cli("doctor", "--config", str(strict), "--pin-dir", pin_dir, "--textfile", str(tf))
    assert r.returncode == 1 and "FAIL pins:" in r.stdout and "run refuses them" in r.stdout
    r = cli("inspect", "--pin-dir", pin_dir)
    assert "value 8 B; expected" in one_error_line(r)
    assert disk_state(pin_dir, tf) == before
    assert sorted(os.listdir(pin_dir)) == ["rtt_hist_map", "settings_map"]


def test_pins_of_another_layout_are_replaced_by_run(lab: Any, pin_dir: str, tmp_path: Path) -> None:
    """An upgrade across a layout change: the map of another layout (here a
    run-queue histogram with 8-byte values, as an earlier release could have
    left it) is replaced, its counters restart, the other maps keep theirs."""
    a, b, veth = lab
    cfg = toml(tmp_path, peers_toml({"b": [f"{veth.v4_b}/32"]}))
    tf = tmp_path / "t.prom"
    run = ("run", "--once", "--config", str(cfg), "--pin-dir", pin_dir, "--textfile", str(tf),
           "--interval", str(INTERVAL))  # fmt: skip
    with TcpEchoServer(b, veth.v4_b) as srv, TcpPingPong(a, [(veth.v4_b, srv.port)]) as pp:
        assert cli(*run).returncode == 0
        pp.run(200)
        assert rtt_count(tf, "b") == 0  # counted after the write
        os.unlink(f"{pin_dir}/runqlat_hist_map")
        bpftool_map(f"{pin_dir}/runqlat_hist_map", "type", "percpu_array", "key", "4",
                    "value", "8", "entries", "1", "name", "runqlat_hist_map")  # fmt: skip
        d = cli("doctor", "--config", str(cfg), "--pin-dir", pin_dir, "--textfile", str(tf))
        assert d.returncode == 0, d.stdout
        assert "warn pins:" in d.stdout and "run replaces runqlat_hist_map" in d.stdout, d.stdout

        r = cli(*run)
        assert r.returncode == 0, r.stderr
    records = [json.loads(x) for x in r.stderr.splitlines() if x.startswith("{")]
    warned = [x for x in records if x["level"] == "warning"]
    assert [(x["msg"], x["maps"]) for x in warned] == [
        ("pinned maps of another layout replaced; their counters restart", ["runqlat_hist_map"])
    ], warned
    text = tf.read_text()
    assert value(text, "ebpf_pins_replaced_total") == 1
    assert rtt_count(tf, "b") >= 200  # kept its counts
    with Pins(pin_dir) as pins:  # ours again, and written by the programs now attached
        n0 = pins.runqlat_hist().count
        wait_until(lambda: pins.runqlat_hist().count > n0, 10, what="run-queue samples")
    r = cli(*run)  # nothing left to replace
    assert r.returncode == 0 and "another layout" not in r.stderr, r.stderr
    assert value(tf.read_text(), "ebpf_pins_replaced_total") == 0


def test_pins_of_the_per_cpu_node_rows_are_replaced_by_run(
    lab: Any, pin_dir: str, tmp_path: Path
) -> None:
    """An upgrade from releases whose node_metrics_map was per-CPU (before
    16,384 peers): `run` replaces it with the rest of the peer group (ids
    mean the same peer in all of them), creates host_metrics_map, and counts
    RTT into the new rows."""
    from ebpf_telemetry.pincheck import PEER_GROUP

    a, b, veth = lab
    cfg = toml(tmp_path, peers_toml({"b": [f"{veth.v4_b}/32"]}))
    tf = tmp_path / "t.prom"
    run = ("run", "--once", "--config", str(cfg), "--pin-dir", pin_dir, "--textfile", str(tf),
           "--interval", str(INTERVAL))  # fmt: skip
    assert cli(*run).returncode == 0
    os.unlink(f"{pin_dir}/node_metrics_map")
    os.unlink(f"{pin_dir}/host_metrics_map")  # the old releases had none
    bpftool_map(f"{pin_dir}/node_metrics_map", "type", "percpu_array", "key", "4", "value",
                str(ffi.sizeof("struct node_metrics")), "entries", "257",
                "name", "node_metrics_map")  # fmt: skip
    with TcpEchoServer(b, veth.v4_b) as srv, TcpPingPong(a, [(veth.v4_b, srv.port)]) as pp:
        r = cli(*run)
        assert r.returncode == 0, r.stderr
        pp.run(50)
        r2 = cli(*run)
    records = [json.loads(x) for x in r.stderr.splitlines() if x.startswith("{")]
    warned = [x for x in records if x["level"] == "warning"]
    assert [x["msg"] for x in warned] == [
        "pinned maps of another layout replaced; their counters restart"
    ]
    assert set(warned[0]["maps"]) == set(PEER_GROUP) & set(os.listdir(pin_dir))
    assert "node_metrics_map" in warned[0]["maps"]
    assert r2.returncode == 0 and "another layout" not in r2.stderr, r2.stderr
    assert rtt_count(tf, "b") >= 50
    assert os.path.exists(f"{pin_dir}/host_metrics_map")


def test_pins_to_replace_keep_the_peer_group_together() -> None:
    from ebpf_telemetry.pincheck import PEER_GROUP, PinSurvey

    present = ("rtt_hist_map", "node_metrics_map", "peer_info_map", "peer_addr_map",
               "peer_cidr_map", "stats_map", "runqlat_hist_map")  # fmt: skip
    alone = PinSurvey("/x", present, {"runqlat_hist_map": "value differs"})
    assert alone.to_replace() == ("runqlat_hist_map",)
    peers = PinSurvey("/x", present, {"peer_info_map": "value differs"})
    assert set(peers.to_replace()) == set(PEER_GROUP) & set(present)
    assert "stats_map" not in peers.to_replace()


def test_no_btf(pin_dir: str, tmp_path: Path) -> None:
    tf = tmp_path / "t.prom"
    r = cli("run", "--once", "--config", str(toml(tmp_path, DEFAULTS)), "--pin-dir", pin_dir,
            "--textfile", str(tf), env={"EBPF_TELEMETRY_BTF": "/nonexistent/vmlinux"})  # fmt: skip
    assert "no kernel BTF at /nonexistent/vmlinux" in one_error_line(r)
    assert not os.path.exists(pin_dir) and not tf.exists()
    r = cli("doctor", env={"EBPF_TELEMETRY_BTF": "/nonexistent/vmlinux"})
    assert r.returncode == 1 and "FAIL btf: /nonexistent/vmlinux" in r.stdout, r.stdout


# -- privileges ---------------------------------------------------------------------

RUN_CAPS = ",+bpf,+perfmon,+sys_admin"


def with_caps(caps: str) -> tuple[str, ...]:
    """setpriv: uid 0, but only `caps` (bounding, inheritable, ambient)."""
    return ("setpriv", f"--inh-caps=-all{caps}", f"--ambient-caps=-all{caps}",
            f"--bounding-set=-all{caps}")  # fmt: skip


def test_runs_with_exactly_the_documented_caps(pin_dir: str, tmp_path: Path) -> None:
    assert set(host.REQUIRED_CAPS) == {"CAP_BPF", "CAP_PERFMON", "CAP_SYS_ADMIN"}
    assert "CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN" in Path("docs/security.md").read_text()
    tf = tmp_path / "t.prom"
    args = ("run", "--once", "--config", str(toml(tmp_path, DEFAULTS)), "--pin-dir", pin_dir,
            "--textfile", str(tf), "--interval", str(INTERVAL))  # fmt: skip
    r = cli("doctor", prefix=with_caps(RUN_CAPS))
    assert r.returncode == 0, r.stdout
    r = cli(*args, prefix=with_caps(RUN_CAPS))  # load and attach
    assert r.returncode == 0, r.stderr
    r = cli(*args, prefix=with_caps(RUN_CAPS))  # reuse the pins
    assert r.returncode == 0 and series(tf.read_text()), r.stderr

    # pins root-only, the textfile world-readable
    for root, dirs, files in os.walk(pin_dir):
        for n in dirs:
            assert stat.S_IMODE(os.stat(os.path.join(root, n)).st_mode) == 0o700, n
        for n in files:
            st_ = os.stat(os.path.join(root, n))
            assert (stat.S_IMODE(st_.st_mode), st_.st_uid) == (0o600, 0), n
    assert stat.S_IMODE(os.stat(pin_dir).st_mode) == 0o700
    assert stat.S_IMODE(tf.stat().st_mode) == 0o644

    before = disk_state(pin_dir, tf)
    r = cli(*args, prefix=with_caps(",+bpf,+perfmon"))
    assert "missing capabilities CAP_SYS_ADMIN" in one_error_line(r)
    r = cli(*args, prefix=with_caps(""))
    assert "missing capabilities CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN" in one_error_line(r)
    assert disk_state(pin_dir, tf) == before
    r = cli("doctor", prefix=with_caps(""))
    assert r.returncode == 1 and "FAIL capabilities: missing" in r.stdout, r.stdout
    # pins it cannot read without CAP_SYS_ADMIN: a warning, never "another layout"
    r = cli("doctor", "--pin-dir", pin_dir, "--textfile", str(tf),
            prefix=with_caps(",+bpf,+perfmon"))  # fmt: skip
    pins = next(x for x in r.stdout.splitlines() if " pins: " in x)
    assert pins.startswith("warn pins:") and "cannot read" in pins, r.stdout


def test_listen_defaults_to_loopback(pin_dir: str, tmp_path: Path, agents: list[AgentProc]) -> None:
    assert config.Config().listen is None  # no HTTP unless asked
    assert config.parse_listen("9435") == ("127.0.0.1", 9435)
    assert config.parse_listen(":9435") == ("127.0.0.1", 9435)
    assert config.parse_listen("0.0.0.0:9435") == ("0.0.0.0", 9435)
    assert config.parse_listen("[::1]:9435") == ("::1", 9435)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    agents.append(agent := AgentProc(toml(tmp_path, DEFAULTS), pin_dir, tmp_path / "t.prom",
                                     "--listen", f":{port}"))  # fmt: skip
    agent.wait_write()
    wait_until(lambda: listening(port), 10, what="the listener")
    assert listening(port) == ["127.0.0.1"]
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        c.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        assert b"ebpf_telemetry_build_info" in b"".join(iter(lambda: c.recv(65536), b""))
    assert agent.stop() == 0


def listening(port: int) -> list[str]:
    """Local addresses of TCP sockets listening on port (/proc/net/tcp{,6})."""
    out = []
    for f in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(f).read_text().splitlines()[1:]:
            local, st_ = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if st_ == "0A" and int(p, 16) == port:
                raw = bytes.fromhex(addr)
                out.append(
                    socket.inet_ntop(socket.AF_INET, raw[::-1])
                    if len(raw) == 4
                    else socket.inet_ntop(socket.AF_INET6, raw)
                )
    return out


# -- label escaping, end to end ----------------------------------------------------


def test_peer_names_are_escaped(pin_dir: str, tmp_path: Path) -> None:
    name = 'q"uote\\back\nline'
    cfg = toml(tmp_path, '[peers]\n"q\\"uote\\\\back\\nline" = ["192.0.2.0/24"]\n')
    assert config.load(str(cfg)).peers.keys() == {name}
    tf = tmp_path / "t.prom"
    r = cli("run", "--once", "--config", str(cfg), "--pin-dir", pin_dir, "--textfile", str(tf),
            "--interval", str(INTERVAL))  # fmt: skip
    assert r.returncode == 0, r.stderr
    text = tf.read_text()
    assert 'peer="q\\"uote\\\\back\\nline"' in text
    assert value(text, "ebpf_tcp_rtt_seconds_count", peer=name) == 0
    assert all(line.startswith(("#", "ebpf_")) for line in text.splitlines())
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                       text=True, timeout=30)  # fmt: skip
    seed = ("ebpf_rtt_p50_milliseconds", "ebpf_rtt_p99_milliseconds")  # allowed: not base units
    problems = [x for x in (r.stdout + r.stderr).splitlines() if x.strip()]
    assert all(p.startswith(seed) for p in problems), problems
    with pytest.raises(ConfigError, match="without NUL"):
        config.from_mapping({"peers": {"a\0b": ["192.0.2.0/24"]}}, "test")


# -- fuzzing ----------------------------------------------------------------------

KEYS = ["node_name", "interval_seconds", "pin_dir", "textfile", "listen", "sample_rate",
        "max_peers", "debug_trace", "peers", "colour"]  # fmt: skip
TOML_VALUES = st.one_of(
    st.sampled_from(["0", "-1", "1", "5", "1e400", "inf", "nan", "-inf", "0.0", "1e308",
                     "18446744073709551616", "true", "false", '"x"', '""', "[]", "[1]",
                     '["10.0.0.0/8"]', "{}", '{a = "10.0.0.0/8"}', "1979-05-27", '":9"',
                     '"9435"', '"\\u00b2"', '"\\u0000"', '"[::1]:80"', "0x10"]),
    st.integers().map(str),
    st.floats().map(lambda f: repr(f).replace("inf", "inf")),
    st.text(max_size=12).map(lambda t: '"' + t.replace("\\", "\\\\").replace('"', '\\"') + '"'),
)  # fmt: skip


@st.composite
def toml_docs(draw: st.DrawFn) -> str:
    lines = [f"{draw(st.sampled_from(KEYS))} = {draw(TOML_VALUES)}" for _ in range(draw(
        st.integers(0, 4)))]  # fmt: skip
    if draw(st.booleans()):
        lines.append("[peers]")
        for _ in range(draw(st.integers(0, 3))):
            key = draw(st.text(max_size=10)).replace("\\", "\\\\").replace('"', '\\"')
            lines.append(f'"{key}" = {draw(TOML_VALUES)}')
    if draw(st.booleans()):
        lines.insert(draw(st.integers(0, len(lines))), draw(st.text(max_size=30)))
    return "\n".join(lines) + "\n"


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(doc=st.one_of(toml_docs(), st.text(max_size=200)))
def test_fuzz_config_text(tmp_path: Path, doc: str) -> None:
    p = tmp_path / "fuzz.toml"
    p.write_text(doc)
    try:
        cfg = config.load(str(p))
    except ConfigError as e:
        assert "\n" not in str(e)
        return
    if cfg.listen:
        config.parse_listen(cfg.listen)


def _decode_hist(data: bytes, ncpu: int) -> Hist:
    if len(data) != ffi.sizeof("struct hist") * ncpu:
        raise TelemetryError("size")  # what PinnedMap's check refuses before any read
    return Hist.from_percpu(ffi.from_buffer("struct hist[]", data), 0, ncpu)


HIST_BYTES = ffi.sizeof("struct hist")  # sizes from the layout, not from a release


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 4).flatmap(lambda n: st.tuples(st.just(n), st.one_of(
    st.binary(min_size=HIST_BYTES * n, max_size=HIST_BYTES * n),
    st.binary(max_size=HIST_BYTES * 4 + 100)))))  # fmt: skip
def test_fuzz_percpu_decoders(case: tuple[int, bytes]) -> None:
    ncpu, data = case
    try:
        h = _decode_hist(data, ncpu)
    except TelemetryError:
        return
    # the same bytes decoded another way: little-endian u64 words, CPU after CPU
    words = struct.unpack(f"<{MAX_SLOTS * ncpu}Q", data)
    assert h.slots == tuple(sum(words[c * MAX_SLOTS + i] for c in range(ncpu))
                            for i in range(MAX_SLOTS))  # fmt: skip
    q = h.quantile(0.99)
    assert (q is None) == (h.count == 0)
    size = ffi.sizeof("struct node_metrics")
    raw = (data * (size * ncpu // max(len(data), 1) + 1))[: size * ncpu]
    m = NodeMetrics.from_percpu(ffi.from_buffer("struct node_metrics[]", raw), 0, ncpu)
    off = ffi.offsetof("struct node_metrics", "rtt_count")
    assert m.rtt_count == sum(struct.unpack_from("<Q", raw, c * size + off)[0] for c in range(ncpu))
    assert m.since(m) == NodeMetrics(cpu_util=m.cpu_util, timestamp=m.timestamp)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=64), st.binary(min_size=TelemetryEvent.SIZE,
                                                   max_size=TelemetryEvent.SIZE)))  # fmt: skip
def test_fuzz_event_decoder(data: bytes) -> None:
    try:
        e = TelemetryEvent.from_bytes(data)
    except TelemetryError:
        assert len(data) != TelemetryEvent.SIZE
        return
    node, typ, value, ts, extra = struct.unpack("<IIQQI4x", data)
    assert (e.node_id, e.event_type, e.value, e.timestamp, e.extra_data) == (
        node, typ, value, ts, extra)  # fmt: skip
