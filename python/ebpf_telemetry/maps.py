"""Pins: the pinned maps under one pin dir, read into values (values.py).

Per-CPU maps are summed over CPUs here; every map is opened through
pinned.py, which checks its layout first.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any, Self

import numpy as np
import numpy.typing as npt

from ebpf_telemetry.binding import ffi, lib
from ebpf_telemetry.pinned import PinnedMap
from ebpf_telemetry.values import STATS, Hist, NodeMetrics

DEFAULT_PIN_DIR = "/sys/fs/bpf/ebpf_telemetry"


class SeenTimes(Mapping[int, int]):
    """peer_seen_map as read: node id -> time, for the ids that have one;
    `array` holds every id's (0: none), for use without a loop over the ids."""

    def __init__(self, array: npt.NDArray[np.uint64]) -> None:
        self.array = array
        self._ids = np.flatnonzero(array)

    def __getitem__(self, node: int) -> int:
        if not 0 <= node < len(self.array) or not self.array[node]:
            raise KeyError(node)
        return int(self.array[node])

    def __iter__(self) -> Iterator[int]:
        return iter(self._ids.tolist())

    def __len__(self) -> int:
        return len(self._ids)


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
        sums: list[int] = self._sums(name).tolist()
        return sums

    def _sums(self, name: str) -> npt.NDArray[np.uint64]:
        m = self[name]
        n, vals = m.array_rows()
        words = np.frombuffer(ffi.buffer(vals), dtype=np.uint64, count=n * m.ncpu)
        sums: npt.NDArray[np.uint64] = words.reshape(n, m.ncpu).sum(axis=1, dtype=np.uint64)
        return sums

    def stats(self) -> dict[str, int]:
        per = self.counters("stats_map")
        return {name: per[idx] if idx < len(per) else 0 for name, idx in STATS.items()}

    def drops(self) -> dict[int, int]:
        """drop reason value -> count, reasons seen only: the core reasons'
        array, then the subsystem reasons' hash (absent from pins an earlier build left)."""
        sums = self._sums("drop_reasons_map")
        seen = np.flatnonzero(sums)  # a few of 1,024 reasons: no loop over the others
        out = dict(zip(seen.tolist(), sums[seen].tolist(), strict=True))
        if os.path.exists(os.path.join(self.pin_dir, "drop_subsys_map")):
            m = self["drop_subsys_map"]
            for key in m.keys("__u32"):
                vals = m.lookup(key)
                if vals is not None:
                    out[int(key[0])] = sum(vals[c] for c in range(m.ncpu))
        return out

    def runqlat_hist(self) -> Hist:
        m = self["runqlat_hist_map"]
        _, vals = m.array_rows(1)
        return Hist.from_percpu(vals, 0, m.ncpu)

    def node_rows(self) -> tuple[Mapping[int, Hist], Mapping[int, NodeMetrics]]:
        """Every node's RTT histogram and metrics, node id -> value (noderows.first)."""
        from ebpf_telemetry import noderows  # noderows reads through Pins

        metrics, hists = noderows.first(self)
        return hists, metrics

    def add_expired(self, n: int) -> None:
        """ebpf_peers_expired_total: stats_map[STAT_PEERS_EXPIRED], a slot no
        program writes (userspace counts into CPU 0's row)."""
        m = self["stats_map"]
        key = ffi.new("__u32 *", lib.STAT_PEERS_EXPIRED)
        row = m.lookup(key)
        row[0] += n
        m.update(key, row)

    def seen(self) -> SeenTimes:
        """node id -> last activity (or retirement), CLOCK_BOOTTIME ns, where known."""
        return SeenTimes(self["peer_seen_map"].mapped().view(np.uint64).copy())

    def zero_node(self, node_id: int) -> None:
        """Reset one node's counters (its id is given to another peer)."""
        key = ffi.new("__u32 *", node_id)
        for name in ("rtt_hist_map", "node_metrics_map"):
            m = self[name]
            m.update(key, m.new_values(1))
