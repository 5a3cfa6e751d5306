"""The agent's own families: events and peer-table counters, the collectors
that run, config reloads, build info (what the agent knows of itself, not
what the kernel counted per peer). Always exported, outside the budget's cut."""

from __future__ import annotations

import platform
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from prometheus_client.core import Metric

from ebpf_telemetry import __version__
from ebpf_telemetry.families import counter, gauge
from ebpf_telemetry.loader import Running
from ebpf_telemetry.naming import Source
from ebpf_telemetry.peertable import REPAIR_KINDS
from ebpf_telemetry.snapshot import Snapshot
from ebpf_telemetry.values import EVENT_TYPES


@dataclass(frozen=True)
class ReloadState:
    """The last config load: did it succeed, and when did one last succeed."""

    ok: bool
    success_at: float  # Unix time


class AgentView(Protocol):
    """What the collector knows of the agent (metrics.TelemetryCollector)."""

    node_name: str
    interval_seconds: float
    collect_seconds: float
    collectors: list[Running]
    repairs: Counter[str]
    pins_replaced: int
    reload: ReloadState
    source: Source | None


def families(a: AgentView, cur: Snapshot) -> Iterator[Metric]:
    n, st = a.node_name, cur.stats
    sampled = counter("ebpf_events_sampled_total")
    for t in EVENT_TYPES.values():
        sampled.add_metric([n, t], st[f"sampled_{t}"])
    yield sampled
    for name, key in (
        ("ebpf_events_lost_total", "events_lost"),
        ("ebpf_peers_overflow_total", "peers_overflow"),
        ("ebpf_peers_expired_total", "peers_expired"),
        ("ebpf_peer_alloc_races_total", "peer_race"),
    ):
        c = counter(name)
        c.add_metric([n], st[key])
        yield c
    repairs = counter("ebpf_peer_table_repairs_total")
    for kind in REPAIR_KINDS:
        repairs.add_metric([n, kind], a.repairs[kind])
    yield repairs
    in_use = cur.peers_in_use()
    for name, value in (
        ("ebpf_peers", float(in_use)),
        ("ebpf_peers_max", float(cur.max_peers)),
        ("ebpf_telemetry_last_update_timestamp_seconds", cur.wall),
        ("ebpf_telemetry_collect_duration_seconds", a.collect_seconds),
    ):
        fam = gauge(name)
        fam.add_metric([n], value)
        yield fam
    yield _source_sync(a)
    misses = counter("ebpf_bpf_misses_total")
    for prog, count in sorted(cur.misses.items()):
        misses.add_metric([n, prog], count)
    yield misses
    yield from _running(a)
    yield from _config(a)


def _running(a: AgentView) -> Iterator[Metric]:
    up = gauge("ebpf_collector_up")
    for r in a.collectors:
        up.add_metric([a.node_name, r.collector, r.variant or "none"], int(r.up))
    yield up
    info = gauge("ebpf_telemetry_build_info")
    info.add_metric([a.node_name, __version__, platform.release()], 1)
    yield info


def _config(a: AgentView) -> Iterator[Metric]:
    for name, value in (
        ("ebpf_telemetry_interval_seconds", a.interval_seconds),
        ("ebpf_config_last_reload_successful", float(a.reload.ok)),
        ("ebpf_config_last_reload_success_timestamp_seconds", a.reload.success_at),
    ):
        fam = gauge(name)
        fam.add_metric([a.node_name], value)
        yield fam
    replaced = counter("ebpf_pins_replaced_total")
    replaced.add_metric([a.node_name], a.pins_replaced)
    yield replaced


def _source_sync(a: AgentView) -> Metric:
    """Always one sample in the budget's count (absent before the first sync)."""
    fam = gauge("ebpf_peer_source_last_sync_timestamp_seconds")
    synced = a.source.last_sync() if a.source is not None else None
    if a.source is not None and synced is not None:
        fam.add_metric([a.node_name, a.source.name], synced)
    return fam
