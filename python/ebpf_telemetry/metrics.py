"""Every metric we export: its definition (METRICS) and how it is made.

`TelemetryCollector` is a prometheus_client custom collector: each cycle the
agent hands it a Window (two snapshots) and it yields metric families from
it; prometheus_client writes the exposition format. docs/metrics.md is
generated from METRICS (see `python -m ebpf_telemetry.metrics`).
"""

from __future__ import annotations

import os
import platform
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from ebpf_telemetry import __version__, btf
from ebpf_telemetry.config import Config
from ebpf_telemetry.histogram import cumulative, edge_slots, le_seconds, slot_lower
from ebpf_telemetry.loader import Running
from ebpf_telemetry.naming import Source, Zones
from ebpf_telemetry.peertable import REPAIR_KINDS
from ebpf_telemetry.snapshot import HOST, Window
from ebpf_telemetry.values import EVENT_TYPES, Hist

US = 1e-6
WINDOW_QUANTILES = (0.5, 0.9, 0.99)
WINDOW_Q_LABELS = ("0.5", "0.9", "0.99")


@dataclass(frozen=True)
class MetricDef:
    name: str  # as exposed (counters with _total)
    kind: str  # counter, gauge, histogram
    labels: tuple[str, ...]
    help: str
    source: str  # where the value comes from (docs)

    @property
    def family_name(self) -> str:
        return self.name.removesuffix("_total") if self.kind == "counter" else self.name


def _defs(*ds: MetricDef) -> dict[str, MetricDef]:
    return {d.name: d for d in ds}


