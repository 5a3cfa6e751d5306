"""Pinned maps: open them, check their layout against BTF, read them into dataclasses.

A map is only read after its kernel BTF says its value is the struct we
compiled against (name, size, every member's name and offset), so a stale
pin from another version, or a foreign map at our path, is a clear error
instead of garbage. Per-CPU maps are summed over CPUs here.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Self

from ebpf_telemetry.binding import BpfError, TelemetryError, check, ffi, lib, num_cpus, obj_get
from ebpf_telemetry.histogram import MAX_SLOTS, quantile, quantiles

DEFAULT_PIN_DIR = "/sys/fs/bpf/ebpf_telemetry"

# enum bpf_map_type values used here (uapi linux/bpf.h)
MAP_HASH, MAP_ARRAY, MAP_PERCPU_ARRAY, MAP_LPM_TRIE, MAP_RINGBUF = 1, 2, 6, 11, 27
BTF_KIND_INT, BTF_KIND_STRUCT, BTF_KIND_TYPEDEF = 1, 4, 8
BTF_KIND_VOLATILE, BTF_KIND_CONST, BTF_KIND_RESTRICT = 9, 10, 11


class LayoutError(TelemetryError):
    pass


@dataclass(frozen=True)
class MapSpec:
    name: str
    map_type: int
    key_size: int
    value: str | None  # cffi type of one value; structs are checked against BTF


MAPS: dict[str, MapSpec] = {
    s.name: s
    for s in (
        MapSpec("rtt_hist_map", MAP_PERCPU_ARRAY, 4, "struct hist"),
        MapSpec("node_metrics_map", MAP_PERCPU_ARRAY, 4, "struct node_metrics"),
        MapSpec("runqlat_hist_map", MAP_PERCPU_ARRAY, 4, "struct hist"),
        MapSpec("drop_reasons_map", MAP_PERCPU_ARRAY, 4, "__u64"),
        MapSpec("cpu_time_map", MAP_PERCPU_ARRAY, 4, "struct cpu_time"),
        MapSpec("peer_cidr_map", MAP_LPM_TRIE, ffi.sizeof("struct peer_key"), "__u32"),
        MapSpec("peer_addr_map", MAP_HASH, ffi.sizeof("struct peer_key"), "__u32"),
        MapSpec("peer_info_map", MAP_ARRAY, 4, "struct peer_info"),
        MapSpec("peer_alloc_map", MAP_ARRAY, 4, "struct peer_alloc"),
        MapSpec("settings_map", MAP_ARRAY, 4, "struct settings"),
        MapSpec("stats_map", MAP_PERCPU_ARRAY, 4, "__u64"),
        MapSpec("events", MAP_RINGBUF, 0, None),
    )
}


def _kind(t: Any) -> int:
    return int((t.info >> 24) & 0x1F)


def _vlen(t: Any) -> int:
    return int(t.info & 0xFFFF)


def _strip(btf: Any, type_id: int) -> Any:
    t = lib.btf__type_by_id(btf, type_id)
    while t != ffi.NULL and _kind(t) in (
        BTF_KIND_TYPEDEF,
        BTF_KIND_VOLATILE,
        BTF_KIND_CONST,
        BTF_KIND_RESTRICT,
    ):
        t = lib.btf__type_by_id(btf, t.size)  # .size aliases .type for these kinds
    return t


def check_btf_layout(path: str, info: Any, ctype: str) -> None:
    """The map's BTF value type must be our struct, member for member."""
    if not ctype.startswith("struct "):
        return
    if info.btf_id == 0 or info.btf_value_type_id == 0:
        raise LayoutError(f"{path}: map carries no BTF; not an ebpf-telemetry map")
    btf = lib.btf__load_from_kernel_by_id(info.btf_id)
    if btf == ffi.NULL:
        raise BpfError(f"{path}: cannot load its BTF", ffi.errno)
    try:
        t = _strip(btf, info.btf_value_type_id)
        name = ffi.string(lib.btf__name_by_offset(btf, t.name_off)).decode()
        want = ctype.removeprefix("struct ")
        if _kind(t) != BTF_KIND_STRUCT or name != want:
            raise LayoutError(f"{path}: value is '{name}', expected 'struct {want}'")
        members = ffi.cast("struct btf_member *", t + 1)
        theirs = {
            ffi.string(lib.btf__name_by_offset(btf, members[i].name_off)).decode(): (
                members[i].offset & 0xFFFFFF
            )
            // 8
            for i in range(_vlen(t))
        }
        ours = {f: ffi.offsetof(ctype, f) for f in _struct_fields(ctype)}
        if t.size != ffi.sizeof(ctype) or theirs != ours:
            raise LayoutError(
                f"{path}: struct {want} layout differs from this version's "
                f"({t.size} vs {ffi.sizeof(ctype)} bytes); "
                "run `ebpf-telemetry unload` to replace the old pins"
            )
    finally:
        lib.btf__free(btf)


