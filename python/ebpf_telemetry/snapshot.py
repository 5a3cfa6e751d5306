"""One reading of every pinned map, and the window between two readings.

Counters only grow in the kernel; "the last interval" is the difference of
two snapshots taken by the agent, never a reset of the maps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ebpf_telemetry.maps import Hist, NodeMetrics, Pins
from ebpf_telemetry.nodes import HOST, peer_names


@dataclass(frozen=True)
class Snapshot:
    monotonic: float
    wall: float
    hists: dict[int, Hist]
    metrics: dict[int, NodeMetrics]
    stats: dict[str, int]
    peers: dict[int, str]  # node id -> peer label (node 0 is not a peer)

    def hist(self, node: int) -> Hist:
        return self.hists.get(node) or Hist.empty()

    def node(self, node: int) -> NodeMetrics:
        return self.metrics.get(node) or NodeMetrics()


def take(pins: Pins) -> Snapshot:
    hists, metrics = pins.node_rows()
    return Snapshot(
        monotonic=time.monotonic(),
        wall=time.time(),
        hists=hists,
        metrics=metrics,
        stats=pins.stats(),
        peers=peer_names(pins),
    )


@dataclass(frozen=True)
class Window:
    """What happened between two snapshots, per node."""

    prev: Snapshot
    cur: Snapshot

    @property
    def seconds(self) -> float:
        return self.cur.monotonic - self.prev.monotonic

    def hist(self, node: int) -> Hist:
        return self.cur.hist(node).since(self.prev.hist(node))

    def node(self, node: int) -> NodeMetrics:
        return self.cur.node(node).since(self.prev.node(node))

    def rtt_quantile_us(self, node: int, q: float) -> float | None:
        """q-quantile of the RTT samples of this window, microseconds."""
        return self.hist(node).quantile(q, self.node(node).rtt_mean)


__all__ = ["HOST", "Snapshot", "Window", "take"]
