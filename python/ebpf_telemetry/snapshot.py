"""One reading of every pinned map, and the window between two readings.

Counters only grow in the kernel; "the last interval" is the difference of
two snapshots taken by the agent, never a reset of the maps. The per-node
rows are arrays (noderows.py); the window's per-peer figures come as arrays
too (rtt_counts, retransmits, rtt_quantiles_all), for ranking thousands of
peers without a Python loop over them.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from ebpf_telemetry import cputime, noderows, programs
from ebpf_telemetry.config import RESERVED_PEER
from ebpf_telemetry.cputime import CpuTime
from ebpf_telemetry.histogram import MAX_SLOTS, quantiles_rows
from ebpf_telemetry.maps import Pins
from ebpf_telemetry.noderows import NodeReader
from ebpf_telemetry.nodes import HOST, peer_names
from ebpf_telemetry.values import Hist, NodeMetrics

# a window's histogram rows: u32 where they are a reader's rows read (what
# was added, modulo 2^32: a window adds fewer than 2^32 samples to a slot),
# else u64
Rows = npt.NDArray[np.uint64] | npt.NDArray[np.uint32]


@dataclass(frozen=True)
class Snapshot:
    monotonic: float
    wall: float
    hists: Mapping[int, Hist]  # noderows.HistRows when read from the maps
    metrics: Mapping[int, NodeMetrics]  # noderows.MetricRows when read from the maps
    stats: dict[str, int]
    peers: dict[int, str]  # node id -> peer label (node 0 is not a peer)
    runqlat: Hist
    drops: dict[int, int]  # enum skb_drop_reason value -> count
    cpu: CpuTime
    misses: dict[str, int]  # program -> runs the kernel skipped (recursion_misses)
    seen: Mapping[int, int]  # node id -> last activity, CLOCK_BOOTTIME ns (automatic peers)
    boottime_ns: int  # when read, on the clock of `seen`
    max_peers: int

    def hist(self, node: int) -> Hist:
        return self.hists.get(node) or Hist.empty()

    def node(self, node: int) -> NodeMetrics:
        return self.metrics.get(node) or NodeMetrics()

    def peers_in_use(self) -> int:
        """Peers with an id (the host and `other`, id max_peers + 1, not counted)."""
        other = self.max_peers + 1
        return len(self.peers) - (HOST in self.peers) - (self.peers.get(other) == RESERVED_PEER)

    def metric_array(self) -> npt.NDArray[np.uint64]:
        """Every node's struct node_metrics words, one row per node id."""
        if isinstance(self.metrics, noderows.MetricRows):
            return self.metrics.array
        return _metric_array(self.metrics, max(self.metrics, default=0) + 1)


def _metric_array(metrics: Mapping[int, NodeMetrics], nodes: int) -> npt.NDArray[np.uint64]:
    out = np.zeros((nodes, noderows.WORDS), dtype=np.uint64)
    for node, m in metrics.items():  # snapshots made by hand (tests): a few nodes
        for name, w in noderows.WORD.items():
            out[node, w] = getattr(m, name)
    return out


