"""Every metric we export: its definition (METRICS, docs/metrics.md is made
from it), the bucket edges, and the family constructors the modules that make
families share (metrics.py, budget's peerdetail.py, zonehist.py)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.samples import Sample

from ebpf_telemetry.histogram import cumulative, edge_slots, le_seconds, slot_lower
from ebpf_telemetry.values import Hist

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
        "takes (an incoming segment that acknowledges new data), srtt as it stands then "
        '(peer_detail = "histogram"; max_series: the worst peers first).',
        "tcp_probe where ack_seq > snd_una -> rtt_hist_map[peer] (log2x8 slots; le: the "
        "rtt_buckets edges in rtt_bucket_range_seconds), node_metrics_map.rtt_sum",
    ),
    MetricDef(
        "ebpf_node_tcp_rtt_seconds",
        "histogram",
        ("node",),
        "TCP smoothed RTT of all this host's peers together, at every kernel bucket edge in "
        "rtt_bucket_range_seconds: for percentiles across a fleet.",
        "rtt_host_hist_map (log2x8 slots, le: all edges), host_metrics_map.rtt_sum",
    ),
    MetricDef(
        "ebpf_tcp_rtt_window_seconds",
        "summary",
        ("node", "peer", "peer_zone", "quantile"),
        "TCP smoothed RTT per peer: quantile 0.5, 0.9, 0.99 of the samples of the last "
        'interval (absent when it had none; peer_detail = "quantiles": 0.5 and 0.99 only); '
        "no _sum/_count: ebpf_tcp_rtt_seconds or ebpf_tcp_rtt_samples_total count them.",
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
        "ebpf_tcp_rtt_samples_total",
        "counter",
        ("node", "peer", "peer_zone"),
        'RTT samples per peer (peer_detail = "quantiles": ebpf_tcp_rtt_seconds_count '
        "without the buckets).",
        "node_metrics_map[peer].rtt_count",
    ),
    MetricDef(
        "ebpf_zone_tcp_rtt_seconds",
        "histogram",
        ("node", "zone", "peer_zone"),
        "TCP smoothed RTT of this node (zone: its own) towards each peer zone, at every "
        'kernel edge in rtt_bucket_range_seconds (as the host); peer_zone="" holds every '
        "sample of a peer without a zone, of `other` and not attributed to a peer: the "
        "zones sum to ebpf_node_tcp_rtt_seconds.",
        "rtt_hist_map rows of the peers of each zone, the rest of rtt_host_hist_map; "
        "node_metrics_map.rtt_sum, host_metrics_map.rtt_sum (the agent adds each interval's "
        "difference)",
    ),
    MetricDef(
        "ebpf_zone_tcp_retransmits_total",
        "counter",
        ("node", "zone", "peer_zone"),
        "TCP segments retransmitted towards each peer zone; the zones sum to all of this "
        'host\'s retransmits (peer_zone="": peers without a zone, `other`, not attributed).',
        "node_metrics_map retrans_count of the peers of each zone, the rest of node 0's",
    ),
    MetricDef(
        "ebpf_peers_exported",
        "gauge",
        ("node",),
        "Peers whose per-peer series (peer_detail) are in this export (max_series budget).",
        "the agent's budget (budget.py)",
    ),
    MetricDef(
        "ebpf_peers_folded",
        "gauge",
        ("node",),
        'Peers left out of the per-peer series by max_series or peer_detail = "none"; their '
        "counts stay in the host and zone families.",
        "the agent's budget (budget.py)",
    ),
    MetricDef(
        "ebpf_packet_drops_total",
        "counter",
        ("node", "reason"),
        "Packets the kernel dropped, by enum skb_drop_reason name (from the kernel's BTF); "
        '"unknown" on kernels whose kfree_skb passes no reason (before 5.17); "other": the '
        "reasons max_series leaves no room for (the sum is every drop).",
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


# run-queue latency: every power of two from 1 us to 2^26 us (67 s)
RUNQ_BUCKETS = Buckets.of("pow2", 1e-6, 68.0)


def add_histogram(
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


def gauge(name: str) -> GaugeMetricFamily:
    n, h, labels = _labels(name, "gauge")
    return GaugeMetricFamily(n, h, labels=labels)


def counter(name: str) -> CounterMetricFamily:
    n, h, labels = _labels(name, "counter")
    return CounterMetricFamily(n, h, labels=labels)


def summary(name: str) -> Metric:
    """A summary of quantiles only (SummaryMetricFamily cannot hold quantiles)."""
    n, h, _ = _labels(name, "summary")
    return Metric(n, h, "summary")


def histogram(name: str) -> Metric:
    n, h, _ = _labels(name, "histogram")
    return Metric(n, h, "histogram")
