"""The values of the maps as dataclasses: decoded from the kernel's bytes,
per-CPU copies summed, and the difference of two readings."""

from __future__ import annotations

import functools
import operator
import struct
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Self

from ebpf_telemetry.binding import ffi, lib
from ebpf_telemetry.histogram import MAX_SLOTS, quantile, quantiles
from ebpf_telemetry.layout import LayoutError

_ZEROS = (0,) * MAX_SLOTS


@dataclass(frozen=True)
class Hist:
    """Histogram slots (scheme: histogram.py), summed over CPUs."""

    slots: tuple[int, ...]

    @classmethod
    def empty(cls) -> Self:
        return cls(_ZEROS)

    @classmethod
    def from_percpu(cls, vals: Any, base: int, ncpu: int) -> Self:
        """Sum the ncpu per-CPU copies starting at vals[base] (all-u64 words)."""
        words = memoryview(ffi.buffer(vals)).cast("Q")
        rows = [words[(base + c) * MAX_SLOTS : (base + c + 1) * MAX_SLOTS] for c in range(ncpu)]
        if not any(any(r) for r in rows):
            return cls.empty()
        if ncpu == 1:  # a row all CPUs share
            return cls(tuple(rows[0]))
        return cls(tuple(map(sum, zip(*rows, strict=True))))

    @property
    def count(self) -> int:
        return sum(self.slots)

    def since(self, prev: Hist) -> Hist:
        """The samples added after prev; all of self if a slot went down (maps reset)."""
        if self.slots == prev.slots:  # an idle peer: the common case, at C speed
            return Hist.empty()
        diff = tuple(map(operator.sub, self.slots, prev.slots))
        return self if min(diff) < 0 else Hist(diff)

    def quantile(self, q: float, mean: float | None = None) -> float | None:
        return quantile(self.slots, q, mean)

    def quantiles(self, qs: Sequence[float], mean: float | None = None) -> list[float | None]:
        return quantiles(self.slots, qs, mean)


_NODE_METRICS_WORDS = ffi.sizeof("struct node_metrics") // 8


@functools.cache
def _metric_names() -> tuple[str, ...]:
    return tuple(f.name for f in fields(NodeMetrics))


@functools.cache
def _metric_words() -> dict[str, int]:
    """NodeMetrics field -> its __u64 word in struct node_metrics."""
    return {n: ffi.offsetof("struct node_metrics", n) // 8 for n in _metric_names()}


@dataclass(frozen=True)
class NodeMetrics:
    """struct node_metrics, summed over CPUs (timestamp: the latest; cpu_util:
    the mean over CPUs, basis points of one CPU)."""

    rtt_sum: int = 0
    rtt_count: int = 0
    retrans_count: int = 0
    drop_count: int = 0
    runqlat_sum: int = 0
    runqlat_count: int = 0
    cpu_util: int = 0
    timestamp: int = 0

    LATEST: ClassVar[frozenset[str]] = frozenset({"timestamp", "cpu_util"})

    @classmethod
    def from_percpu(cls, vals: Any, base: int, ncpu: int) -> Self:
        words = memoryview(ffi.buffer(vals)).cast("Q")
        per = _NODE_METRICS_WORDS
        mine = words[base * per : (base + ncpu) * per]
        if not any(mine):
            return cls()
        # column i of the per-CPU rows is the struct's word i (all fields are __u64)
        acc = {
            name: (max if name == "timestamp" else sum)(mine[i::per])
            for name, i in _metric_words().items()
        }
        acc["cpu_util"] //= max(ncpu, 1)
        return cls(**acc)

    def since(self, prev: NodeMetrics) -> NodeMetrics:
        """Counters added after prev; all of self if one went down (maps reset)."""
        if self == prev:  # an idle peer
            return NodeMetrics(**{n: getattr(self, n) for n in self.LATEST})
        names = _metric_names()
        mine, theirs = [getattr(self, n) for n in names], [getattr(prev, n) for n in names]
        if any(a < b for n, a, b in zip(names, mine, theirs, strict=True) if n not in self.LATEST):
            return self
        return NodeMetrics(
            **{
                n: a - (0 if n in self.LATEST else b)
                for n, a, b in zip(names, mine, theirs, strict=True)
            }
        )

    @property
    def rtt_mean(self) -> float | None:
        return self.rtt_sum / self.rtt_count if self.rtt_count else None


EVENT_TYPES = {1: "rtt", 2: "retrans", 3: "drop", 4: "runqlat"}

# struct telemetry_event as struct sees it; checked against the compiled layout
EVENT_RECORD = struct.Struct("=IIQQI4x")
_EVENT_FIELDS = ("node_id", "event_type", "value", "timestamp", "extra_data")
if EVENT_RECORD.size != ffi.sizeof("struct telemetry_event") or [
    ffi.offsetof("struct telemetry_event", f) for f in _EVENT_FIELDS
] != [0, 4, 8, 16, 24]:
    raise LayoutError("struct telemetry_event changed: update EVENT_RECORD in maps.py")


@dataclass(frozen=True)
class TelemetryEvent:
    node_id: int
    event_type: int
    value: int
    timestamp: int
    extra_data: int

    SIZE: ClassVar[int] = ffi.sizeof("struct telemetry_event")

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        if len(data) != cls.SIZE:
            raise LayoutError(f"event of {len(data)} bytes, expected {cls.SIZE}")
        return cls(*EVENT_RECORD.unpack_from(data))

    @property
    def type_name(self) -> str:
        return EVENT_TYPES.get(self.event_type, str(self.event_type))


STATS = {
    "sampled_rtt": lib.STAT_SAMPLED_BASE + lib.EVENT_RTT,
    "sampled_retrans": lib.STAT_SAMPLED_BASE + lib.EVENT_RETRANS,
    "sampled_drop": lib.STAT_SAMPLED_BASE + lib.EVENT_DROP,
    "sampled_runqlat": lib.STAT_SAMPLED_BASE + lib.EVENT_RUNQLAT,
    "events_lost": lib.STAT_EVENTS_LOST,
    "peers_overflow": lib.STAT_PEERS_OVERFLOW,
    "peer_race": lib.STAT_PEER_RACE,
    "peers_expired": lib.STAT_PEERS_EXPIRED,
}
