"""`inspect`: the pinned maps as a per-node table with histogram bars, or JSON."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from ebpf_telemetry import btf
from ebpf_telemetry.histogram import MAX_SLOTS, le_seconds, slot_lower, slot_upper
from ebpf_telemetry.snapshot import HOST, Snapshot
from ebpf_telemetry.values import Hist

BAR_WIDTH = 40


def node_label(snap: Snapshot, node: int) -> str:
    return "host" if node == HOST else snap.peers.get(node, f"node {node}")


def nodes_of(snap: Snapshot, only: int | None) -> list[int]:
    if only is not None:
        return [only]
    return [n for n in sorted(snap.hists) if n == HOST or n in snap.peers or snap.hist(n).count]


def _us(v: int) -> str:
    for unit, scale in (("s", 1_000_000), ("ms", 1000)):
        if v >= scale:
            return f"{v / scale:g}{unit}"
    return f"{v}us"


def hist_bars(h: Hist) -> list[str]:
    """runqlat-style rows: range, count, bar; runs of 3+ empty rows fold into one."""
    used = [i for i, c in enumerate(h.slots) if c]
    if not used:
        return []
    top = max(h.slots)
    rows: list[str] = []
    empty = 0
    for s in range(used[0], used[-1] + 1):
        c = h.slots[s]
        if not c:
            empty += 1
            continue
        if empty > 2:
            rows.append(f"  {'...':>22} : 0 ({empty} empty buckets)")
        else:
            rows.extend(_bar_row(s - k, 0, top) for k in range(empty, 0, -1))
        empty = 0
        rows.append(_bar_row(s, c, top))
    return rows


def _bar_row(s: int, c: int, top: int) -> str:
    bar = "*" * round(BAR_WIDTH * c / top)
    rng = f"{_us(slot_lower(s))} -> {_us(slot_upper(s) - 1)}"
    return f"  {rng:>22} : {c:<10} |{bar:<{BAR_WIDTH}}|"


def idle_seconds(snap: Snapshot, node: int) -> float | None:
    """Seconds since the peer's last activity the agent noted (automatic peers)."""
    seen = snap.seen.get(node)
    return max(0.0, (snap.boottime_ns - seen) / 1e9) if seen and node in snap.peers else None


def hist_json(h: Hist) -> dict[str, int]:
    """Each non-empty bucket's own count (not cumulative), keyed by its upper
    bound in seconds as the canonical `le` string (the last bucket: "+Inf").
    A bucket holds the values below its bound and at or above the bound of
    the bucket before it."""
    last = MAX_SLOTS - 1
    return {
        "+Inf" if s == last else le_seconds(slot_upper(s)): c for s, c in enumerate(h.slots) if c
    }


def node_dict(snap: Snapshot, node: int) -> dict[str, Any]:
    m, h = snap.node(node), snap.hist(node)
    return {
        "node_id": node,
        "peer": node_label(snap, node),
        "idle_seconds": idle_seconds(snap, node),
        "metrics": asdict(m),
        "rtt_p50_us": h.quantile(0.5),
        "rtt_p99_us": h.quantile(0.99),
        "rtt_hist_seconds": hist_json(h),
    }


def drops_by_name(snap: Snapshot) -> dict[str, int]:
    return dict(sorted(btf.drops_by_name(snap.drops).items(), key=lambda x: -x[1]))


def as_json(snap: Snapshot, only: int | None) -> str:
    return json.dumps(
        {
            "nodes": [node_dict(snap, n) for n in nodes_of(snap, only)],
            "runqlat_hist_seconds": hist_json(snap.runqlat),
            "drops": drops_by_name(snap),
            "cpu": asdict(snap.cpu),
            "stats": snap.stats,
        },
        indent=2,
    )


def as_text(snap: Snapshot, only: int | None) -> str:
    out = []
    for n in nodes_of(snap, only):
        m, h = snap.node(n), snap.hist(n)
        p50, p99 = h.quantile(0.5), h.quantile(0.99)
        idle = idle_seconds(snap, n)
        last = f"  last active {idle:.0f} s ago" if idle is not None else ""
        out.append(f"node {n} ({node_label(snap, n)}){last}")
        out.append(
            f"  rtt samples {m.rtt_count}  mean {m.rtt_mean or 0:.0f} us  "
            f"p50 {p50 or 0:.0f} us  p99 {p99 or 0:.0f} us  retrans {m.retrans_count}"
            + (f"  drops {m.drop_count}" if n == HOST else "")  # drops count for the host only
        )
        out.extend(hist_bars(h))
    if only is None:
        host = snap.node(HOST)
        out.append(
            f"run-queue latency  samples {host.runqlat_count}  "
            f"p50 {snap.runqlat.quantile(0.5) or 0:.0f} us  "
            f"p99 {snap.runqlat.quantile(0.99) or 0:.0f} us"
        )
        out.extend(hist_bars(snap.runqlat))
        out.append("drops by reason")
        out.extend(f"  {name:>28} : {c}" for name, c in drops_by_name(snap).items())
    out.append("stats " + " ".join(f"{k}={v}" for k, v in snap.stats.items()))
    return "\n".join(out)