def take(pins: Pins, reader: NodeReader | None = None) -> Snapshot:
    """Every map, now. With a reader (the agent's), only the histogram rows
    that moved since its previous reading are read: then a Window is cheap
    between consecutive readings of the reader, and a reading's rows of
    other nodes stay readable until the reader reads those nodes again."""
    metrics, hists = reader.take() if reader is not None else noderows.first(pins)
    settings = pins.settings()
    now = time.monotonic_ns()  # CLOCK_MONOTONIC, the clock of bpf_ktime_get_ns()
    return Snapshot(
        monotonic=now / 1e9,
        wall=time.time(),
        hists=hists,
        metrics=metrics,
        stats=pins.stats(),
        peers=peer_names(pins, settings, reader.names if reader is not None else None),
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

    @functools.cached_property
    def _follows(self) -> bool:
        """cur is the reading right after prev by one NodeReader: the window's
        histograms are the rows cur read, less their previous low words."""
        cur = self.cur.hists
        return isinstance(cur, noderows.HistRows) and cur.follows(self.prev.hists)

    @functools.cached_property
    def _added(self) -> npt.NDArray[np.uint32]:
        assert isinstance(self.cur.hists, noderows.HistRows)
        return self.cur.hists.added()  # read-only: handed out as it is (hist_rows)

    def hist(self, node: int) -> Hist:
        h = self._hists.get(node)
        if h is None:
            h = self._hists[node] = self._window_hist(node)
        return h

    def _window_hist(self, node: int) -> Hist:
        if not self._same_owner(node):
            return self.cur.hist(node)
        if node == HOST or not self._follows:
            return self.cur.hist(node).since(self.prev.hist(node))
        assert isinstance(self.cur.hists, noderows.HistRows)
        i = self.cur.hists.position(node)
        if i is None:  # not read: nothing moved
            return Hist.empty()
        if self.cur.node(node).rtt_count < self.prev.node(node).rtt_count:  # maps reset
            return self.cur.hist(node)
        return noderows._hist(self._added[i])

    def node(self, node: int) -> NodeMetrics:
        m = self._nodes.get(node)
        if m is None:
            prev = self.prev.node(node) if self._same_owner(node) else NodeMetrics()
            m = self._nodes[node] = self.cur.node(node).since(prev)
        return m

    # -- every node at once (arrays indexed by node id) -------------------------
    @functools.cached_property
    def owner_changed(self) -> npt.NDArray[np.bool_]:
        """Per node id: did it belong to another peer (or none) at prev?"""
        cur = self.cur.metric_array()
        out = np.zeros(len(cur), dtype=np.bool_)
        a, b = self.prev.peers, self.cur.peers
        if a is not b and a != b:  # the table changed (a reader's is a new dict then)
            for node in a.keys() | b.keys():
                if node < len(out) and a.get(node) != b.get(node):
                    out[node] = True
        return out

    @functools.cached_property
    def deltas(self) -> npt.NDArray[np.uint64]:
        """Per node id, struct node_metrics words added in this window (the
        `latest` words as they stand at cur), as Window.node() computes them."""
        cur = self.cur.metric_array()
        prev = self.prev.metric_array()
        if self.prev.max_peers != self.cur.max_peers:  # another table size: all of cur
            prev = np.zeros_like(cur)
        elif len(prev) != len(cur):  # snapshots made by hand: as many rows as cur
            rows, k = np.zeros_like(cur), min(len(prev), len(cur))
            rows[:k] = prev[:k]
            prev = rows
        counters = np.ones(noderows.WORDS, dtype=np.bool_)
        counters[list(noderows.LATEST)] = False
        out = cur - prev  # modulo 2^64: a counter that went back wraps above cur
        whole = self.owner_changed | (out > cur)[:, counters].any(axis=1)
        if whole.any():  # ids reused or maps reset: all of cur
            out[whole] = cur[whole]
        out[:, ~counters] = cur[:, ~counters]
        return out

    def rtt_counts(self) -> npt.NDArray[np.uint64]:
        """RTT samples in this window, per node id."""
        return self.deltas[:, noderows.RTT_COUNT]

    def retransmits(self) -> npt.NDArray[np.uint64]:
        """Retransmitted segments in this window, per node id."""
        return self.deltas[:, noderows.RETRANS]

    def rtt_quantiles_all(
        self, qs: Sequence[float]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        """The window's RTT quantiles (microseconds) of every peer with RTT
        samples in it: (node ids, one row of len(qs) per id), from the
        window's histogram rows at once (the host is not among them)."""
        counts = self.rtt_counts()
        ids = np.flatnonzero(counts[1:]).astype(np.int64) + 1
        rows = self._window_rows(ids)
        d = self.deltas[ids]
        means = d[:, noderows.RTT_SUM] / np.maximum(d[:, noderows.RTT_COUNT], 1)
        return ids, quantiles_rows(rows, qs, means)

    def moved(self) -> npt.NDArray[np.int64] | None:
        """The node ids whose RTT or retransmit counts (or histogram rows)
        moved in this window, sorted; None: not known without looking at
        every node (snapshots not read one after the other by a reader)."""
        return self._moved

    @functools.cached_property
    def _moved(self) -> npt.NDArray[np.int64] | None:
        cur = self.cur.hists
        if not self._follows or not isinstance(cur, noderows.HistRows):
            return None
        d = self.deltas[:, [noderows.RTT_COUNT, noderows.RTT_SUM, noderows.RETRANS]]
        mask = d.any(axis=1) | self.owner_changed
        mask[cur.ids] = True  # a mask, not np.union1d: no sort (nor numpy.ma's import)
        return np.flatnonzero(mask).astype(np.int64)

    def hist_rows(self, ids: npt.NDArray[np.int64]) -> Rows:
        """The window's histogram slots of ids (not the host), one row each
        (the window's own array when ids are the rows read: not to be written)."""
        return self._window_rows(ids)

    def _window_rows(self, ids: npt.NDArray[np.int64]) -> Rows:
        cur = self.cur.hists
        if not self._follows or not isinstance(cur, noderows.HistRows):
            slots = [self.hist(int(i)).slots for i in ids]  # small tables, by hand
            return np.array(slots, dtype=np.uint64).reshape(len(ids), MAX_SLOTS)
        whole = self.owner_changed[ids] | (
            self.cur.metric_array()[ids, noderows.RTT_COUNT]
            < self.prev.metric_array()[ids, noderows.RTT_COUNT]
        )
        if np.array_equal(ids, cur.ids) and not whole.any():
            return self._added  # the rows read are the ones asked for: no copy
        pos = np.searchsorted(cur.ids, ids)
        pos = np.minimum(pos, max(len(cur.ids) - 1, 0))
        found = (cur.ids[pos] == ids) if len(cur.ids) else np.zeros(len(ids), dtype=np.bool_)
        if found.all() and not whole.any():  # one copy, no temporary
            return self._added[pos]
        rows = np.zeros((len(ids), self._added.shape[1]), dtype=np.uint64)
        rows[found] = self._added[pos[found]]
        for j in np.flatnonzero(whole | ~found):  # ids reused or reset: rare
            rows[j] = self.hist(int(ids[j])).slots
        return rows

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

    def active(self) -> npt.NDArray[np.int64]:
        """Nodes whose counters moved in this window, sorted ids."""
        d = self.deltas
        moved = (d[:, noderows.RTT_COUNT] != 0) | (d[:, noderows.RETRANS] != 0)
        moved |= d[:, noderows.DROPS] != 0
        return np.flatnonzero(moved).astype(np.int64)

    def rtt_quantile_us(self, node: int, q: float) -> float | None:
        return self.rtt_quantiles_us(node, (q,))[0]


__all__ = ["HOST", "Snapshot", "Window", "take"]