METRICS = _defs(
    MetricDef(
        "ebpf_rtt_p50_milliseconds",
        "gauge",
        ("node",),
        "Median TCP smoothed RTT over the last interval, all peers, milliseconds.",
        "rtt_host_hist_map difference of two readings, interpolated in its bucket",
    ),
    MetricDef(
        "ebpf_rtt_p99_milliseconds",
        "gauge",
        ("node",),
        "99th percentile TCP smoothed RTT over the last interval, all peers, milliseconds.",
        "rtt_host_hist_map difference of two readings, interpolated in its bucket",
    ),
    MetricDef(
        "ebpf_tcp_rtt_seconds",
        "histogram",
        ("node", "peer", "peer_zone"),
        "TCP smoothed RTT (srtt) per peer node: one sample per RTT measurement the kernel "
        "takes (an incoming segment that acknowledges new data), srtt as it stands then.",
        "tcp_probe where ack_seq > snd_una -> rtt_hist_map[peer] (log2x8 slots; le: the "
        "rtt_buckets edges in rtt_bucket_range_seconds), node_metrics_map.rtt_sum",
    ),
    MetricDef(
        "ebpf_node_tcp_rtt_seconds",
        "histogram",
        ("node",),
        "TCP smoothed RTT of all this host's peers together, at every kernel bucket edge in "
        "rtt_bucket_range_seconds: for percentiles across a fleet.",
        "rtt_host_hist_map (log2x8 slots, le: all edges), node_metrics_map[0].rtt_sum",
    ),
    MetricDef(
        "ebpf_tcp_rtt_window_seconds",
        "summary",
        ("node", "peer", "peer_zone", "quantile"),
        "TCP smoothed RTT per peer: quantile 0.5, 0.9, 0.99 of the samples of the last "
        "interval (absent when it had none); no _sum/_count: ebpf_tcp_rtt_seconds has them.",
        "rtt_hist_map[peer] difference of two readings, interpolated in the bucket",
    ),
    MetricDef(
        "ebpf_tcp_retransmits_total",
        "counter",
        ("node", "peer", "peer_zone"),
        "TCP segments retransmitted (as TcpRetransSegs counts them), per peer node.",
        "tcp_retransmit_skb (segments, err == 0), tcp_retransmit_synack -> retrans_count",
    ),
    MetricDef(
        "ebpf_packet_drops_total",
        "counter",
        ("node", "reason"),
        "Packets the kernel dropped, by enum skb_drop_reason name (from the kernel's BTF); "
        '"unknown" on kernels whose kfree_skb passes no reason (before 5.17).',
        "skb:kfree_skb -> drop_reasons_map[reason]",
    ),
    MetricDef(
        "ebpf_runqueue_latency_seconds",
        "histogram",
        ("node",),
        "Time from a task becoming runnable (woken or preempted) to running on a CPU.",
        "sched_switch (rq clock - last_queued) -> runqlat_hist_map (log2x8), runqlat_sum",
    ),
    MetricDef(
        "ebpf_cpu_utilization_ratio",
        "gauge",
        ("node",),
        "Share of CPU time not idle (idle and iowait) over the last interval, all CPUs (0..1).",
        "/proc/stat: the kernel's own per-CPU time accounting (cputime.py says why)",
    ),
    MetricDef(
        "ebpf_events_sampled_total",
        "counter",
        ("node", "type"),
        "Events sent to the ring buffer (1 in sample_rate, only while `ebpf-telemetry events` "
        "holds its lease), by type.",
        "stats_map[STAT_SAMPLED_BASE + type]",
    ),
    MetricDef(
        "ebpf_events_lost_total",
        "counter",
        ("node",),
        "Sampled events dropped because the ring buffer was full.",
        "stats_map[STAT_EVENTS_LOST]",
    ),
    MetricDef(
        "ebpf_peers_overflow_total",
        "counter",
        ("node",),
        'Events counted under peer="other" because the peer table was full.',
        "stats_map[STAT_PEERS_OVERFLOW]",
    ),
    MetricDef(
        "ebpf_peers",
        "gauge",
        ("node",),
        "Peer ids in use (configured names, or automatic peers not yet expired).",
        "peer_info_map entries named or allocated",
    ),
    MetricDef(
        "ebpf_peers_max",
        "gauge",
        ("node",),
        'Peer ids there are (max_peers); beyond them traffic counts under peer="other".',
        "settings_map.max_peers",
    ),
    MetricDef(
        "ebpf_peers_expired_total",
        "counter",
        ("node",),
        "Automatic peer ids expired after peer_idle_seconds without traffic and freed for reuse.",
        "stats_map[STAT_PEERS_EXPIRED] (the agent counts)",
    ),
    MetricDef(
        "ebpf_peer_alloc_races_total",
        "counter",
        ("node",),
        "Two CPUs added the same new address at once; the loser used the winner's id and "
        "gave its own back (nothing is lost or mixed).",
        "stats_map[STAT_PEER_RACE]",
    ),
    MetricDef(
        "ebpf_peer_table_repairs_total",
        "counter",
        ("node", "kind"),
        "Broken invariants of the automatic peer table found and repaired since the agent "
        "started (peertable.py lists them); any is a bug to report.",
        "the agent's check every cycle",
    ),
    MetricDef(
        "ebpf_peer_source_last_sync_timestamp_seconds",
        "gauge",
        ("node", "source"),
        "Unix time the source of peer names (source: file, kubernetes) was last known whole "
        "and current; names are kept while it is not (absent before the first sync).",
        "peers_file: the last stat or read that succeeded; kubernetes: the last list, watch "
        "event or bookmark",
    ),
    MetricDef(
        "ebpf_telemetry_last_update_timestamp_seconds",
        "gauge",
        ("node",),
        "Unix time of the agent's last collection.",
        "agent clock",
    ),
    MetricDef(
        "ebpf_telemetry_collect_duration_seconds",
        "gauge",
        ("node",),
        "Time the last collection took to read the maps and compute.",
        "agent clock",
    ),
    MetricDef(
        "ebpf_bpf_misses_total",
        "counter",
        ("node", "program"),
        "Runs of a program the kernel skipped because it was already running on that CPU "
        "(events not counted).",
        "bpf_prog_info.recursion_misses of each program behind a pinned link (5.12; tp_btf 6.1)",
    ),
    MetricDef(
        "ebpf_collector_up",
        "gauge",
        ("node", "collector", "variant"),
        "1 if the collector runs (in this variant), 0 if this kernel cannot serve it "
        '(variant="none"; the agent\'s log and `doctor` say why).',
        "the loader's plan (plan.py) and what the kernel accepted",
    ),
    MetricDef(
        "ebpf_telemetry_interval_seconds",
        "gauge",
        ("node",),
        "Seconds between two collections (interval_seconds): the staleness alert's unit.",
        "config",
    ),
    MetricDef(
        "ebpf_config_last_reload_successful",
        "gauge",
        ("node",),
        "1 if the last config load (start or SIGHUP) succeeded, 0 if it failed and the "
        "previous config is still in use.",
        "agent (as prometheus_config_last_reload_successful)",
    ),
    MetricDef(
        "ebpf_config_last_reload_success_timestamp_seconds",
        "gauge",
        ("node",),
        "Unix time of the last successful config load (start or SIGHUP).",
        "agent clock",
    ),
    MetricDef(
        "ebpf_pins_replaced_total",
        "counter",
        ("node",),
        "Pinned maps of another layout (an earlier release's) this agent replaced at start; "
        "their counters restarted (strict_pins = true refuses them instead).",
        "agent (run)",
    ),
    MetricDef(
        "ebpf_telemetry_build_info",
        "gauge",
        ("node", "version", "kernel"),
        "Agent version and the kernel it runs on; always 1.",
        "package version, uname -r",
    ),
)


