"""Zone totals: RTT histogram and retransmits of this node towards each peer
zone (`ebpf_zone_tcp_rtt_seconds`, `ebpf_zone_tcp_retransmits_total`).

Every sample counts in exactly one zone. The kernel counts each RTT sample
and retransmit in node 0 (rtt_host_hist_map, host_metrics_map) and, if the
socket has a peer id, in that peer's row: node 0 holds everything, the peer
rows a part. A zone is the sum of the rows of its peers; peer_zone="" (the
EMPTY_ZONE) is node 0 minus the zoned peers: peers without a zone, `other`,
and what no peer row holds. So the zones sum to the host exactly.

The totals are the agent's own counters: at the first interval the zones
start from the maps as they are (what came before goes to the peers' zones
of now), then each interval adds its differences. A peer id that expires
and is reused, or a peer that moves to another zone, moves no count that was
made before: counters never go down. Reads are not atomic: in the rare
interval where the zoned peers' rows grew by more than node 0's in some
bucket (a sample between the two reads), peer_zone="" takes 0 there and the
excess is held back from it in the next intervals (`debt`), so the sum is
exact again as soon as it is paid, an interval later.

More zones than max_series leaves room for (metrics.py works it out each
interval): the zones with the fewest RTT samples are shown within
peer_zone="" (shown(): the export's sum stays the host's; that "" series
jumps up when it starts and down, a counter reset, when it stops).

Exported always, also with no zone known (then one series {zone="",
peer_zone=""} equal to the host): it is where the host's retransmit total
is, whatever the per-peer budget leaves out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
from prometheus_client.core import Metric

from ebpf_telemetry import noderows
from ebpf_telemetry.families import US, Buckets, add_histogram, counter, histogram
from ebpf_telemetry.histogram import MAX_SLOTS
from ebpf_telemetry.snapshot import HOST, Window
from ebpf_telemetry.values import Hist, NodeMetrics

EMPTY_ZONE = ""  # peer_zone of the samples of no zone


@dataclass
class Totals:
    """One zone's counts: RTT histogram slots, RTT sum (us), retransmits."""

    slots: list[int] = field(default_factory=list)
    rtt_sum: int = 0
    retrans: int = 0

    def add(self, h: Hist, m: NodeMetrics) -> None:
        if not self.slots:
            self.slots = [0] * len(h.slots)
        if h.count:
            self.slots = [a + b for a, b in zip(self.slots, h.slots, strict=True)]
        self.rtt_sum += m.rtt_sum
        self.retrans += m.retrans_count

    def hist(self) -> Hist:
        return Hist(tuple(self.slots)) if self.slots else Hist.empty()


def _minus(have: int, take: int) -> tuple[int, int]:
    """have - take, never below 0: (the rest, what is still owed)."""
    return (have - take, 0) if have >= take else (0, take - have)


