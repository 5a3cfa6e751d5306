"""3d. The agent's cycle at 1,024 / 4,096 / 16,384 peers, each count in a
process of its own (its RSS and CPU are the cycle's): every id an automatic
peer with an address (as the kernel writes them) and RTT history in its rows;
before each cycle (untimed) a sixteenth of the peers get new RTT samples and
some retransmits, written into their rows as the programs would.

Timed, as Agent.cycle runs them: read (take with the agent's NodeReader),
table (the peer table's check and expiry step), update (the real
TelemetryCollector.update: zone totals, the series budget's ranking and
choice, with the default export: peer_detail "quantiles", max_series 1,000),
then exporter.write_textfile of the collector's registry in three timed
parts: families (the collector's collect(): its metric families built),
exposition (prometheus_client's generate_latest of those families: the text
format alone) and write (the atomic write).

    bigtable.py N CYCLES [EVERY]   (the child: prints one JSON line; one peer
                                    in EVERY moves, default 16; 1: all of them)
"""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import probes
import tablecheck
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric

from ebpf_telemetry import exporter, loader, noderows, peertable
from ebpf_telemetry.binding import ffi
from ebpf_telemetry.config import Config
from ebpf_telemetry.histogram import MAX_SLOTS
from ebpf_telemetry.maps import Pins
from ebpf_telemetry.metrics import TelemetryCollector
from ebpf_telemetry.snapshot import Snapshot, Window, take

MOVING = 16  # one peer in MOVING gets samples before each cycle
INTERVAL = 5.0  # the default interval: CPU share = CPU per cycle / INTERVAL
PARTS = ("read", "table", "update", "families", "exposition", "write")


@dataclass(frozen=True)
class BigCycle:
    peers: int
    moving: int
    median_ms: float
    p95_ms: float
    parts_ms: dict[str, float]  # medians
    cpu_pct: float  # CPU per cycle over a 5 s interval, % of one core
    rss_mb: float  # the process's peak (VmHWM)
    rss_end_mb: float  # after the cycles (VmRSS)
    rss_base_mb: float  # before the table was filled: interpreter, libraries, BPF objects
    textfile_bytes: int
    samples: int  # in the textfile


class Prebuilt(CollectorRegistry):
    """A registry that yields families built beforehand: generate_latest over
    it is the exposition format alone, timed apart from building them."""

    def __init__(self) -> None:
        super().__init__(auto_describe=False)
        self.families: list[Metric] = []

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def _rows(pins: Pins, ids: np.ndarray, hists: np.ndarray, metrics: np.ndarray) -> None:
    """Write rows as the programs' adds leave them (userspace update, per id)."""
    hm, mm = pins["rtt_hist_map"], pins["node_metrics_map"]
    hists, metrics = np.ascontiguousarray(hists), np.ascontiguousarray(metrics)
    key = ffi.new("__u32 *")
    for j, i in enumerate(ids.tolist()):
        key[0] = i
        hm.update(key, ffi.from_buffer(hists[j]))
        mm.update(key, ffi.from_buffer(metrics[j]))


