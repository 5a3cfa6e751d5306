"""The series budget: which peers get per-peer series in this interval.

`max_series` bounds the samples of an export (textfile and /metrics). The
host, zone and agent families are always exported: they hold every total
(each RTT sample, retransmit and drop). What they leave is shared out to the
peers, `samples_per_peer(peer_detail)` each, worst first: most retransmits in
the interval, then the highest p99 over the interval, then the label (so the
choice is stable among equals; peers idle in the interval come last).

Hysteresis: a peer that ranks among those that fit is (re)given a hold of
`peer_detail_hold_intervals`. A peer in the exported set that no longer ranks
in stays while its hold lasts (one interval less each time) and it still has
traffic (RTT samples or retransmits in the interval); an idle peer gives its
slot up at once. So a peer leaves the set only after `hold` intervals in a
row outranked (or idle), and its series do not come and go each scrape. The
price: a newly bad peer waits for a slot while every slot is held, at most
`hold` intervals.

Pure: no kernel, no prometheus_client. The collector (metrics.py) owns one
Budget; peer_inputs() is the one place the per-peer inputs are computed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import structlog

from ebpf_telemetry.snapshot import Window

log = structlog.get_logger("budget")

WINDOW_QUANTILES = (0.5, 0.9, 0.99)


@dataclass(frozen=True)
class PeerInput:
    """One peer's interval, as the ranking sees it."""

    node: int  # its id in the kernel's maps
    label: str  # its `peer` label (stable across id reuse)
    retrans: int  # segments retransmitted in the interval
    quantiles: tuple[float | None, ...]  # p50, p90, p99 (WINDOW_QUANTILES) of the interval, us

    @property
    def p99(self) -> float | None:
        return self.quantiles[-1]

    @property
    def active(self) -> bool:
        """Traffic in the interval: RTT samples (then p50 exists) or retransmits."""
        return self.retrans > 0 or self.quantiles[0] is not None


def peer_inputs(w: Window, peers: Iterable[tuple[int, str]]) -> list[PeerInput]:
    """Every candidate's interval: retransmits and the RTT quantiles (computed
    once here; the export reuses them). The only per-peer loop over the window."""
    return [
        PeerInput(
            node,
            label,
            w.node(node).retrans_count,
            tuple(w.rtt_quantiles_us(node, WINDOW_QUANTILES)),
        )
        for node, label in peers
    ]


def samples_per_peer(detail: str, peer_les: int) -> int:
    """Samples one exported peer can take (the most: quantiles are absent in an
    interval without samples). peer_les: the `le` edges of ebpf_tcp_rtt_seconds."""
    if detail == "histogram":  # buckets, +Inf, _count, _sum; p50/p90/p99; retransmits
        return peer_les + 3 + len(WINDOW_QUANTILES) + 1
    if detail == "quantiles":  # p50, p99; RTT sample count; retransmits
        return 2 + 1 + 1
    return 0


def room(max_series: int, always: int, per_peer: int) -> int:
    """How many peers fit beside the always-exported samples."""
    if per_peer <= 0:
        return 0
    return max(0, (max_series - always) // per_peer)


def rank_key(p: PeerInput) -> tuple[int, float, str]:
    """Worst first: retransmits, then p99 (none: last), then the label."""
    p99 = p.p99
    return (-p.retrans, -p99 if p99 is not None else math.inf, p.label)


@dataclass(frozen=True)
class Choice:
    exported: list[PeerInput]  # by node id
    folded: int  # candidates left out


class Budget:
    """The exported set across intervals: each peer's hold, and whether the
    budget is folding peers (logged when that starts and when it stops)."""

    def __init__(self, hold: int, detail: str) -> None:
        self.hold, self.detail = hold, detail
        self.held: dict[str, int] = {}  # exported peer label -> intervals of hold left
        self.folding = False

    def configure(self, hold: int, detail: str) -> None:
        if detail != self.detail:  # another kind of series: the set starts over
            self.held.clear()
        self.hold, self.detail = hold, detail

    def choose(self, inputs: Sequence[PeerInput], fit: int) -> Choice:
        """The peers to export this interval (at most fit), and updates the holds."""
        ranked = sorted(inputs, key=rank_key)
        ranks_in = {p.label for p in ranked[:fit]}
        kept = [p for p in ranked if p.active and self.held.get(p.label, 0) > 0][:fit]
        kept_labels = {p.label for p in kept}
        rest = [p for p in ranked if p.label not in kept_labels][: fit - len(kept)]
        chosen = kept + rest
        self.held = {
            p.label: self.hold if p.label in ranks_in else self.held[p.label] - 1 for p in chosen
        }
        folded = len(inputs) - len(chosen)
        self._note(folded, len(chosen), fit)
        return Choice(sorted(chosen, key=lambda p: p.node), folded)

    def _note(self, folded: int, exported: int, fit: int) -> None:
        folding = folded > 0 and self.detail != "none"
        if folding and not self.folding:
            log.warning(
                "more peers than max_series fits: per-peer series for the worst only, "
                "the rest counted in the host and zone families",
                exported=exported,
                folded=folded,
                fit=fit,
            )
        elif self.folding and not folding:
            log.info("every peer fits in max_series again: folding stopped", exported=exported)
        self.folding = folding