@dataclass(frozen=True)
class Buckets:
    """The exported edges of a histogram: the kernel slots they start, and
    their `le` label values in seconds."""

    cuts: tuple[int, ...]
    les: tuple[str, ...]

    @classmethod
    def of(cls, scheme: str, low_seconds: float, high_seconds: float) -> Buckets:
        cuts = edge_slots(scheme, low_seconds, high_seconds)
        return cls(cuts, tuple(le_seconds(slot_lower(s)) for s in cuts))


@dataclass(frozen=True)
class ReloadState:
    """The last config load: did it succeed, and when did one last succeed."""

    ok: bool
    success_at: float  # Unix time


# run-queue latency: every power of two from 1 us to 2^26 us (67 s)
RUNQ_BUCKETS = Buckets.of("pow2", 1e-6, 68.0)


def _add_histogram(
    fam: Metric, labels: dict[str, str], b: Buckets, h: Hist, sum_seconds: float
) -> None:
    """One histogram series: cumulative buckets at b's edges, +Inf, _count, _sum.
    (Samples made directly: HistogramMetricFamily.add_metric re-validates every
    bucket, and add_sample is a call per sample; at 255 peers both cost more
    than the rest of the computing.)"""
    bucket, n = fam.name + "_bucket", h.count
    counts = cumulative(h.slots, b.cuts)
    pairs = zip(b.les, counts, strict=True)
    fam.samples += [Sample(bucket, {**labels, "le": le}, c) for le, c in pairs]
    fam.samples += [
        Sample(bucket, {**labels, "le": "+Inf"}, n),
        Sample(fam.name + "_count", labels, n),
        Sample(fam.name + "_sum", labels, sum_seconds),
    ]


def _labels(name: str, kind: str) -> tuple[str, str, list[str]]:
    d = METRICS[name]
    if d.kind != kind:
        raise TypeError(f"{name} is a {d.kind}, not a {kind}")
    return d.family_name, d.help, list(d.labels)


def _gauge(name: str) -> GaugeMetricFamily:
    n, h, labels = _labels(name, "gauge")
    return GaugeMetricFamily(n, h, labels=labels)


def _counter(name: str) -> CounterMetricFamily:
    n, h, labels = _labels(name, "counter")
    return CounterMetricFamily(n, h, labels=labels)


def _summary(name: str) -> Metric:
    """A summary of quantiles only (SummaryMetricFamily cannot hold quantiles)."""
    n, h, _ = _labels(name, "summary")
    return Metric(n, h, "summary")


def _histogram(name: str) -> Metric:
    n, h, _ = _labels(name, "histogram")
    return Metric(n, h, "histogram")