def _struct_fields(ctype: str) -> list[str]:
    return [name for name, _ in ffi.typeof(ctype).fields]


class PinnedMap:
    """One pinned map, opened and checked against MAPS[name]."""

    def __init__(self, pin_dir: str, name: str) -> None:
        self.spec = MAPS[name]
        self.path = os.path.join(pin_dir, name)
        self.fd = obj_get(self.path)
        try:
            self.info = map_info(self.fd)
            self._check()
        except Exception:
            os.close(self.fd)
            raise
        self.ncpu = num_cpus() if self.percpu else 1

    @property
    def percpu(self) -> bool:
        return self.spec.map_type == MAP_PERCPU_ARRAY

    @property
    def max_entries(self) -> int:
        return int(self.info.max_entries)

    def _check(self) -> None:
        s, i = self.spec, self.info
        vsize = ffi.sizeof(s.value) if s.value else 0
        if i.type != s.map_type or i.key_size != s.key_size or (s.value and i.value_size != vsize):
            raise LayoutError(
                f"{self.path}: map type {i.type}, key {i.key_size} B, value {i.value_size} B; "
                f"expected type {s.map_type}, key {s.key_size} B, value {vsize} B "
                "(pins of another version? `ebpf-telemetry unload` replaces them)"
            )
        if s.value:
            check_btf_layout(self.path, i, s.value)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- element access ------------------------------------------------------
    def _values(self, n: int) -> Any:
        assert self.spec.value
        return ffi.new(f"{self.spec.value}[]", n * self.ncpu)

    def lookup(self, key: Any) -> Any:
        """Value(s) for key: one cdata per CPU for per-CPU maps; None if absent."""
        vals = self._values(1)
        if lib.bpf_map_lookup_elem(self.fd, key, vals) < 0:
            if ffi.errno == 2:
                return None
            raise BpfError(f"lookup in {self.path}", ffi.errno)
        return vals

    def update(self, key: Any, value: Any, flags: int = 0) -> None:
        check(lib.bpf_map_update_elem(self.fd, key, value, flags), f"update of {self.path}")

    def delete(self, key: Any) -> None:
        if lib.bpf_map_delete_elem(self.fd, key) < 0 and ffi.errno != 2:
            raise BpfError(f"delete in {self.path}", ffi.errno)

    def keys(self, ktype: str) -> Iterator[Any]:
        """Every key, each a `ktype *` owning its memory."""
        prev, nxt = ffi.NULL, ffi.new(f"{ktype} *")
        while lib.bpf_map_get_next_key(self.fd, prev, nxt) == 0:
            yield nxt
            prev, nxt = nxt, ffi.new(f"{ktype} *")

    def array_rows(self, count: int | None = None) -> tuple[int, Any]:
        """Every element of an array map, one batch call: (n, values[n*ncpu])."""
        n = count or self.max_entries
        keys = ffi.new("__u32[]", n)
        vals = self._values(n)
        cnt = ffi.new("__u32 *", n)
        batch = ffi.new("__u32 *")
        opts = ffi.new(
            "struct bpf_map_batch_opts *", {"sz": ffi.sizeof("struct bpf_map_batch_opts")}
        )
        ret = lib.bpf_map_lookup_batch(self.fd, ffi.NULL, batch, keys, vals, cnt, opts)
        if ret < 0 and ffi.errno != 2:  # ENOENT: reached the end, cnt is valid
            raise BpfError(f"batch lookup in {self.path}", ffi.errno)
        return int(cnt[0]), vals


def map_info(fd: int) -> Any:
    info = ffi.new("struct bpf_map_info *")
    ln = ffi.new("__u32 *", ffi.sizeof("struct bpf_map_info"))
    check(lib.bpf_obj_get_info_by_fd(fd, info, ln), "map info")
    return info


# -- the values ---------------------------------------------------------------


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
        return cls(tuple(map(sum, zip(*rows, strict=True))))

    @property
    def count(self) -> int:
        return sum(self.slots)

    def since(self, prev: Hist) -> Hist:
        """The samples added after prev; all of self if a slot went down (maps reset)."""
        if self.slots == prev.slots:  # an idle peer: the common case, at C speed
            return Hist.empty()
        diff = tuple(a - b for a, b in zip(self.slots, prev.slots, strict=True))
        return self if min(diff) < 0 else Hist(diff)

    def quantile(self, q: float, mean: float | None = None) -> float | None:
        return quantile(self.slots, q, mean)

    def quantiles(self, qs: Sequence[float], mean: float | None = None) -> list[float | None]:
        return quantiles(self.slots, qs, mean)


