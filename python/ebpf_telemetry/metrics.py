"""Every metric we export: its definition (METRICS) and how it is made.

`TelemetryCollector` is a prometheus_client custom collector: each cycle the
agent hands it a Window (two snapshots) and it yields metric families from
it; prometheus_client writes the exposition format. docs/metrics.md is
generated from METRICS (see `python -m ebpf_telemetry.metrics`).
"""

from __future__ import annotations

import os
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace

import structlog
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from ebpf_telemetry import btf, budget, peerdetail
from ebpf_telemetry.agentfamilies import ReloadState
from ebpf_telemetry.agentfamilies import families as agent_families
from ebpf_telemetry.config import Config, ConfigError
from ebpf_telemetry.cputime import CpuTime
from ebpf_telemetry.dropreasons import DropReasons
from ebpf_telemetry.families import (
    METRICS,
    RUNQ_BUCKETS,
    US,
    Buckets,
    add_histogram,
    counter,
    gauge,
    histogram,
)
from ebpf_telemetry.loader import Running
from ebpf_telemetry.naming import Source, Zones
from ebpf_telemetry.snapshot import HOST, Snapshot, Window
from ebpf_telemetry.values import Hist
from ebpf_telemetry.zonehist import ZoneTotals

__all__ = ["METRICS", "RUNQ_BUCKETS", "Buckets", "ReloadState", "TelemetryCollector", "markdown"]

log = structlog.get_logger("metrics")

# max_series at start is checked against the always-exported families of an
# idle host plus this much for what appears while running: collectors, each
# program's misses, drop reasons seen, zones learnt later
RUNTIME_RESERVE = 64


@dataclass(frozen=True)
class Export:
    """What one interval exports, made whole in update() and swapped in at
    once: a scrape of /metrics (another thread) never mixes two intervals.
    It holds the window's new reading and the families of the window's own
    figures, not the window: the reading before is let go (at 16,384 peers a
    reading holds ~4 MiB of rows; the agent would hold three at once). The
    families rendered here are built once, counted against max_series in
    update() and yielded as they are by every collect() (read-only): a
    scrape reads no map (a peer's histogram row read at scrape time could be
    one the next interval's reading has moved on)."""

    cur: Snapshot  # the window's new reading
    host: list[Metric]  # the host's RTT families, rendered once
    sched: list[Metric]  # the scheduler's families, rendered once
    choice: budget.Choice  # the peers with per-peer series
    zones: list[Metric]  # the zone families, rendered
    drops: list[tuple[str, int]]  # reason -> count, within max_series (dropreasons.py)
    peers: list[Metric] = field(default_factory=list)  # the exported peers' families, rendered