def _samples(rng: np.random.Generator, k: int, n: int) -> np.ndarray:
    """k rows of n RTT samples each, around 100..2000 us (slots 80..120)."""
    rows = np.zeros((k, MAX_SLOTS), dtype=np.uint64)
    centre = rng.integers(80, 110, size=k)
    for s in range(-4, 5):
        rows[np.arange(k), np.clip(centre + s, 0, MAX_SLOTS - 1)] += np.uint64(n // 9)
    return rows


class Load:
    """The peers' rows: written once, then a sixteenth of them moved before
    each cycle (read, added to, written back: no copy of every row is kept
    here, so the process's RSS is the agent's)."""

    CHUNK = 1024

    def __init__(self, pins: Pins, n: int, every: int = MOVING) -> None:
        self.pins, self.n, self.every = pins, n, every
        self.rng = np.random.default_rng(n)
        self.metrics = np.zeros((n + 1, noderows.WORDS), dtype=np.uint64)
        for a in range(1, n + 1, self.CHUNK):
            ids = np.arange(a, min(a + self.CHUNK, n + 1), dtype=np.int64)
            self._write(ids, _samples(self.rng, len(ids), 90))

    def _write(self, ids: np.ndarray, hists: np.ndarray) -> None:
        self.metrics[ids, noderows.RTT_COUNT] = hists.sum(axis=1)
        self.metrics[ids, noderows.RTT_SUM] = self.metrics[ids, noderows.RTT_COUNT] * 500
        _rows(self.pins, ids, hists, self.metrics[ids])

    def move(self) -> None:
        k = max(self.n // self.every, 1)
        ids = np.sort(self.rng.choice(self.n, size=k, replace=False) + 1).astype(np.int64)
        hists = noderows.lookup_rows(self.pins["rtt_hist_map"], ids)
        hists += _samples(self.rng, k, 18)
        self.metrics[ids[: max(k // 20, 1)], noderows.RETRANS] += np.uint64(3)
        self._write(ids, hists)


class LoadProcess:
    """The Load in a process of its own: it stands in for the programs, whose
    memory is the kernel's, so the measured process holds nothing of it."""

    def __init__(self, pin_dir: str, n: int, every: int) -> None:
        ctx = multiprocessing.get_context("fork")
        self.conn, theirs = ctx.Pipe()
        self.proc = ctx.Process(target=_load_main, args=(pin_dir, n, every, theirs), daemon=True)
        self.proc.start()
        if self.conn.recv() != "ready":
            raise RuntimeError("the load process did not fill the rows")

    def move(self) -> None:
        self.conn.send("move")
        self.conn.recv()

    def close(self) -> None:
        self.conn.send("stop")
        self.proc.join()


def _load_main(pin_dir: str, n: int, every: int, conn: Any) -> None:
    with Pins(pin_dir) as pins:
        load = Load(pins, n, every)
        conn.send("ready")
        while conn.recv() == "move":
            load.move()
            conn.send("moved")


def _timed_cycle(
    pins: Pins,
    reader: noderows.NodeReader,
    cfg: Config,
    checker: peertable.Checker,
    collector: TelemetryCollector,
    registry: CollectorRegistry,
    prev: Snapshot,
    path: str,
) -> tuple[dict[str, float], Snapshot, int, int]:
    t = [time.perf_counter()]
    cur = take(pins, reader)
    t.append(time.perf_counter())
    checker.check(pins, cfg)
    w = Window(prev, cur)
    peertable.expire(pins, cfg, w.active(), cur.seen, peertable.now_ns())
    t.append(time.perf_counter())
    collector.update(w, 0.0)
    t.append(time.perf_counter())
    built = Prebuilt()  # exporter.write_textfile, in three timed parts
    built.families = list(registry.collect())
    t.append(time.perf_counter())
    text = generate_latest(built)
    t.append(time.perf_counter())
    exporter.write_atomic(path, text)
    t.append(time.perf_counter())
    parts = {p: (b - a) * 1e3 for p, a, b in zip(PARTS, t[:-1], t[1:], strict=True)}
    return parts, cur, len(text), sum(len(f.samples) for f in built.families)


def interpreter() -> str:
    """The Python the cycles run on (the children run sys.executable): its
    version, and libpython linked in or shared. pyenv's default build is a
    shared libpython without PGO/LTO, whose text format is ~35 % slower here
    than Debian's python3 (built with both, libpython linked in)."""
    with open("/proc/self/maps") as f:
        shared = any("libpython" in line for line in f)
    kind = "shared" if shared else "linked in"
    return f"{sys.executable} ({sys.version.split()[0]}, libpython {kind})"


def _status(key: str) -> float:
    """A /proc/self/status line's figure, MB."""
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith(key + ":")) / 1024


def child(n: int, cycles: int, every: int = MOVING) -> BigCycle:
    cfg = Config(pin_dir=probes.pin_dir(f"big{n}"), textfile="/dev/null", max_peers=n)
    cfg = replace(cfg, node_name="bench", peer_idle_seconds=3600)
    loader.attach(cfg)
    base = _status("VmRSS")
    try:
        with Pins(cfg.pin_dir) as pins, tempfile.TemporaryDirectory() as tmp:
            tablecheck._fill(pins, n)
            load = LoadProcess(cfg.pin_dir, n, every)
            reader = noderows.NodeReader(pins)
            checker = peertable.Checker()
            collector = TelemetryCollector(cfg)
            registry = CollectorRegistry(auto_describe=False)
            registry.register(collector)
            path = os.path.join(tmp, "ebpf_telemetry.prom")
            prev = take(pins, reader)
            checker.check(pins, cfg)  # the first check drains and refills the pool
            gc.freeze()  # as the agent does after its first reading
            times, cpu, size, samples = [], [], 0, 0
            for _ in range(cycles):
                load.move()
                c0 = time.process_time()
                parts, prev, size, samples = _timed_cycle(
                    pins, reader, cfg, checker, collector, registry, prev, path
                )
                cpu.append(time.process_time() - c0)
                times.append(parts)
            end = _status("VmRSS")
            reader.close()
            load.close()
    finally:
        loader.unload(cfg.pin_dir)
    totals = sorted(sum(p.values()) for p in times)
    hwm = _status("VmHWM")
    return BigCycle(
        n,
        max(n // every, 1),
        statistics.median(totals),
        totals[min(int(len(totals) * 0.95), len(totals) - 1)],
        {p: statistics.median(x[p] for x in times) for p in PARTS},
        100 * statistics.median(cpu) / INTERVAL,
        hwm,
        end,
        base,
        size,
        samples,
    )


def measure(counts: tuple[int, ...], cycles: int, every: int = MOVING) -> list[BigCycle]:
    """The cycle at each count of peers, one peer in `every` moving (1: all)."""
    out = []
    for n in counts:
        r = subprocess.run(
            [sys.executable, os.path.abspath(__file__), str(n), str(cycles), str(every)],
            capture_output=True,
            text=True,
            check=True,
        )
        out.append(BigCycle(**json.loads(r.stdout.strip().splitlines()[-1])))
    return out


if __name__ == "__main__":
    random.seed(0)
    every = int(sys.argv[3]) if len(sys.argv) > 3 else MOVING
    print(json.dumps(asdict(child(int(sys.argv[1]), int(sys.argv[2]), every))))
