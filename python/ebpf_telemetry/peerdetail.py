"""Per-peer families of the peers the budget exports (budget.py), by peer_detail:

- "histogram": ebpf_tcp_rtt_seconds (buckets at the rtt_buckets edges),
  ebpf_tcp_rtt_window_seconds p50/p90/p99, ebpf_tcp_retransmits_total;
- "quantiles": ebpf_tcp_rtt_window_seconds p50/p99, ebpf_tcp_rtt_samples_total,
  ebpf_tcp_retransmits_total;
- "none": nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client.core import Metric

from ebpf_telemetry import noderows
from ebpf_telemetry.budget import WINDOW_QUANTILES, PeerInput
from ebpf_telemetry.families import US, Buckets, add_histogram, counter, histogram, summary
from ebpf_telemetry.snapshot import Snapshot

Q_LABELS = tuple(f"{q:g}" for q in WINDOW_QUANTILES)
SHOWN = {"histogram": Q_LABELS, "quantiles": ("0.5", "0.99")}  # quantiles per detail


def families(
    detail: str,
    peers: Sequence[PeerInput],
    labels: dict[int, dict[str, str]],
    cur: Snapshot,
    buckets: Buckets,
) -> Iterator[Metric]:
    """The families of detail for peers (labels: node id -> node, peer,
    peer_zone), from the window's new reading `cur` and the peers' window
    quantiles (PeerInput)."""
    if detail not in SHOWN:
        return
    if detail == "histogram":
        hist = histogram("ebpf_tcp_rtt_seconds")
        for p in peers:
            m = cur.node(p.node)
            add_histogram(hist, labels[p.node], buckets, cur.hist(p.node), m.rtt_sum * US)
        yield hist
    rows = cur.metric_array()[[p.node for p in peers]]  # their counters, at once
    if detail != "histogram":
        yield _counter("ebpf_tcp_rtt_samples_total", peers, labels, rows[:, noderows.RTT_COUNT])
    yield _window(peers, labels, SHOWN[detail])
    yield _counter("ebpf_tcp_retransmits_total", peers, labels, rows[:, noderows.RETRANS])


def _counter(
    name: str, peers: Sequence[PeerInput], labels: dict[int, dict[str, str]], counts: Any
) -> Metric:
    """One counter sample per peer, its labels the peer's own dict (shared by
    the peer's samples: the exposition only reads them)."""
    fam = counter(name)
    sample = fam.name + "_total"
    for p, count in zip(peers, counts.tolist(), strict=True):
        fam.add_sample(sample, labels[p.node], count)
    return fam


def _window(
    peers: Sequence[PeerInput], labels: dict[int, dict[str, str]], shown: tuple[str, ...]
) -> Metric:
    window = summary("ebpf_tcp_rtt_window_seconds")
    for p in peers:
        for q_label, v in zip(Q_LABELS, p.quantiles, strict=True):
            if v is not None and q_label in shown:
                window.add_sample(window.name, {**labels[p.node], "quantile": q_label}, v * US)
    return window