class TelemetryCollector(Collector):
    """Yields the families of the latest window handed to update()."""

    def __init__(self, cfg: Config) -> None:
        self.collectors: list[Running] = []  # what attach() made run
        self.export: Export | None = None
        self.collect_seconds = 0.0
        self.repairs: Counter[str] = Counter()  # the peer table's, by kind (peertable.Checker)
        self.pins_replaced = 0  # maps of another layout replaced at start
        self.reload = ReloadState(True, time.time())  # the config was loaded at start
        self.source: Source | None = None  # of peer names, for its last sync
        self.budget = budget.Budget(cfg.peer_detail_hold_intervals, cfg.peer_detail)
        self.zone_totals = ZoneTotals()
        self.drop_reasons = DropReasons()
        self.over_budget = False
        self.configure(cfg)

    def configure(self, cfg: Config, zones: Zones | None = None) -> None:
        """The node name, interval, zones, RTT buckets and budget, from a config
        (at start and reload) and the peer names' source (naming.py). A
        max_series below what the always-exported families take: ConfigError."""
        zones = zones or Zones(cfg.zone)
        peer_buckets, host_buckets = self.check(cfg)
        self.node_name = cfg.node_name
        self.interval_seconds = cfg.interval_seconds
        self.zones, self.peer_buckets, self.host_buckets = zones, peer_buckets, host_buckets
        self.max_series, self.detail = cfg.max_series, cfg.peer_detail
        self.budget.configure(cfg.peer_detail_hold_intervals, cfg.peer_detail)

    @staticmethod
    def check(cfg: Config) -> tuple[Buckets, Buckets]:
        """The per-peer and host buckets of cfg; ConfigError if max_series is
        below what cfg always exports."""
        low, high = cfg.rtt_bucket_range_seconds
        peer_buckets = Buckets.of(cfg.rtt_buckets, low, high)
        host_buckets = Buckets.of("all", low, high)
        least = minimum_series(host_buckets, peer_buckets)
        if cfg.max_series < least:
            raise ConfigError(
                f"max_series {cfg.max_series} is below {least}, the least this config exports "
                "(host, zone and agent families): raise it or narrow rtt_bucket_range_seconds"
            )
        return peer_buckets, host_buckets

    def update(self, window: Window, collect_seconds: float) -> None:
        """A new interval: the zones' counts and the peers the budget exports."""
        self.collect_seconds = collect_seconds
        self.zone_totals.add(window, self._zone_of(window))
        p50, p99 = window.rtt_quantiles_us(HOST, (0.5, 0.99))
        unchosen = Export(
            window.cur,
            list(self._host_rtt(window.cur, p50, p99)),
            list(self._sched(window.cur, window.cpu_utilization)),
            budget.Choice([], 0),
            [],
            [],
        )
        others = count_samples(self._always(unchosen)) + 1  # + a source's first sync
        one_zone = ZoneTotals.samples_per_zone(self.host_buckets)
        reasons = btf.drops_by_name(window.cur.drops)
        drops = self.drop_reasons.choose(reasons, self.max_series - others - one_zone)
        unchosen = replace(unchosen, drops=drops)
        others += len(drops)
        most = (self.max_series - others) // one_zone
        zones = list(
            self.zone_totals.families(self.node_name, self.zones.own, self.host_buckets, most)
        )
        unchosen = replace(unchosen, zones=zones)
        always = others + count_samples(zones)
        per_peer = budget.samples_per_peer(self.detail, len(self.peer_buckets.les))
        fit = budget.room(self.max_series, always, per_peer)
        peers = budget.candidates(
            window, window.cur.peers, fit, self.budget.holding(), self.budget.table
        )
        choice = self.budget.choose(peers, fit)
        labels = self._labels(choice)
        rendered = peerdetail.families(
            self.detail, choice.exported, labels, window.cur, self.peer_buckets
        )
        self.export = replace(unchosen, choice=choice, peers=list(rendered))
        self._note_over(always)

    def _note_over(self, always: int) -> None:
        over = always > self.max_series
        if over and not self.over_budget:
            log.warning(
                "the host, zone and agent families alone exceed max_series: raise it",
                samples=always,
                max_series=self.max_series,
            )
        self.over_budget = over

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        e = self.export
        if e is None:
            return
        yield from self._always(e)
        yield from e.peers

    def _always(self, e: Export) -> Iterator[Metric]:
        """Every family outside the budget's cut (they hold the totals)."""
        yield from e.host
        yield from e.zones
        yield self._drops(e.drops)
        yield from e.sched
        yield from self._budget_gauges(e.choice)
        yield from agent_families(self, e.cur)

    def _zone_of(self, w: Window) -> dict[int, str]:
        """node id -> peer zone, of the ids ZoneTotals.add() needs: none when
        no peer has a zone, after the first interval only those that moved."""
        if not self.zones.peers:
            return {}
        moved = w.moved() if self.zone_totals.started else None
        if moved is None:
            return self.zones.by_id(w.cur.peers)
        peers = w.cur.peers
        return self.zones.by_id({i: peers[i] for i in moved.tolist() if i in peers})

    def _labels(self, choice: budget.Choice) -> dict[int, dict[str, str]]:
        """node id -> node, peer, peer_zone of the exported peers."""
        n, zone = self.node_name, self.zones.of
        return {
            p.node: {"node": n, "peer": p.label, "peer_zone": zone(p.label)}
            for p in choice.exported
        }

    def _host_rtt(self, cur: Snapshot, p50: float | None, p99: float | None) -> Iterator[Metric]:
        n = self.node_name
        for value, name in ((p50, "ebpf_rtt_p50_milliseconds"), (p99, "ebpf_rtt_p99_milliseconds")):
            fam = gauge(name)
            if value is not None:
                fam.add_metric([n], value / 1000.0)
            yield fam
        host = histogram("ebpf_node_tcp_rtt_seconds")
        hb = self.host_buckets
        add_histogram(host, {"node": n}, hb, cur.hist(HOST), cur.node(HOST).rtt_sum * US)
        yield host

    def _drops(self, reasons: list[tuple[str, int]]) -> Metric:
        drops = counter("ebpf_packet_drops_total")
        for name, count in reasons:
            drops.add_metric([self.node_name, name], count)
        return drops

    def _sched(self, cur: Snapshot, ratio: float | None) -> Iterator[Metric]:
        n, host = self.node_name, cur.node(HOST)
        runq = histogram("ebpf_runqueue_latency_seconds")
        add_histogram(runq, {"node": n}, RUNQ_BUCKETS, cur.runqlat, host.runqlat_sum * US)
        yield runq
        util = gauge("ebpf_cpu_utilization_ratio")
        if ratio is not None:
            util.add_metric([n], ratio)
        yield util

    def _budget_gauges(self, choice: budget.Choice) -> Iterator[Metric]:
        for name, value in (
            ("ebpf_peers_exported", len(choice.exported)),
            ("ebpf_peers_folded", choice.folded),
        ):
            fam = gauge(name)
            fam.add_metric([self.node_name], float(value))
            yield fam


