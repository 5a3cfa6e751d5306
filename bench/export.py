"""3b. Export accuracy and memory, computed (no kernel traffic).

PromQL: `histogram_quantile` interpolates linearly inside the bucket that
holds the rank, between the previous `le` (0 for the first) and its own. For
three RTT shapes, p50/p90/p99 of the exact samples against what PromQL gives
from the buckets each rtt_buckets value exports (the default range), and the
host histogram's (every edge in the range).

Memory: each pinned map's kernel memory from its type, entries and value
size, per-CPU maps times the CPU count, at this machine's CPUs and at 64 and
256, with max_peers 255.
"""

from __future__ import annotations

import os
import random
import statistics
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from ebpf_telemetry.config import Config
from ebpf_telemetry.histogram import EDGE_SCHEMES, edge_slots, slot_lower
from ebpf_telemetry.layout import (
    MAP_HASH,
    MAP_LPM_TRIE,
    MAP_PERCPU_ARRAY,
    MAP_PERCPU_HASH,
    MAPS,
    NODE_MAPS,
)
from ebpf_telemetry.maps import Pins

QUANTILES = (0.5, 0.9, 0.99)
SAMPLES = 20_000


def _lognormal(median_us: float, sigma: float) -> Callable[[random.Random], float]:
    return lambda r: r.lognormvariate(0, sigma) * median_us


def _narrow(r: random.Random) -> float:  # a delay line: 10.4 ms, little jitter
    return r.gauss(10_400, 80)


def _bimodal(r: random.Random) -> float:  # same-rack and cross-region peers together
    return r.lognormvariate(0, 0.2) * (250 if r.random() < 0.7 else 30_000)


SHAPES: dict[str, Callable[[random.Random], float]] = {
    "datacenter lognormal 300 us": _lognormal(300, 0.5),
    "delay line 10.4 ms": _narrow,
    "bimodal 250 us / 30 ms": _bimodal,
}


@dataclass(frozen=True)
class Accuracy:
    buckets: str  # rtt_buckets value, or "host" (every edge)
    edges: int
    mean_err_pct: float  # over shapes x quantiles
    max_err_pct: float


def promql_quantile(q: float, les: Sequence[float], counts: Sequence[int], total: int) -> float:
    """histogram_quantile(q) over cumulative counts at les (+Inf = total)."""
    rank = q * total
    i = bisect_left(counts, rank)
    if i == len(les):  # in +Inf: Prometheus returns the highest finite le
        return les[-1]
    lo, below = (les[i - 1], counts[i - 1]) if i else (0.0, 0)
    inside = counts[i] - below
    return lo + (les[i] - lo) * ((rank - below) / inside if inside else 0.0)


def _errors(les_us: Sequence[int], samples: Sequence[int]) -> list[float]:
    ordered = sorted(samples)
    counts = [bisect_left(ordered, le) for le in les_us]  # values < le: the kernel's count
    out = []
    for q in QUANTILES:
        true = ordered[max(0, int(q * len(ordered)) - 1)]
        got = promql_quantile(q, [float(x) for x in les_us], counts, len(ordered))
        out.append(abs(got - true) / true * 100)
    return out


def accuracy(seed: int = 1) -> list[Accuracy]:
    low, high = Config.rtt_bucket_range_seconds
    r = random.Random(seed)
    shapes = {n: [max(1, int(f(r))) for _ in range(SAMPLES)] for n, f in SHAPES.items()}
    out = []
    for name, scheme in [*((s, s) for s in EDGE_SCHEMES), ("host", "all")]:
        les = [slot_lower(s) for s in edge_slots(scheme, low, high)]
        errs = [e for samples in shapes.values() for e in _errors(les, samples)]
        out.append(Accuracy(name, len(les), statistics.mean(errs), max(errs)))
    return out


@dataclass(frozen=True)
class MapMemory:
    name: str
    per_cpu: bool
    bytes_here: int
    bytes_64: int
    bytes_256: int
    entries: int = 0


def _map_bytes(entries: int, key: int, value: int, map_type: int, ncpu: int) -> int:
    """Values (per CPU where per-CPU, 8-byte aligned), plus keys and a 48-byte
    element header for hashes and tries (arrays store no keys); no allocator slack."""
    v = (value + 7) // 8 * 8
    if map_type in (MAP_PERCPU_ARRAY, MAP_PERCPU_HASH):
        v *= ncpu
    extra = key + 48 if map_type in (MAP_HASH, MAP_PERCPU_HASH, MAP_LPM_TRIE) and key else 0
    return entries * (v + extra)


def memory(pins: Pins, ncpu_here: int) -> list[MapMemory]:
    """Every map of a loaded object with max_peers 255 (the default)."""
    out = []
    names = [n for n in MAPS if os.path.exists(os.path.join(pins.pin_dir, n))]
    for name in sorted(names):
        m = pins[name]
        i = m.info
        if name == "events":  # a ring buffer: its size, once
            size = int(i.max_entries)
            out.append(MapMemory(name, False, size, size, size))
            continue
        args = (int(i.max_entries), int(i.key_size), int(i.value_size), int(i.type))
        out.append(
            MapMemory(
                name,
                m.percpu,
                _map_bytes(*args, ncpu_here),
                _map_bytes(*args, 64),
                _map_bytes(*args, 256),
                int(i.max_entries),
            )
        )
    return out


def memory_at(mem: list[MapMemory], max_peers: int) -> list[MapMemory]:
    """The same maps with max_peers peers: the maps indexed by node id
    (NODE_MAPS) at max_peers + 2 entries, the others as loaded; from each
    map's own key and value size and type (read back from the kernel)."""
    return [_resized(m, max_peers) for m in mem]


def _resized(m: MapMemory, max_peers: int) -> MapMemory:
    if m.name not in NODE_MAPS:
        return m
    entries = max_peers + 2
    return replace(
        m,
        bytes_here=m.bytes_here * entries // m.entries,
        bytes_64=m.bytes_64 * entries // m.entries,
        bytes_256=m.bytes_256 * entries // m.entries,
        entries=entries,
    )
