"""The fleet simulation's model (bench/fleet.py) without Prometheus: its
synthetic snapshots advance and sum to the host, its truth is the known
distribution, and a renamed copy of a node's exposition is what that node's
own collector renders. The simulation itself runs in `make bench` (bench-fleet)."""

from __future__ import annotations

import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))

import fleet

from ebpf_telemetry.snapshot import HOST, Window


def test_counters_advance_and_peers_sum_to_the_host() -> None:
    node = fleet.make_node(7, 60)
    s1, s2 = fleet.synthetic_snapshot(node, 1), fleet.synthetic_snapshot(node, 2)
    w = Window(s1, s2)
    assert w.node(HOST).rtt_count > 0
    assert all(w.hist(i).count > 0 for i in s2.peers)
    host = s2.hist(HOST).slots
    assert list(host) == [sum(s2.hist(i).slots[s] for i in s2.peers) for s in range(len(host))]
    assert s2.node(HOST).retrans_count == sum(s2.node(i).retrans_count for i in s2.peers)


def test_worst_peers_are_the_retransmitting_and_the_slow() -> None:
    node = fleet.make_node(3, 1000)
    worst = [p for p in node.peers if p.name in node.worst]
    assert len(worst) == fleet.RETRANS_PER_NODE + fleet.SLOW_PER_NODE
    w = Window(fleet.synthetic_snapshot(node, 1), fleet.synthetic_snapshot(node, 2))
    p99 = {p.name: w.rtt_quantile_us(i, 0.99) or 0.0 for i, p in enumerate(node.peers, 1)}
    slowest_normal = max(v for name, v in p99.items() if name not in node.worst)
    assert all(p99[p.name] > slowest_normal for p in worst if p.slow)


def test_truth_of_one_peer_is_its_lognormal_p99() -> None:
    node = fleet.make_node(0, 1)  # one peer, in its own zone
    ((pair, p99),) = fleet.truth_p99([node]).items()
    expected = node.peers[0].median_us * math.exp(2.3263478740 * fleet.SIGMA) * 1e-6
    assert pair == (node.zone, node.peers[0].zone)
    assert abs(p99 - expected) / expected < 1e-6


def test_a_renamed_copy_is_what_its_own_collector_renders() -> None:
    a, b = fleet.make_node(1, 60), fleet.make_node(1 + fleet.TEMPLATES, 60)
    ea = fleet.NodeExport(a, fleet.node_config(a, "quantiles", None))
    eb = fleet.NodeExport(b, fleet.node_config(b, "quantiles", None))
    for k in (1, 2, 3):
        ta, tb = ea.render(k), eb.render(k)

    def stable(t: bytes) -> list[bytes]:
        return [x for x in t.splitlines() if not x.startswith(fleet.VOLATILE)]

    assert stable(fleet.renamed(ta, a, b)) == stable(tb)
    assert stable(ta) != stable(tb)