def count_samples(fams: Iterable[Metric]) -> int:
    return sum(len(f.samples) for f in fams)


def _idle_reading() -> Snapshot:
    """A reading of a host where nothing happened (the minimum's families)."""
    stats: defaultdict[str, int] = defaultdict(int)
    return Snapshot(0.0, 0.0, {}, {}, stats, {}, Hist.empty(), {}, CpuTime(), {}, {}, 0, 0)


def minimum_series(host: Buckets, peer: Buckets) -> int:
    """The least max_series: the host's families (all present), one zone
    (more zones than fit are shown within peer_zone="": zonehist.py), the
    agent's, and RUNTIME_RESERVE."""
    n_host = 2 + len(host.les) + 3 + len(RUNQ_BUCKETS.les) + 3 + 1
    n_zones = ZoneTotals.samples_per_zone(host)  # zones have every edge, as the host
    view = _MinimumView()
    n_agent = count_samples(agent_families(view, _idle_reading())) + 1 + 2  # sync, budget gauges
    return n_host + n_zones + n_agent + RUNTIME_RESERVE


class _MinimumView:
    """An agent before its start, for minimum_series."""

    def __init__(self) -> None:
        self.node_name = ""
        self.interval_seconds = 0.0
        self.collect_seconds = 0.0
        self.collectors: list[Running] = []
        self.repairs: Counter[str] = Counter()
        self.pins_replaced = 0
        self.reload = ReloadState(True, 0.0)
        self.source: Source | None = None


def markdown() -> str:
    """docs/metrics.md, from METRICS."""
    lines = [
        "# Metrics",
        "",
        "Generated from `python/ebpf_telemetry/metrics.py` "
        "(`python -m ebpf_telemetry.metrics > docs/metrics.md`); a test keeps them equal.",
        "Units are base units (seconds, ratios); `node` is this host's name.",
        "",
        "| metric | type | labels | meaning | source |",
        "| --- | --- | --- | --- | --- |",
    ]
    for d in METRICS.values():
        labels = ", ".join(f"`{x}`" for x in d.labels)
        lines.append(f"| `{d.name}` | {d.kind} | {labels} | {d.help} | {d.source} |")
    return os.linesep.join(lines) + os.linesep


if __name__ == "__main__":
    print(markdown(), end="")
