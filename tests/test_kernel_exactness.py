"""Exact counts under concurrency (issue 19, item 3): many flows on every CPU
at once, and what plain per-CPU adds counted (the host's row of
host_metrics_map, the host histograms, the drop reasons) against exact
references: the atomic per-peer rows of node_metrics_map, the namespace's
SNMP counters and the round trips made.

Why it could fail: on PREEMPT_RT the kernel runs BPF programs with migration
disabled, not preemption, so two programs can interleave on one CPU; a plain
`+=` to a slot two programs share would lose updates there. Each plain slot
has one writing program, and the kernel never runs a program nested in
itself on one CPU (it skips the run and counts it in recursion_misses): the
counts must then be equal, misses aside. The matrix runs this on 6.12-rt
(tier `rt`); `make test` on the host.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from typing import Any

import pytest

from agentlab import attach
from ebpf_telemetry.maps import Pins
from ebpf_telemetry.snapshot import HOST, Snapshot, Window, take
from netlab import (
    Netns,
    TcpEchoServer,
    net_counter,
    run_in_netns,
    tcp_pingpong_many,
    veth_pair,
    wait_until,
)

FLOWS = 8  # connections per CPU
ROUND_TRIPS = 100  # per connection
DATAGRAMS = 400  # per CPU, to a port nothing listens on


def on_every_cpu(work: Callable[[], None]) -> None:
    """work() in one thread per CPU, each pinned to its CPU (the threads it
    starts inherit that), all at once."""

    def pinned(cpu: int) -> None:
        os.sched_setaffinity(0, {cpu})  # this thread only
        work()

    threads = [threading.Thread(target=pinned, args=(c,)) for c in sorted(os.sched_getaffinity(0))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def settled(pins: Pins) -> Snapshot:
    """A reading no segment, drop or switch changed while it was taken: the
    next one has the same host counts (the maps are read one by one)."""
    key = lambda s: (  # noqa: E731
        s.node(HOST).rtt_count,
        s.hist(HOST).count,
        s.node(HOST).drop_count,
        sum(s.drops.values()),
    )
    last = [take(pins)]

    def same() -> bool:
        cur = take(pins)
        prev, last[0] = last[0], cur
        return key(prev) == key(cur)

    wait_until(same, 30)
    return last[0]


def peers_rtt(s: Snapshot) -> tuple[int, int]:
    """rtt_count summed over every peer's shared row (atomic adds), and the
    same peers' histogram counts."""
    ids = [i for i in s.peers if i != HOST]
    return sum(s.node(i).rtt_count for i in ids), sum(s.hist(i).count for i in ids)


@pytest.mark.rt
def test_per_cpu_counts_are_exact_under_flows_on_every_cpu(make_config: Any) -> None:
    ncpu = len(os.sched_getaffinity(0))
    with Netns("a") as a, Netns("b") as b:
        veth = veth_pair(a, b, v6=None)
        # automatic peers: every address the machine talks TCP to has a row,
        # so the host's samples are the sum of the peers' at any quiet moment
        with attach(make_config()) as pins, TcpEchoServer(b, veth.v4_b) as srv:
            before = settled(pins)
            noports = net_counter(b, "Udp:NoPorts")
            made: list[int] = []

            def flows() -> None:
                res = tcp_pingpong_many(a, [(veth.v4_b, srv.port)] * FLOWS, ROUND_TRIPS)
                made.extend(r.exchanges for r in res)

            def datagrams() -> None:
                def send() -> None:
                    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                        for _ in range(DATAGRAMS):
                            s.sendto(b"x", (veth.v4_b, 9))

                run_in_netns(a, send)

            def both() -> None:
                t = threading.Thread(target=datagrams)
                t.start()
                flows()
                t.join()

            on_every_cpu(both)
            noports = net_counter(b, "Udp:NoPorts") - noports
            after = settled(pins)
    w = Window(before, after)
    host = w.node(HOST)
    (count1, hist1), (count0, hist0) = peers_rtt(after), peers_rtt(before)
    peers_count, peers_hist = count1 - count0, hist1 - hist0
    trips = sum(made)
    reasons = sum(w.cur.drops.values()) - sum(w.prev.drops.values())
    misses = sum(after.misses.values()) - sum(before.misses.values())
    print(
        f"\n{ncpu} CPUs x {FLOWS} flows x {ROUND_TRIPS} round trips = {trips}; rtt samples: "
        f"host row {host.rtt_count}, host hist {w.hist(HOST).count}, peers' rows {peers_count} "
        f"(hist {peers_hist}); drops: host row {host.drop_count}, reasons {reasons}, "
        f"Udp:NoPorts {noports} of {ncpu * DATAGRAMS} sent; runqlat: host row "
        f"{host.runqlat_count}, hist {after.runqlat.count - before.runqlat.count}; "
        f"recursion misses {misses}"
    )
    assert trips == ncpu * FLOWS * ROUND_TRIPS
    # each round trip is one sample at each end (client and server socket)
    assert peers_count >= 2 * trips - 4 * ncpu * FLOWS
    assert host.rtt_count == w.hist(HOST).count == peers_count == peers_hist
    # a drop the agent missed for recursion is in neither; none was seen
    assert noports == ncpu * DATAGRAMS
    assert host.drop_count == reasons >= noports
    # runqlat's row and histogram cannot be read at one quiet moment (the
    # reading itself switches tasks); its exact reference is schedstat:
    # test_runqueue_latency_equals_schedstat, smoke on every kernel
