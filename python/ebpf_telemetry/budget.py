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
Budget. candidates() computes the inputs from the window's arrays at once
(numpy, no Python loop over every peer: 16,384 of them fit): the ranking
keys of every peer, then PeerInputs only for those the choice can take (the
best `fit`, ties broken by label, and the held ones with traffic); idle peers are listed
only when fewer than `fit` have traffic. peer_inputs() is the scalar
definition (one peer at a time), kept for tests and small tables.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import structlog

from ebpf_telemetry.config import RESERVED_PEER
from ebpf_telemetry.snapshot import HOST, Window

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


@dataclass(frozen=True)
class Candidates:
    """The peers that may get series: `inputs` (peers with traffic, at least
    every one the choice can take), idle(n) the first n idle peers by label
    (they rank last, by label), `total` every candidate."""

    inputs: list[PeerInput]
    idle: Callable[[int], list[PeerInput]]
    total: int

    @staticmethod
    def of(inputs: Sequence[PeerInput]) -> Candidates:
        idle = sorted((p for p in inputs if not p.active), key=lambda p: p.label)
        return Candidates([p for p in inputs if p.active], lambda n: idle[:n], len(inputs))


def _idle(node: int, label: str) -> PeerInput:
    return PeerInput(node, label, 0, (None,) * len(WINDOW_QUANTILES))


def candidates(
    w: Window,
    peers: Mapping[int, str],
    fit: int,
    held: Mapping[str, int],
    table: PeerIds | None = None,
) -> Candidates:
    """peer_inputs() of the peers (node id -> label: the host and an `other`
    that never counted are no candidates) from the window's arrays, as
    Budget.choose() needs them with `fit` places and `held` (label -> node id
    of the peers holding a place); table: the peers' ids kept across calls."""
    ids = _candidate_ids(w, peers, table or PeerIds())
    counted = w.retransmits()
    retrans = np.zeros(len(ids), dtype=np.int64)
    inside = ids < len(counted)  # ids past the rows: never counted
    retrans[inside] = counted[ids[inside]]
    quant = np.full((len(ids), len(WINDOW_QUANTILES)), np.nan)
    q_ids, q = w.rtt_quantiles_all(WINDOW_QUANTILES)
    pos = np.searchsorted(q_ids, ids)
    pos = np.minimum(pos, max(len(q_ids) - 1, 0))
    found = q_ids[pos] == ids if len(q_ids) else np.zeros(len(ids), dtype=np.bool_)
    quant[found] = q[pos[found]]
    active = (retrans > 0) | ~np.isnan(quant[:, 0])
    best = _best(retrans, quant[:, -1], active, fit, lambda j: peers[int(ids[j])])
    take = best | _held(ids, peers, held, active)
    q_take = quant[take]
    inputs = [
        PeerInput(i, peers[i], r, tuple([None if v != v else v for v in qs]) if gap else tuple(qs))
        for i, r, qs, gap in zip(  # gap: a NaN among qs (v != v), None in PeerInput
            ids[take].tolist(),
            retrans[take].tolist(),
            q_take.tolist(),
            np.isnan(q_take).any(axis=1).tolist(),
            strict=True,
        )
    ]
    idle_ids = ids[~active]

    def idle(n: int) -> list[PeerInput]:
        first = heapq.nsmallest(n, ((peers[i], i) for i in idle_ids.tolist()))
        return [_idle(i, label) for label, i in first]

    return Candidates(inputs, idle, len(ids))


class PeerIds:
    """The sorted ids of a node table (node id -> label) but the host's, kept
    while the table is the same dict: a NodeReader's peer names are a new
    dict whenever a row changed and the same one otherwise, so the 16,384
    keys are not read into an array again each interval."""

    def __init__(self) -> None:
        self.peers: Mapping[int, str] | None = None
        self.size = -1
        self.ids: npt.NDArray[np.int64] = np.zeros(0, dtype=np.int64)

    def of(self, peers: Mapping[int, str]) -> npt.NDArray[np.int64]:
        if peers is not self.peers or len(peers) != self.size:
            ids = np.fromiter(peers.keys(), dtype=np.int64, count=len(peers))
            self.ids = np.sort(ids[ids != HOST])
            self.ids.setflags(write=False)  # handed out: nobody may change the kept ids
            self.peers, self.size = peers, len(peers)
        return self.ids