_NODE_METRICS_WORDS = ffi.sizeof("struct node_metrics") // 8


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
        if not any(words[base * per : (base + ncpu) * per]):
            return cls()
        acc = dict.fromkeys((f.name for f in fields(cls)), 0)
        for c in range(ncpu):
            v = vals[base + c]
            for name in acc:
                x = getattr(v, name)
                acc[name] = max(acc[name], x) if name == "timestamp" else acc[name] + x
        acc["cpu_util"] //= max(ncpu, 1)
        return cls(**acc)

    def since(self, prev: NodeMetrics) -> NodeMetrics:
        """Counters added after prev; all of self if one went down (maps reset)."""
        if any(
            getattr(self, f.name) < getattr(prev, f.name)
            for f in fields(self)
            if f.name not in self.LATEST
        ):
            return self
        return NodeMetrics(
            **{
                f.name: getattr(self, f.name)
                - (0 if f.name in self.LATEST else getattr(prev, f.name))
                for f in fields(self)
            }
        )

    @property
    def rtt_mean(self) -> float | None:
        return self.rtt_sum / self.rtt_count if self.rtt_count else None


@dataclass(frozen=True)
class CpuTime:
    """CPU time split by the idle task, summed over CPUs, nanoseconds."""

    idle_ns: int = 0
    busy_ns: int = 0

    def utilization_since(self, prev: CpuTime) -> float | None:
        idle, busy = self.idle_ns - prev.idle_ns, self.busy_ns - prev.busy_ns
        if idle < 0 or busy < 0:  # maps reset in between
            idle, busy = self.idle_ns, self.busy_ns
        return busy / (idle + busy) if idle + busy > 0 else None


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
}


class Pins:
    """The pinned maps under one pin dir, opened on first use."""

    def __init__(self, pin_dir: str = DEFAULT_PIN_DIR) -> None:
        self.pin_dir = pin_dir
        self._open: dict[str, PinnedMap] = {}

    def __getitem__(self, name: str) -> PinnedMap:
        m = self._open.get(name)
        if m is None:
            m = self._open[name] = PinnedMap(self.pin_dir, name)
        return m

    def exists(self) -> bool:
        return os.path.exists(os.path.join(self.pin_dir, "settings_map"))

    def close(self) -> None:
        for m in self._open.values():
            m.close()
        self._open.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def settings(self) -> Any:
        """A `struct settings *` that owns its memory (a copy of the map's)."""
        v = self["settings_map"].lookup(ffi.new("__u32 *", 0))
        return ffi.new("struct settings *", v[0] if v is not None else {})

    def counters(self, name: str) -> list[int]:
        """A per-CPU array of __u64, summed over CPUs: one int per index."""
        m = self[name]
        n, vals = m.array_rows()
        return [sum(vals[i * m.ncpu + c] for c in range(m.ncpu)) for i in range(n)]

    def stats(self) -> dict[str, int]:
        per = self.counters("stats_map")
        return {name: per[idx] if idx < len(per) else 0 for name, idx in STATS.items()}

    def drops(self) -> dict[int, int]:
        """drop reason value -> count, reasons seen only."""
        return {r: c for r, c in enumerate(self.counters("drop_reasons_map")) if c}

    def runqlat_hist(self) -> Hist:
        m = self["runqlat_hist_map"]
        _, vals = m.array_rows(1)
        return Hist.from_percpu(vals, 0, m.ncpu)

    def cpu_time(self, now_ns: int) -> CpuTime:
        """Idle and busy ns over all CPUs, the running stretch included up to now_ns."""
        m = self["cpu_time_map"]
        _, vals = m.array_rows(1)
        idle = busy = 0
        for c in range(m.ncpu):
            v = vals[c]
            idle += v.idle_ns
            busy += v.busy_ns
            if v.since and now_ns > v.since:
                if v.idle:
                    idle += now_ns - v.since
                else:
                    busy += now_ns - v.since
        return CpuTime(idle, busy)

    def node_rows(self) -> tuple[dict[int, Hist], dict[int, NodeMetrics]]:
        """Every node's RTT histogram and metrics: two batch look-ups."""
        hm, mm = self["rtt_hist_map"], self["node_metrics_map"]
        n, hvals = hm.array_rows()
        k, mvals = mm.array_rows()
        hists = {i: Hist.from_percpu(hvals, i * hm.ncpu, hm.ncpu) for i in range(n)}
        metrics = {i: NodeMetrics.from_percpu(mvals, i * mm.ncpu, mm.ncpu) for i in range(k)}
        return hists, metrics

    def zero_node(self, node_id: int) -> None:
        """Reset one node's counters (its id is given to another peer)."""
        key = ffi.new("__u32 *", node_id)
        for name in ("rtt_hist_map", "node_metrics_map"):
            m = self[name]
            m.update(key, m._values(1))
