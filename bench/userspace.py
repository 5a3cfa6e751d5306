"""3. Userspace: one collection cycle (read all maps, compute, format, write
the textfile) at 1, 64 and 255 peers for each rtt_buckets value; then the
agent's RSS and CPU share at the default interval with traffic to 255 peers."""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import probes
import workload
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from ebpf_telemetry import exporter
from ebpf_telemetry.config import RESERVED_PEER, Config
from ebpf_telemetry.maps import Pins
from ebpf_telemetry.metrics import TelemetryCollector
from ebpf_telemetry.noderows import NodeReader
from ebpf_telemetry.snapshot import Snapshot, Window, take

CLK_TCK = os.sysconf("SC_CLK_TCK")
PEER_COUNT_RE = re.compile(r'^ebpf_tcp_rtt_seconds_count\{[^}]*peer="([^"]*)"', re.M)


@dataclass(frozen=True)
class CycleResult:
    rtt_buckets: str
    peers: int  # configured peers in the snapshot (`other` not counted)
    median_ms: float  # the whole cycle as the agent runs it: read, compute, format, write
    p95_ms: float
    read_ms: float  # medians of each part, timed as the cycle runs
    compute_ms: float  # the window's update and the collector's families (snapshot -> samples)
    format_ms: float  # prometheus_client's generate_latest of those families
    write_ms: float  # the atomic write of the text (fsync, rename)
    textfile_bytes: int
    lines_per_peer: int  # lines one peer adds (histogram, window quantiles, retransmits)


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
    format_ms: float
    write_ms: float
    size: int


class Families(Collector):
    """Families computed beforehand: generate_latest then times formatting only."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def _cycle(
    pins: Pins,
    reader: NodeReader,
    prev: Snapshot,
    collector: TelemetryCollector,
    path: str,
) -> tuple[Timing, Snapshot]:
    """What Agent.cycle does, each part timed as it runs (the parts sum to
    the whole): take with the agent's NodeReader (only the histogram rows
    that moved), the Window's update and the collector's families (compute),
    prometheus_client's generate_latest of them (format), the atomic write."""
    t0 = time.perf_counter()
    cur = take(pins, reader)
    t1 = time.perf_counter()
    collector.update(Window(prev, cur), 0.0)
    fixed = CollectorRegistry(auto_describe=False)
    fixed.register(Families(list(collector.collect())))
    t2 = time.perf_counter()
    text = generate_latest(fixed)
    t3 = time.perf_counter()
    exporter.write_atomic(path, text)
    t4 = time.perf_counter()
    read, compute, fmt, write = (
        (b - a) * 1000 for a, b in ((t0, t1), (t1, t2), (t2, t3), (t3, t4))
    )
    return Timing((t4 - t0) * 1000, read, compute, fmt, write, len(text)), cur


def _lines_per_peer(path: str, peer: str) -> int:
    with open(path) as f:
        return sum(1 for line in f if f'peer="{peer}"' in line)


def cycles(counts: tuple[int, ...], n: int, schemes: tuple[str, ...]) -> list[CycleResult]:
    """1, then 64, then 255 configured peers (127.0.0.n/32), each with a
    connection; every peer gets an RTT sample between two cycles (untimed);
    at each count, each rtt_buckets value."""
    out: list[CycleResult] = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        probes.telemetry("cycle") as t,
        workload.peers(1) as conns,
        Pins(t.pins) as pins,
    ):
        # today's full export (every peer's histogram), as the figures before the budget
        cfg = Config(node_name="bench", peer_detail="histogram", max_series=10_000_000)
        collector = TelemetryCollector(cfg)
        reader = NodeReader(pins)  # the agent's: each reading follows the one before
        path = os.path.join(tmp, "ebpf_telemetry.prom")
        for count in counts:
            t.set_peers(count)
            conns.grow(count)
            conns.touch()
            for scheme in schemes:
                collector.configure(replace(cfg, rtt_buckets=scheme))
                prev = take(pins, reader)
                times: list[Timing] = []
                for _ in range(n):
                    conns.touch()
                    timing, prev = _cycle(pins, reader, prev, collector, path)
                    times.append(timing)
                got = sum(1 for name in take(pins).peers.values() if name != RESERVED_PEER)
                total = [x.total_ms for x in times]
                out.append(
                    CycleResult(
                        scheme,
                        got,
                        statistics.median(total),
                        p95(total),
                        statistics.median(x.read_ms for x in times),
                        statistics.median(x.compute_ms for x in times),
                        statistics.median(x.format_ms for x in times),
                        statistics.median(x.write_ms for x in times),
                        times[-1].size,
                        _lines_per_peer(path, "lo1"),
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
            f.write(
                'node_name = "bench"\npeer_detail = "histogram"\nmax_series = 10000000\n'
                + probes.peers_toml(peer_count)
            )
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