class ZoneTotals:
    """The zones' counters across intervals (owned by the collector)."""

    def __init__(self) -> None:
        self.zones: dict[str, Totals] = {EMPTY_ZONE: Totals()}
        self.debt = Totals()  # counted in zoned peers beyond node 0's growth: owed by ""
        self.started = False

    def add(self, w: Window, zone_of: Mapping[int, str]) -> None:
        """One interval (the whole maps at the first): zone_of maps node id ->
        peer zone ("" none) for the ids of w.cur (after the first interval
        the ids of w.moved() are enough, when known)."""
        hist: Callable[[int], Hist] = w.hist if self.started else w.cur.hist
        node: Callable[[int], NodeMetrics] = w.node if self.started else w.cur.node
        zoned = Totals()
        if self.started and w.moved() is not None:
            self._add_rows(w, zone_of, zoned)
            zone_of = {}
        self.started = True
        for i, zone in zone_of.items():
            if i == HOST or zone == EMPTY_ZONE:
                continue
            h, m = hist(i), node(i)
            if h.count or m.rtt_sum or m.retrans_count:
                self.zones.setdefault(zone, Totals()).add(h, m)
                zoned.add(h, m)
        self._rest(hist(HOST), node(HOST), zoned)

    def _add_rows(self, w: Window, zone_of: Mapping[int, str], zoned: Totals) -> None:
        """add() of an interval from the window's arrays: each zone's rows
        summed at once (np.add.at over a zone index), no loop over peers."""
        pairs = [(i, z) for i, z in zone_of.items() if i != HOST and z != EMPTY_ZONE]
        if not pairs:
            return
        ids = np.array([i for i, _ in pairs], dtype=np.int64)
        names = sorted({z for _, z in pairs})
        index = np.array([names.index(z) for _, z in pairs], dtype=np.int64)
        rows = np.zeros((len(names), MAX_SLOTS), dtype=np.uint64)
        np.add.at(rows, index, w.hist_rows(ids))
        d = w.deltas[ids]
        words = np.zeros((len(names), 2), dtype=np.uint64)
        np.add.at(words, index, d[:, [noderows.RTT_SUM, noderows.RETRANS]])
        for j, zone in enumerate(names):
            h = Hist(tuple(rows[j].tolist()))
            m = NodeMetrics(rtt_sum=int(words[j, 0]), retrans_count=int(words[j, 1]))
            if h.count or m.rtt_sum or m.retrans_count:
                self.zones.setdefault(zone, Totals()).add(h, m)
                zoned.add(h, m)

    def _rest(self, host: Hist, hm: NodeMetrics, zoned: Totals) -> None:
        """peer_zone="" gets node 0's interval less the zoned peers' (and the debt)."""
        have = np.array(host.slots, dtype=np.uint64)  # slot by slot as _minus, at once
        owed = np.zeros(len(have), dtype=np.uint64)
        for owing in (zoned.slots, self.debt.slots):
            if owing:
                owed += np.array(owing, dtype=np.uint64)
        paid = np.minimum(have, owed)
        rtt_sum, sum_debt = _minus(hm.rtt_sum, zoned.rtt_sum + self.debt.rtt_sum)
        retrans, retrans_debt = _minus(hm.retrans_count, zoned.retrans + self.debt.retrans)
        self.debt = Totals((owed - paid).tolist(), sum_debt, retrans_debt)
        rest = NodeMetrics(rtt_sum=rtt_sum, retrans_count=retrans)
        self.zones[EMPTY_ZONE].add(Hist(tuple((have - paid).tolist())), rest)

    def shown(self, most: int) -> dict[str, Totals]:
        """At most `most` zones (at least peer_zone=""): when more zones than
        max_series leaves room for, those with the fewest RTT samples are shown
        within peer_zone="" (the sum stays the host's)."""
        if len(self.zones) <= most:
            return self.zones
        named = sorted((z for z in self.zones if z != EMPTY_ZONE), key=self._size, reverse=True)
        kept = named[: max(0, most - 1)]
        rest = Totals()
        for z in [EMPTY_ZONE, *named[len(kept) :]]:
            t = self.zones[z]
            rest.add(t.hist(), NodeMetrics(rtt_sum=t.rtt_sum, retrans_count=t.retrans))
        return {EMPTY_ZONE: rest, **{z: self.zones[z] for z in kept}}

    def _size(self, zone: str) -> tuple[int, str]:
        return (self.zones[zone].hist().count, zone)

    def families(
        self, node_name: str, own_zone: str, buckets: Buckets, most: int | None = None
    ) -> Iterator[Metric]:
        rtt = histogram("ebpf_zone_tcp_rtt_seconds")
        retrans = counter("ebpf_zone_tcp_retransmits_total")
        zones = self.zones if most is None else self.shown(most)
        for zone, t in sorted(zones.items()):
            labels = {"node": node_name, "zone": own_zone, "peer_zone": zone}
            add_histogram(rtt, labels, buckets, t.hist(), t.rtt_sum * US)
            retrans.add_metric([node_name, own_zone, zone], t.retrans)
        yield rtt
        yield retrans

    @staticmethod
    def samples_per_zone(buckets: Buckets) -> int:
        """Samples families() makes per zone: buckets, +Inf, count, sum; retransmits."""
        return len(buckets.les) + 4