def _candidate_ids(w: Window, peers: Mapping[int, str], table: PeerIds) -> npt.NDArray[np.int64]:
    """Peer ids, sorted: all but the host, and `other` only once it counted."""
    ids = table.of(peers)
    other = w.cur.max_peers + 1
    if peers.get(other) == RESERVED_PEER:
        m = w.cur.node(other)
        if not (m.rtt_count or m.retrans_count):
            ids = ids[ids != other]
    return ids


def _best(
    retrans: npt.NDArray[np.int64],
    p99: npt.NDArray[np.float64],
    active: npt.NDArray[np.bool_],
    fit: int,
    label: Callable[[int], str],
) -> npt.NDArray[np.bool_]:
    """The active peers among the first `fit` by rank_key: by the arrays, then
    among those tied with the fit-th, the smallest labels (label(position))
    for the places left (the labels of the tied only: often hundreds share
    one p99 bucket and no retransmit, never all 16,384). Only the active
    are sorted: the idle rank after them."""
    act = np.flatnonzero(active)
    if len(act) <= fit:
        return active.copy()
    best = np.zeros(len(active), dtype=np.bool_)
    if fit <= 0:
        return best
    r = -retrans[act].astype(np.float64)
    p = np.where(np.isnan(p99[act]), np.inf, -p99[act])
    last = np.lexsort((p, r))[fit - 1]
    tied = (r == r[last]) & (p == p[last])
    better = (r < r[last]) | ((r == r[last]) & (p < p[last]))
    best[act[better]] = True
    need = fit - int(better.sum())
    first = heapq.nsmallest(need, ((label(j), j) for j in act[tied].tolist()))
    best[[j for _, j in first]] = True
    return best


def _held(
    ids: npt.NDArray[np.int64],
    peers: Mapping[int, str],
    held: Mapping[str, int],
    active: npt.NDArray[np.bool_],
) -> npt.NDArray[np.bool_]:
    """The active peers that hold a place (by label: an id may have been
    reused); ids: sorted."""
    want = [i for label, i in held.items() if peers.get(i) == label]
    if len(want) < len(held):  # a held peer under another id now: rare
        labels = set(held)
        want = [i for i, label in peers.items() if label in labels]
    wanted = np.array(want, dtype=np.int64)
    pos = np.minimum(np.searchsorted(ids, wanted), max(len(ids) - 1, 0))
    mask = np.zeros(len(ids), dtype=np.bool_)
    if len(ids):
        mask[pos[ids[pos] == wanted]] = True
    return active & mask


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
        self.ids: dict[str, int] = {}  # exported peer label -> its node id
        self.table = PeerIds()  # the candidates' ids, for candidates()
        self.folding = False

    def configure(self, hold: int, detail: str) -> None:
        if detail != self.detail:  # another kind of series: the set starts over
            self.held.clear()
        self.hold, self.detail = hold, detail

    def holding(self) -> dict[str, int]:
        """label -> node id of the peers holding a place (for candidates())."""
        return {label: self.ids.get(label, -1) for label, left in self.held.items() if left > 0}

    def choose(self, inputs: Sequence[PeerInput] | Candidates, fit: int) -> Choice:
        """The peers to export this interval (at most fit), and updates the holds."""
        c = inputs if isinstance(inputs, Candidates) else Candidates.of(inputs)
        ranked = sorted(c.inputs, key=rank_key)
        if len(ranked) < fit:  # idle peers rank last, by label
            ranked += c.idle(fit - len(ranked))
        ranks_in = {p.label for p in ranked[:fit]}
        kept = [p for p in ranked if p.active and self.held.get(p.label, 0) > 0][:fit]
        kept_labels = {p.label for p in kept}
        rest = [p for p in ranked if p.label not in kept_labels][: fit - len(kept)]
        chosen = kept + rest
        self.held = {
            p.label: self.hold if p.label in ranks_in else self.held[p.label] - 1 for p in chosen
        }
        self.ids = {p.label: p.node for p in chosen}
        folded = c.total - len(chosen)
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
