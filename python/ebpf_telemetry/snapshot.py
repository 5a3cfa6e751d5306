"""One reading of every pinned map, and the window between two readings.

Counters only grow in the kernel; "the last interval" is the difference of
two snapshots taken by the agent, never a reset of the maps.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from ebpf_telemetry import cputime, programs
from ebpf_telemetry.cputime import CpuTime
from ebpf_telemetry.maps import Pins
from ebpf_telemetry.nodes import HOST, peer_names
from ebpf_telemetry.values import Hist, NodeMetrics


@dataclass(frozen=True)
class Snapshot:
    monotonic: float
    wall: float
    hists: dict[int, Hist]
    metrics: dict[int, NodeMetrics]
    stats: dict[str, int]
    peers: dict[int, str]  # node id -> peer label (node 0 is not a peer)
    runqlat: Hist
    drops: dict[int, int]  # enum skb_drop_reason value -> count
    cpu: CpuTime
    misses: dict[str, int]  # program -> runs the kernel skipped (recursion_misses)
    seen: dict[int, int]  # node id -> last activity, CLOCK_BOOTTIME ns (automatic peers)
    boottime_ns: int  # when read, on the clock of `seen`
    max_peers: int

    def hist(self, node: int) -> Hist:
        return self.hists.get(node) or Hist.empty()

    def node(self, node: int) -> NodeMetrics:
        return self.metrics.get(node) or NodeMetrics()


def take(pins: Pins) -> Snapshot:
    hists, metrics = pins.node_rows()
    settings = pins.settings()
    now = time.monotonic_ns()  # CLOCK_MONOTONIC, the clock of bpf_ktime_get_ns()
    return Snapshot(
        monotonic=now / 1e9,
        wall=time.time(),
        hists=hists,
        metrics=metrics,
        stats=pins.stats(),
        peers=peer_names(pins, settings),
        runqlat=pins.runqlat_hist(),
        drops=pins.drops(),
        cpu=cputime.read(),
        misses={p.name: p.recursion_misses for p in programs.linked(pins.pin_dir).values()},
        seen=pins.seen(),
        boottime_ns=time.clock_gettime_ns(time.CLOCK_BOOTTIME),
        max_peers=int(settings.max_peers),
    )


@dataclass(frozen=True)
class Window:
    """What happened between two snapshots, per node (each computed once)."""

    prev: Snapshot
    cur: Snapshot
    _hists: dict[int, Hist] = field(default_factory=dict, compare=False, repr=False)
    _nodes: dict[int, NodeMetrics] = field(default_factory=dict, compare=False, repr=False)

    @property
    def seconds(self) -> float:
        return self.cur.monotonic - self.prev.monotonic

    def _same_owner(self, node: int) -> bool:
        """Did node belong to the same peer at both readings? An id that
        changed hands (an expired automatic peer's, reused) starts from 0."""
        return self.prev.peers.get(node) == self.cur.peers.get(node)

    def hist(self, node: int) -> Hist:
        h = self._hists.get(node)
        if h is None:
            prev = self.prev.hist(node) if self._same_owner(node) else Hist.empty()
            h = self._hists[node] = self.cur.hist(node).since(prev)
        return h

    def node(self, node: int) -> NodeMetrics:
        m = self._nodes.get(node)
        if m is None:
            prev = self.prev.node(node) if self._same_owner(node) else NodeMetrics()
            m = self._nodes[node] = self.cur.node(node).since(prev)
        return m

    @property
    def cpu_utilization(self) -> float | None:
        return self.cur.cpu.utilization_since(self.prev.cpu)

    def runqlat_quantile_us(self, q: float) -> float | None:
        h = self.cur.runqlat.since(self.prev.runqlat)
        n = self.node(HOST)
        return h.quantile(q, n.runqlat_sum / n.runqlat_count if n.runqlat_count else None)

    def rtt_quantiles_us(self, node: int, qs: Sequence[float]) -> list[float | None]:
        """Quantiles of the RTT samples of this window, microseconds."""
        return self.hist(node).quantiles(qs, self.node(node).rtt_mean)

    def active(self) -> set[int]:
        """Nodes whose counters moved in this window."""
        return {
            i
            for i in self.cur.metrics
            if (m := self.node(i)).rtt_count or m.retrans_count or m.drop_count
        }

    def rtt_quantile_us(self, node: int, q: float) -> float | None:
        return self.rtt_quantiles_us(node, (q,))[0]


__all__ = ["HOST", "Snapshot", "Window", "take"]
