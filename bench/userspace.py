"""3. Userspace: one collection cycle (read all maps, compute, write the
textfile) at 1, 64 and 255 peers; then the agent's RSS and CPU share at the
default interval with traffic to 255 peers."""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import probes
import workload
from prometheus_client import CollectorRegistry, generate_latest

from ebpf_telemetry import exporter
from ebpf_telemetry.config import RESERVED_PEER, Config
from ebpf_telemetry.maps import Pins
from ebpf_telemetry.metrics import TelemetryCollector
from ebpf_telemetry.snapshot import Snapshot, Window, take

CLK_TCK = os.sysconf("SC_CLK_TCK")
PEER_COUNT_RE = re.compile(r'^ebpf_tcp_rtt_seconds_count\{[^}]*peer="([^"]*)"', re.M)


@dataclass(frozen=True)
class CycleResult:
    peers: int  # configured peers in the snapshot (`other` not counted)
    median_ms: float
    p95_ms: float
    read_ms: float  # median of take()
    compute_ms: float  # median of collect + generate_latest (timed apart, after)
    textfile_bytes: int


@dataclass(frozen=True)
class AgentResult:
    seconds: float
    rss_mb: float
    cpu_pct: float  # of one core
    peers_in_textfile: int


def p95(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=20, method="inclusive")[-1]


@dataclass(frozen=True)
class Timing:
    total_ms: float
    read_ms: float
    compute_ms: float
    size: int


def _cycle(
    pins: Pins,
    prev: Snapshot,
    registry: CollectorRegistry,
    collector: TelemetryCollector,
    path: str,
) -> tuple[Timing, Snapshot]:
    """What Agent.cycle does: take, Window, update, generate_latest + atomic write;
    then, untimed in the total, generate_latest alone (the compute share)."""
    t0 = time.perf_counter()
    cur = take(pins)
    t1 = time.perf_counter()
    collector.update(Window(prev, cur), 0.0)
    n = exporter.write_textfile(path, registry)
    t2 = time.perf_counter()
    generate_latest(registry)
    t3 = time.perf_counter()
    return Timing((t2 - t0) * 1000, (t1 - t0) * 1000, (t3 - t2) * 1000, n), cur


def cycles(counts: tuple[int, ...], n: int) -> list[CycleResult]:
    """1, then 64, then 255 configured peers (127.0.0.n/32), each with a
    connection; every peer gets an RTT sample between two cycles (untimed)."""
    out: list[CycleResult] = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        probes.telemetry("cycle") as t,
        workload.peers(1) as conns,
        Pins(t.pins) as pins,
    ):
        collector = TelemetryCollector(Config(node_name="bench"))
        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)
        path = os.path.join(tmp, "ebpf_telemetry.prom")
        for count in counts:
            t.set_peers(count)
            conns.grow(count)
            conns.touch()
            prev = take(pins)
            times: list[Timing] = []
            for _ in range(n):
                conns.touch()
                timing, prev = _cycle(pins, prev, registry, collector, path)
                times.append(timing)
            got = sum(1 for name in take(pins).peers.values() if name != RESERVED_PEER)
            total = [x.total_ms for x in times]
            out.append(
                CycleResult(
                    got,
                    statistics.median(total),
                    p95(total),
                    statistics.median(x.read_ms for x in times),
                    statistics.median(x.compute_ms for x in times),
                    times[-1].size,
                )
            )
    return out


def _proc_sample(pid: int) -> tuple[float, float]:
    """(RSS MB, utime+stime seconds) of a process."""
    with open(f"/proc/{pid}/status") as f:
        rss_kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return rss_kb / 1024, ticks / CLK_TCK


def agent(peer_count: int, seconds: float, warmup: float) -> AgentResult:
    """`python -m ebpf_telemetry run` at the default interval for `seconds`
    after `warmup`, while every peer gets a round trip every 100 ms."""
    with (
        tempfile.TemporaryDirectory() as tmp,
        probes.telemetry("agent") as t,
        workload.peers(peer_count) as conns,
        workload.touching(conns, 0.1),
    ):
        textfile = os.path.join(tmp, "ebpf_telemetry.prom")
        config = os.path.join(tmp, "config.toml")
        with open(config, "w") as f:
            f.write('node_name = "bench"\n' + probes.peers_toml(peer_count))
        argv = [
            sys.executable,
            "-m",
            "ebpf_telemetry",
            "run",
            "--config",
            config,
            "--pin-dir",
            t.pins,
            "--textfile",
            textfile,
        ]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(warmup)
            _, cpu0 = _proc_sample(proc.pid)
            t0 = time.monotonic()
            rss = 0.0
            while time.monotonic() - t0 < seconds:
                time.sleep(1)
                rss = max(rss, _proc_sample(proc.pid)[0])
            _, cpu1 = _proc_sample(proc.pid)
            elapsed = time.monotonic() - t0
        finally:
            proc.terminate()
            proc.wait(10)
        peers = _textfile_peers(textfile)
    return AgentResult(elapsed, rss, 100 * (cpu1 - cpu0) / elapsed, peers)


def _textfile_peers(textfile: str) -> int:
    """Distinct peer labels of ebpf_tcp_rtt_seconds_count in the agent's output."""
    if not os.path.exists(textfile):
        return 0
    with open(textfile) as f:
        return len(set(PEER_COUNT_RE.findall(f.read())))