class TelemetryCollector(Collector):
    """Yields the families of the latest window handed to update()."""

    def __init__(self, cfg: Config) -> None:
        self.collectors: list[Running] = []  # what attach() made run
        self.window: Window | None = None
        self.collect_seconds = 0.0
        self.repairs: Counter[str] = Counter()  # the peer table's, by kind (peertable.Checker)
        self.pins_replaced = 0  # maps of another layout replaced at start
        self.reload = ReloadState(True, time.time())  # the config was loaded at start
        self.source: Source | None = None  # of peer names, for its last sync
        self.configure(cfg)

    def configure(self, cfg: Config, zones: Zones | None = None) -> None:
        """The node name, interval, zones and RTT buckets, from a config (at
        start and reload) and the peer names' source (naming.py)."""
        self.node_name = cfg.node_name
        self.interval_seconds = cfg.interval_seconds
        self.zones = zones or Zones(cfg.zone)
        low, high = cfg.rtt_bucket_range_seconds
        self.peer_buckets = Buckets.of(cfg.rtt_buckets, low, high)
        self.host_buckets = Buckets.of("all", low, high)

    def update(self, window: Window, collect_seconds: float) -> None:
        self.window, self.collect_seconds = window, collect_seconds

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        w = self.window
        if w is None:
            return
        yield from self._rtt(w)
        yield from self._retrans_drops(w)
        yield from self._sched(w)
        yield from self._agent(w)

    def _peers(self, w: Window) -> Iterator[tuple[int, dict[str, str]]]:
        """Peers to export, with their labels: every named or allocated id,
        `other` once anything counted there (RTT samples or retransmits alone)."""
        n, zone = self.node_name, self.zones.of
        for node, label in sorted(w.cur.peers.items()):
            m = w.cur.node(node)
            if node != HOST and (label != "other" or m.rtt_count or m.retrans_count):
                yield node, {"node": n, "peer": label, "peer_zone": zone(label)}

    def _rtt(self, w: Window) -> Iterator[Metric]:
        n = self.node_name
        p50, p99 = w.rtt_quantiles_us(HOST, (0.5, 0.99))
        for value, name in ((p50, "ebpf_rtt_p50_milliseconds"), (p99, "ebpf_rtt_p99_milliseconds")):
            fam = _gauge(name)
            if value is not None:
                fam.add_metric([n], value / 1000.0)
            yield fam
        host = _histogram("ebpf_node_tcp_rtt_seconds")
        hb = self.host_buckets
        _add_histogram(host, {"node": n}, hb, w.cur.hist(HOST), w.cur.node(HOST).rtt_sum * US)
        yield host
        hist = _histogram("ebpf_tcp_rtt_seconds")
        window = _summary("ebpf_tcp_rtt_window_seconds")
        for node, labels in self._peers(w):
            m = w.cur.node(node)
            _add_histogram(hist, labels, self.peer_buckets, w.cur.hist(node), m.rtt_sum * US)
            values = w.rtt_quantiles_us(node, WINDOW_QUANTILES)
            for q_label, v in zip(WINDOW_Q_LABELS, values, strict=True):
                if v is not None:
                    window.add_sample(window.name, {**labels, "quantile": q_label}, v * US)
        yield hist
        yield window

    def _retrans_drops(self, w: Window) -> Iterator[Metric]:
        n = self.node_name
        retrans = _counter("ebpf_tcp_retransmits_total")
        for node, labels in self._peers(w):
            retrans.add_metric(list(labels.values()), w.cur.node(node).retrans_count)
        yield retrans
        drops = _counter("ebpf_packet_drops_total")
        for name, count in btf.drops_by_name(w.cur.drops).items():
            drops.add_metric([n, name], count)
        yield drops

    def _sched(self, w: Window) -> Iterator[Metric]:
        n, host = self.node_name, w.cur.node(HOST)
        runq = _histogram("ebpf_runqueue_latency_seconds")
        _add_histogram(runq, {"node": n}, RUNQ_BUCKETS, w.cur.runqlat, host.runqlat_sum * US)
        yield runq
        util = _gauge("ebpf_cpu_utilization_ratio")
        ratio = w.cpu_utilization
        if ratio is not None:
            util.add_metric([n], ratio)
        yield util

    def _agent(self, w: Window) -> Iterator[Metric]:
        n, st = self.node_name, w.cur.stats
        sampled = _counter("ebpf_events_sampled_total")
        for t in EVENT_TYPES.values():
            sampled.add_metric([n, t], st[f"sampled_{t}"])
        yield sampled
        for name, key in (
            ("ebpf_events_lost_total", "events_lost"),
            ("ebpf_peers_overflow_total", "peers_overflow"),
            ("ebpf_peers_expired_total", "peers_expired"),
            ("ebpf_peer_alloc_races_total", "peer_race"),
        ):
            c = _counter(name)
            c.add_metric([n], st[key])
            yield c
        repairs = _counter("ebpf_peer_table_repairs_total")
        for kind in REPAIR_KINDS:
            repairs.add_metric([n, kind], self.repairs[kind])
        yield repairs
        in_use = sum(1 for i, label in w.cur.peers.items() if i != HOST and label != "other")
        for name, value in (
            ("ebpf_peers", float(in_use)),
            ("ebpf_peers_max", float(w.cur.max_peers)),
            ("ebpf_telemetry_last_update_timestamp_seconds", w.cur.wall),
            ("ebpf_telemetry_collect_duration_seconds", self.collect_seconds),
        ):
            fam = _gauge(name)
            fam.add_metric([n], value)
            yield fam
        yield self._source_sync()
        misses = _counter("ebpf_bpf_misses_total")
        for prog, count in sorted(w.cur.misses.items()):
            misses.add_metric([n, prog], count)
        yield misses
        up = _gauge("ebpf_collector_up")
        for r in self.collectors:
            up.add_metric([n, r.collector, r.variant or "none"], int(r.up))
        yield up
        info = _gauge("ebpf_telemetry_build_info")
        info.add_metric([n, __version__, platform.release()], 1)
        yield info
        yield from self._config()

    def _config(self) -> Iterator[Metric]:
        for name, value in (
            ("ebpf_telemetry_interval_seconds", self.interval_seconds),
            ("ebpf_config_last_reload_successful", float(self.reload.ok)),
            ("ebpf_config_last_reload_success_timestamp_seconds", self.reload.success_at),
        ):
            fam = _gauge(name)
            fam.add_metric([self.node_name], value)
            yield fam
        replaced = _counter("ebpf_pins_replaced_total")
        replaced.add_metric([self.node_name], self.pins_replaced)
        yield replaced

    def _source_sync(self) -> Metric:
        fam = _gauge("ebpf_peer_source_last_sync_timestamp_seconds")
        synced = self.source.last_sync() if self.source is not None else None
        if self.source is not None and synced is not None:
            fam.add_metric([self.node_name, self.source.name], synced)
        return fam


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
