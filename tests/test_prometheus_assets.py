"""The Prometheus, Grafana and deployment assets, checked with the real tools.

- docs/prometheus/rules.yml: `promtool check rules`, `promtool test rules`
  (rules_test.yml covers every rule), naming conventions, metric names.
- docs/prometheus/scrape.yml: `promtool check config`.
- docs/grafana/ebpf-telemetry.json: structure; every PromQL expression is
  accepted by a running Prometheus, and returns data once it scrapes ours.
- A live stack: the real node_exporter serving a textfile written with
  prometheus_client under our metric names, the real Prometheus scraping it
  every second with our rules loaded.
- deploy/: `systemd-analyze verify` of the unit, the DaemonSet's fields, the
  example config through the agent's own config loader.
"""

from __future__ import annotations

import configparser
import json
import math
import re
import subprocess
import time
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, write_to_textfile
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from ebpf_telemetry.histogram import le_seconds
from promstack import (
    PROMETHEUS_NAMES,
    PROMTOOL_NAMES,
    NodeExporter,
    Prometheus,
    QueryError,
    Result,
    find_binary,
    finite_values,
    require,
    values,
)

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "docs" / "prometheus" / "rules.yml"
RULES_TEST = ROOT / "docs" / "prometheus" / "rules_test.yml"
SCRAPE = ROOT / "docs" / "prometheus" / "scrape.yml"
DASHBOARD = ROOT / "docs" / "grafana" / "ebpf-telemetry.json"
UNIT = ROOT / "deploy" / "ebpf-telemetry.service"
DAEMONSET = ROOT / "deploy" / "daemonset.yaml"
CONFIG = ROOT / "deploy" / "config.toml"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"

NODE = "test-node"
TEXTFILE_NAME = "ebpf_telemetry.prom"

# SPEC.md's metric families, as exposed (counters with _total).
COUNTERS = {
    "ebpf_tcp_retransmits_total",
    "ebpf_packet_drops_total",
    "ebpf_events_sampled_total",
    "ebpf_events_lost_total",
    "ebpf_peers_overflow_total",
    "ebpf_bpf_misses_total",
}
# known to the rules, not in the live tests' hand-made Sample: the per-peer
# sample count of peer_detail = "quantiles", the zones' retransmits
NOT_IN_SAMPLE = {"ebpf_tcp_rtt_samples_total", "ebpf_zone_tcp_retransmits_total"}
GAUGES = {
    "ebpf_rtt_p50_milliseconds",
    "ebpf_rtt_p99_milliseconds",
    "ebpf_tcp_rtt_window_seconds",
    "ebpf_cpu_utilization_ratio",
    "ebpf_telemetry_last_update_timestamp_seconds",
    "ebpf_telemetry_collect_duration_seconds",
    "ebpf_telemetry_build_info",
    "ebpf_telemetry_interval_seconds",
    "ebpf_collector_up",
    "ebpf_config_last_reload_successful",
    "ebpf_peers_exported",
    "ebpf_peers_folded",
}
HISTOGRAMS = {
    "ebpf_tcp_rtt_seconds",
    "ebpf_node_tcp_rtt_seconds",
    "ebpf_zone_tcp_rtt_seconds",
    "ebpf_runqueue_latency_seconds",
}
SERIES_NAMES = (
    COUNTERS
    | NOT_IN_SAMPLE
    | GAUGES
    | {f"{h}{suffix}" for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
)
METRIC_RE = re.compile(r"\bebpf_[a-z0-9_]+\b")
RECORD_RE = re.compile(r"^[a-z][a-z_]*:[a-z][a-z0-9_]*:[a-z][a-z0-9_]*$")

# le bounds as the agent writes them: powers of two of microseconds, in seconds
# (le_seconds: the canonical string of each edge).
LE_US = [2**k for k in range(27)]  # 1 us .. 67.1 s


def load_yaml(path: Path) -> Any:
    yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read the YAML assets")
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def load_yaml_all(path: Path) -> list[Any]:
    yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read the YAML assets")
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def run(cmd: Sequence[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(cmd), cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def metric_names(expr: str) -> set[str]:
    return set(METRIC_RE.findall(expr))


# --------------------------------------------------------------------------
# A sample textfile, written with prometheus_client under our metric names.


@dataclass
class Sample:
    """Cumulative counts of one collection; `grow` adds a second interval."""

    rtt_us: dict[str, list[int]]  # peer -> observed RTTs
    runq_us: list[int]
    retransmits: dict[str, int]
    drops: dict[str, int]
    sampled: dict[str, int]
    timestamp: float

    @classmethod
    def first(cls) -> Sample:
        return cls(
            rtt_us={
                "node-b": [120] * 40 + [900] * 10 + [5000] * 2,
                "10.0.0.7": [250] * 30 + [70_000],
                "other": [40_000] * 5,
            },
            runq_us=[3] * 100 + [20] * 50 + [900] * 3,
            retransmits={"node-b": 2, "10.0.0.7": 0, "other": 1},
            drops={"NO_SOCKET": 12, "TCP_CSUM": 1},
            sampled={"rtt": 5, "retrans": 1, "drop": 2, "runqlat": 9},
            timestamp=time.time(),
        )

    def grow(self) -> Sample:
        """The next interval: 100 new RTT samples, all in (1024, 2048] us."""
        rtt = {peer: list(obs) for peer, obs in self.rtt_us.items()}
        rtt["node-b"] += [1500] * 60
        rtt["10.0.0.7"] += [1500] * 40
        return Sample(
            rtt_us=rtt,
            runq_us=[*self.runq_us, *([40] * 100)],
            retransmits={p: n + 3 for p, n in self.retransmits.items()},
            drops={r: n + 10 for r, n in self.drops.items()},
            sampled={t: n + 1 for t, n in self.sampled.items()},
            timestamp=time.time(),
        )


def histogram_buckets(observations_us: list[int]) -> list[tuple[str, float]]:
    buckets = [(le_seconds(le), float(sum(1 for v in observations_us if v <= le))) for le in LE_US]
    buckets.append(("+Inf", float(len(observations_us))))
    return buckets


class SampleCollector(Collector):
    def __init__(self, sample: Sample) -> None:
        self.sample = sample

    def collect(self) -> Iterator[Metric]:
        s = self.sample
        everything = [v for obs in s.rtt_us.values() for v in obs]
        for name, value in (("ebpf_rtt_p50_milliseconds", 0.25), ("ebpf_rtt_p99_milliseconds", 40)):
            g = GaugeMetricFamily(name, "TCP RTT quantile over the last interval.", labels=["node"])
            g.add_metric([NODE], value)
            yield g
        rtt = HistogramMetricFamily(
            "ebpf_tcp_rtt_seconds", "TCP smoothed RTT per peer.", labels=["node", "peer"]
        )
        window = GaugeMetricFamily(
            "ebpf_tcp_rtt_window_seconds",
            "TCP RTT quantiles per peer over the last interval.",
            labels=["node", "peer", "quantile"],
        )
        for peer, obs in s.rtt_us.items():
            rtt.add_metric([NODE, peer], histogram_buckets(obs), sum(obs) * 1e-6)
            for q in ("0.5", "0.9", "0.99"):
                window.add_metric(
                    [NODE, peer, q], sorted(obs)[int(float(q) * (len(obs) - 1))] * 1e-6
                )
        yield rtt
        yield window
        assert sum(len(o) for o in s.rtt_us.values()) == len(everything)
        host = HistogramMetricFamily(
            "ebpf_node_tcp_rtt_seconds", "TCP smoothed RTT, all peers.", labels=["node"]
        )
        host.add_metric([NODE], histogram_buckets(everything), sum(everything) * 1e-6)
        yield host
        zone = HistogramMetricFamily(
            "ebpf_zone_tcp_rtt_seconds",
            "TCP smoothed RTT per zone pair.",
            labels=["node", "zone", "peer_zone"],
        )  # node-b in zone-b, the rest without a zone
        rest = [v for peer, obs in s.rtt_us.items() if peer != "node-b" for v in obs]
        nb = s.rtt_us["node-b"]
        zone.add_metric([NODE, "zone-a", "zone-b"], histogram_buckets(nb), sum(nb) * 1e-6)
        zone.add_metric([NODE, "zone-a", ""], histogram_buckets(rest), sum(rest) * 1e-6)
        yield zone
        retrans = CounterMetricFamily(
            "ebpf_tcp_retransmits", "TCP retransmits per peer.", labels=["node", "peer"]
        )
        for peer, n in s.retransmits.items():
            retrans.add_metric([NODE, peer], n)
        yield retrans
        drops = CounterMetricFamily(
            "ebpf_packet_drops", "Packets dropped, by reason.", labels=["node", "reason"]
        )
        for reason, n in s.drops.items():
            drops.add_metric([NODE, reason], n)
        yield drops
        runq = HistogramMetricFamily(
            "ebpf_runqueue_latency_seconds", "CPU run-queue latency.", labels=["node"]
        )
        runq.add_metric([NODE], histogram_buckets(s.runq_us), sum(s.runq_us) * 1e-6)
        yield runq
        cpu = GaugeMetricFamily("ebpf_cpu_utilization_ratio", "Busy CPU ratio.", labels=["node"])
        cpu.add_metric([NODE], 0.42)
        yield cpu
        sampled = CounterMetricFamily(
            "ebpf_events_sampled", "Sampled events by type.", labels=["node", "type"]
        )
        for t, n in s.sampled.items():
            sampled.add_metric([NODE, t], n)
        yield sampled
        for name, help_text in (
            ("ebpf_events_lost", "Events lost."),
            ("ebpf_peers_overflow", "Events counted under other."),
        ):
            c = CounterMetricFamily(name, help_text, labels=["node"])
            c.add_metric([NODE], 0)
            yield c
        for name, value in (
            ("ebpf_telemetry_last_update_timestamp_seconds", s.timestamp),
            ("ebpf_telemetry_collect_duration_seconds", 0.003),
            ("ebpf_telemetry_interval_seconds", 5.0),
            ("ebpf_config_last_reload_successful", 1.0),
            ("ebpf_peers_exported", float(len(s.rtt_us))),
            ("ebpf_peers_folded", 0.0),
        ):
            g = GaugeMetricFamily(name, "Agent self-monitoring.", labels=["node"])
            g.add_metric([NODE], value)
            yield g
        misses = CounterMetricFamily("ebpf_bpf_misses", "Runs skipped.", labels=["node", "program"])
        misses.add_metric([NODE, "handle_tcp_probe"], 0)
        yield misses
        up = GaugeMetricFamily(
            "ebpf_collector_up", "Collectors.", labels=["node", "collector", "variant"]
        )
        up.add_metric([NODE, "rtt", "tcp_probe_tp_btf"], 1)
        yield up
        info = GaugeMetricFamily(
            "ebpf_telemetry_build_info", "Version and kernel.", labels=["node", "version", "kernel"]
        )
        info.add_metric([NODE, "0.1.0", "6.18.0-test"], 1)
        yield info


def write_sample(path: Path, sample: Sample) -> None:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SampleCollector(sample))
    write_to_textfile(str(path), registry)


# --------------------------------------------------------------------------
# Rules


def rules_doc() -> dict[str, Any]:
    doc: dict[str, Any] = load_yaml(RULES)
    return doc


def all_rules() -> list[dict[str, Any]]:
    return [rule for group in rules_doc()["groups"] for rule in group["rules"]]


def test_promtool_check_rules() -> None:
    promtool = require(PROMTOOL_NAMES)
    r = run([promtool, "check", "rules", str(RULES)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout and "WARNING" not in r.stdout + r.stderr, r.stdout + r.stderr


def test_promtool_test_rules() -> None:
    promtool = require(PROMTOOL_NAMES)
    r = run([promtool, "test", "rules", RULES_TEST.name], cwd=RULES_TEST.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout and "FAILED" not in r.stdout, r.stdout


def test_rules_follow_conventions_and_use_our_metrics() -> None:
    rules = all_rules()
    records = [r["record"] for r in rules if "record" in r]
    alerts = [r for r in rules if "alert" in r]
    assert len(records) == len(set(records))
    for name in records:
        assert RECORD_RE.match(name), f"{name}: not level:metric:operations"
        metric = name.split(":")[1]
        assert not metric.endswith("_total"), f"{name}: drop _total once rate() is applied"
    for rule in rules:
        raw = re.sub(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", "", rule["expr"])  # recorded series
        unknown = metric_names(raw) - SERIES_NAMES
        assert not unknown, f"{rule.get('record') or rule.get('alert')}: unknown metrics {unknown}"
    required = {
        "node_peer:ebpf_tcp_rtt_seconds:p50_rate5m": "histogram_quantile(0.5",
        "node_peer:ebpf_tcp_rtt_seconds:p99_rate5m": "histogram_quantile(0.99",
        "node_peer:ebpf_tcp_retransmits:rate5m": "ebpf_tcp_retransmits_total",
        "node_reason:ebpf_packet_drops:rate5m": "ebpf_packet_drops_total",
        "node:ebpf_runqueue_latency_seconds:p99_rate5m": "ebpf_runqueue_latency_seconds_bucket",
        "zone:ebpf_tcp_rtt_seconds:p99_rate5m": "histogram_quantile(0.99, sum by (zone, peer_zone, "
        "le) (rate(ebpf_zone_tcp_rtt_seconds_bucket[5m])))",
    }
    by_name = {r["record"]: " ".join(r["expr"].split()) for r in rules if "record" in r}
    for name, fragment in required.items():
        assert fragment in by_name[name], name
    for name in ("p50_rate5m", "p99_rate5m"):
        assert (
            "sum by (node, peer, le) (rate(ebpf_tcp_rtt_seconds_bucket[5m]))"
            in by_name[f"node_peer:ebpf_tcp_rtt_seconds:{name}"]
        )
    for alert in alerts:
        assert re.match(r"^[A-Z][A-Za-z0-9]+$", alert["alert"]), alert["alert"]
        assert alert["labels"]["severity"] in {"info", "warning", "critical"}, alert["alert"]
        assert {"summary", "description"} <= set(alert["annotations"]), alert["alert"]
    alert_names = {a["alert"] for a in alerts}
    assert {
        "EbpfTcpRttHigh",
        "EbpfTcpRetransmitRatioHigh",
        "EbpfPacketDropSurge",
        "EbpfTelemetryStale",
        "EbpfPeersOverflow",
        "EbpfCollectorDown",
        "EbpfBpfMisses",
        "EbpfTelemetryConfigReloadFailed",
    } <= alert_names
    stale = next(a for a in alerts if a["alert"] == "EbpfTelemetryStale")
    assert "> 3 * (" in stale["expr"] and "ebpf_telemetry_interval_seconds" in stale["expr"]


def test_rules_test_covers_every_rule() -> None:
    tests = load_yaml(RULES_TEST)
    assert tests["rule_files"] == [RULES.name]
    tested_exprs = " ".join(
        t["expr"] for group in tests["tests"] for t in group.get("promql_expr_test", [])
    )
    firing: set[str] = set()
    quiet: set[str] = set()
    for group in tests["tests"]:
        for t in group.get("alert_rule_test", []):
            (firing if t.get("exp_alerts") else quiet).add(t["alertname"])
    for rule in all_rules():
        if "record" in rule:
            assert re.search(rf"(?<![\w:]){re.escape(rule['record'])}(?![\w:])", tested_exprs), (
                f"recording rule {rule['record']} has no promql_expr_test"
            )
        else:
            assert rule["alert"] in firing, f"alert {rule['alert']} never tested firing"
            assert rule["alert"] in quiet, f"alert {rule['alert']} never tested quiet"


# --------------------------------------------------------------------------
# Scrape config


def promtool_accepts(promtool: str, config: dict[str, Any], directory: Path) -> tuple[bool, str]:
    path = directory / "prometheus.yml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    r = run([promtool, "check", "config", str(path)])
    return r.returncode == 0, r.stdout + r.stderr


def test_scrape_config_is_valid(tmp_path: Path) -> None:
    promtool = require(PROMTOOL_NAMES)
    cfg = load_yaml(SCRAPE)
    jobs = {job["job_name"]: job for job in cfg["scrape_configs"]}
    # The node_exporter job that EbpfTelemetryMissing watches, and the direct one.
    assert "node" in jobs and "ebpf-telemetry" in jobs
    assert all(t.endswith(":9100") for sc in jobs["node"]["static_configs"] for t in sc["targets"])
    missing = next(r for r in all_rules() if r.get("alert") == "EbpfTelemetryMissing")
    for name in jobs:
        assert re.search(rf"\b{re.escape(name)}\b", missing["expr"]), name
    # No target label may shadow the labels our series carry.
    for job in jobs.values():
        for rc in job.get("relabel_configs", []):
            assert rc.get("target_label") not in {"node", "peer", "reason", "quantile", "le"}
        for sc in job.get("static_configs", []):
            assert not set(sc.get("labels", {})) & {"node", "peer", "reason"}

    # Built from scrape.yml, with rule_files pointing at our rules.yml.
    cfg["rule_files"] = [str(RULES)]
    # Debian builds Prometheus without some service discoveries (kubernetes_sd
    # among them): check those jobs' shape here, and the rest with promtool.
    unsupported: list[str] = []
    for key in ("kubernetes_sd_configs",):
        probe = {"scrape_configs": [{"job_name": "probe", key: []}]}
        ok, _ = promtool_accepts(promtool, probe, tmp_path)
        if not ok and any(key in job for job in cfg["scrape_configs"]):
            unsupported.append(key)
    checked = dict(cfg)
    checked["scrape_configs"] = []
    for job in cfg["scrape_configs"]:
        if any(key in job for key in unsupported):
            for sd in job["kubernetes_sd_configs"]:
                assert sd["role"] in {"pod", "node", "endpoints", "endpointslice", "service"}
            for rc in job["relabel_configs"]:
                assert rc.get("action", "replace") in {"keep", "drop", "replace", "labelmap"}
                re.compile(rc.get("regex", "(.*)"))
        else:
            checked["scrape_configs"].append(job)
    ok, out = promtool_accepts(promtool, checked, tmp_path)
    assert ok and "SUCCESS" in out, out


# --------------------------------------------------------------------------
# Grafana dashboard


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return doc


def panels(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for p in doc["panels"]:
        yield p
        yield from p.get("panels", [])


GRAFANA_VARS = {
    "node": NODE,
    "peer": "node-b",
    "__rate_interval": "1m",
    "__interval": "1m",
    "__range": "1h",
    "__range_s": "3600",
    "__interval_ms": "60000",
}
VAR_RE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")


def substitute(expr: str) -> str:
    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        assert name in GRAFANA_VARS, f"unknown template variable ${name} in {expr!r}"
        return GRAFANA_VARS[name]

    return VAR_RE.sub(one, expr)


def dashboard_queries(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL with variables substituted) for every target and variable."""
    out: list[tuple[str, str]] = []
    for p in panels(doc):
        for t in p.get("targets", []):
            out.append((f"panel {p['title']!r} {t['refId']}", substitute(t["expr"])))
    for var in doc["templating"]["list"]:
        if var["type"] != "query":
            continue
        q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", q)
        assert m, f"variable {var['name']}: expected label_values(selector, label), got {q!r}"
        out.append((f"variable {var['name']}", substitute(m.group(1))))
    return out


def test_dashboard_structure() -> None:
    doc = dashboard()
    assert 36 <= doc["schemaVersion"] <= 41
    assert doc["uid"] and doc["title"]
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    for name in ("node", "peer"):
        v = variables[name]
        assert v["type"] == "query" and v["datasource"]["uid"] == "${datasource}"
        q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        assert q.startswith("label_values(") and q.rstrip().endswith(f", {name})")
    ids = [p["id"] for p in panels(doc)]
    assert len(ids) == len(set(ids))
    used: set[str] = set()
    for p in panels(doc):
        pos = p["gridPos"]
        assert {"h", "w", "x", "y"} <= set(pos) and pos["x"] + pos["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
            used |= metric_names(t["expr"])
            if p["type"] == "heatmap":
                assert t["format"] == "heatmap" and "_bucket" in t["expr"], p["title"]
                assert re.search(r"by \(le\)", t["expr"]), p["title"]
    assert not used - SERIES_NAMES, used - SERIES_NAMES
    assert {
        "ebpf_tcp_rtt_seconds_bucket",
        "ebpf_tcp_retransmits_total",
        "ebpf_packet_drops_total",
        "ebpf_runqueue_latency_seconds_bucket",
        "ebpf_cpu_utilization_ratio",
        "ebpf_telemetry_last_update_timestamp_seconds",
    } <= used
    heatmaps = [p for p in panels(doc) if p["type"] == "heatmap"]
    rtt_heatmap = next(
        p for p in heatmaps if "ebpf_tcp_rtt_seconds_bucket" in p["targets"][0]["expr"]
    )
    assert rtt_heatmap.get("repeat") == "peer", "the RTT heatmap is repeated per peer"
    assert rtt_heatmap["options"]["calculate"] is False


def test_dashboard_queries_accepted_by_prometheus() -> None:
    queries = dashboard_queries(dashboard())
    assert len(queries) >= 15
    with Prometheus([], binary=require(PROMETHEUS_NAMES)) as prom:
        errors = []
        for where, expr in queries:
            doc = prom.query_raw(expr)
            if doc.get("status") != "success":
                errors.append(f"{where}: {expr}\n  -> {doc.get('errorType')}: {doc.get('error')}")
        assert not errors, "\n".join(errors)
        # And the checker itself rejects what is not PromQL.
        with pytest.raises(QueryError):
            prom.query("sum by (le) (rate(ebpf_tcp_rtt_seconds_bucket[$__rate_interval]))")


# --------------------------------------------------------------------------
# Live: node_exporter serving our textfile, Prometheus scraping it with our rules.

RTT_P50_EXPR = "histogram_quantile(0.5, sum by (le) (rate(ebpf_tcp_rtt_seconds_bucket[30s])))"
# All 100 RTT samples of the second interval fall in (1024, 2048] us, none before:
# the median is interpolated half-way into that bucket.
EXPECTED_P50 = 0.001024 + 0.001024 * 0.5


@dataclass
class Live:
    textfile: Path
    node_exporter: NodeExporter
    prometheus: Prometheus
    p50: float


def finite_nonempty(result: Result) -> bool:
    return bool(result) and all(math.isfinite(v) for v in values(result))


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    textfile_dir = tmp_path_factory.mktemp("textfile")
    textfile = textfile_dir / TEXTFILE_NAME
    sample = Sample.first()
    write_sample(textfile, sample)
    with (
        NodeExporter(textfile_dir) as ne,
        Prometheus([ne.address], scrape_interval="1s", rule_files=[RULES]) as prom,
    ):
        # Two scrapes of the first interval, then the second one: rate() sees
        # the counts grow.
        prom.wait_for(
            "count_over_time(ebpf_tcp_rtt_seconds_count[1m])",
            lambda r: len(r) == 3 and min(values(r)) >= 2,
        )
        write_sample(textfile, sample.grow())
        result = prom.wait_for(RTT_P50_EXPR, finite_nonempty, timeout=30)
        yield Live(textfile, ne, prom, values(result)[0])


def test_node_exporter_serves_the_textfile(live: Live) -> None:
    families = {
        f.name: f for f in text_string_to_metric_families(live.node_exporter.metrics_text())
    }
    errors = [s.value for s in families["node_textfile_scrape_error"].samples]
    assert errors == [0.0]
    mtimes = [s.labels.get("file", "") for s in families["node_textfile_mtime_seconds"].samples]
    assert any(m.endswith(TEXTFILE_NAME) for m in mtimes), mtimes
    for name in COUNTERS:
        fam = families[name.removesuffix("_total")]
        assert fam.type == "counter" and fam.samples, name
        assert all(s.labels.get("node") == NODE for s in fam.samples), name
    for name in GAUGES:
        assert families[name].type == "gauge" and families[name].samples, name
    for name in HISTOGRAMS:
        fam = families[name]
        assert fam.type == "histogram", name
        les = [s.labels["le"] for s in fam.samples if s.name == f"{name}_bucket"]
        assert "1e-06" in les and "0.001024" in les and "+Inf" in les
    peers = {s.labels["peer"] for s in families["ebpf_tcp_rtt_seconds"].samples}
    assert peers == {"node-b", "10.0.0.7", "other"}
    info = families["ebpf_telemetry_build_info"].samples[0]
    assert info.value == 1 and set(info.labels) == {"node", "version", "kernel"}


def test_prometheus_answers_histogram_quantile(live: Live) -> None:
    assert live.p50 == pytest.approx(EXPECTED_P50, rel=1e-9)
    up = live.prometheus.query('up{job="node"}')
    assert values(up) == [1.0]
    # The series of all peers sum to the host's total.
    total = live.prometheus.query("sum(ebpf_tcp_rtt_seconds_count)")
    assert values(total) == [float(52 + 31 + 5 + 100)]


def test_recording_rules_on_live_data(live: Live) -> None:
    prom = live.prometheus
    p50 = prom.wait_for(
        'node_peer:ebpf_tcp_rtt_seconds:p50_rate5m{node="test-node",peer="node-b"}',
        finite_nonempty,
    )
    assert values(p50)[0] == pytest.approx(EXPECTED_P50, rel=1e-9)
    for name in (
        "node_peer:ebpf_tcp_rtt_seconds:p99_rate5m",
        "node:ebpf_tcp_rtt_seconds:p99_rate5m",
        "node_peer:ebpf_tcp_retransmits:rate5m",
        "node_reason:ebpf_packet_drops:rate5m",
        "node:ebpf_runqueue_latency_seconds:p99_rate5m",
    ):
        result = prom.wait_for(name, lambda r: bool(finite_values(r)))
        assert all(s["metric"]["node"] == NODE for s in result), name
    # zone-a -> zone-b is node-b: its 60 new samples all in (1024, 2048] us
    zone = prom.wait_for(
        'zone:ebpf_tcp_rtt_seconds:p99_rate5m{zone="zone-a",peer_zone="zone-b"}', finite_nonempty
    )
    assert values(zone)[0] == pytest.approx(0.001024 * (1 + 0.99), rel=1e-9)
    groups = prom.api("rules")["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) == len(all_rules())
    unhealthy = [
        (r["name"], r.get("lastError")) for r in rules if r["health"] not in {"ok", "unknown"}
    ]
    assert not unhealthy, unhealthy


def test_dashboard_queries_return_data(live: Live) -> None:
    prom = live.prometheus
    # Wait for the last-interval quantile gauges of a scraped sample to be in.
    prom.wait_for("ebpf_tcp_rtt_window_seconds", bool)
    empty = []
    for where, expr in dashboard_queries(dashboard()):
        if not prom.query(expr):
            empty.append(f"{where}: {expr}")
    assert not empty, "\n".join(empty)


# --------------------------------------------------------------------------
# Deployment


def unit_sections() -> dict[str, dict[str, str]]:
    parser = configparser.ConfigParser(
        interpolation=None, strict=True, delimiters=("=",), comment_prefixes=("#", ";")
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text(encoding="utf-8"))
    return {s: dict(parser[s]) for s in parser.sections()}


def test_systemd_unit_is_hardened() -> None:
    unit = unit_sections()
    svc = unit["Service"]
    assert svc["ExecStart"] == (
        "/opt/ebpf-telemetry/venv/bin/ebpf-telemetry run --config /etc/ebpf-telemetry/config.toml"
    )
    caps = {"CAP_BPF", "CAP_PERFMON", "CAP_SYS_ADMIN"}
    assert set(svc["CapabilityBoundingSet"].split()) == caps
    assert set(svc["AmbientCapabilities"].split()) == caps
    expected = {
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "MemoryDenyWriteExecute": "yes",
        "SystemCallArchitectures": "native",
        "Restart": "on-failure",
    }
    for key, value in expected.items():
        assert svc[key] == value, key
    assert set(svc["ReadWritePaths"].split()) == {
        "/var/lib/prometheus/node-exporter",
        "/sys/fs/bpf",
    }
    assert set(svc["RestrictAddressFamilies"].split()) == {
        "AF_UNIX",
        "AF_NETLINK",
        "AF_INET",
        "AF_INET6",
    }
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_security_doc_quotes_the_shipped_unit() -> None:
    """docs/security.md's unit lines are the shipped unit's, and the unit
    sets no memlock rlimit (the docs say none is needed)."""
    doc = (ROOT / "docs" / "security.md").read_text()
    quoted = re.search(r"\n    \[Service\]\n((?:    \S.*\n)+)", doc)
    assert quoted, "docs/security.md quotes no [Service] section"
    unit = unit_sections()["Service"]
    for line in quoted.group(1).splitlines():
        key, _, value = line.strip().partition("=")
        assert unit.get(key) == value, f"docs/security.md: {line.strip()!r} is not the unit's"
    assert "LimitMEMLOCK" not in unit


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = find_binary(["systemd-analyze"])
    if analyze is None:
        pytest.skip("systemd-analyze not found (Debian package systemd)")
    # verify insists that ExecStart's program exists: stand a stub in for the
    # venv that `make install` creates; everything else is the unit as shipped.
    stub = tmp_path / "opt" / "ebpf-telemetry" / "venv" / "bin" / "ebpf-telemetry"
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    text = UNIT.read_text(encoding="utf-8")
    original = "ExecStart=/opt/ebpf-telemetry/venv/bin/ebpf-telemetry "
    assert original in text
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(original, f"ExecStart={stub} "))
    r = run([analyze, "verify", "--man=no", str(copy)], cwd=tmp_path)
    ours = [line for line in (r.stdout + r.stderr).splitlines() if "ebpf-telemetry" in line]
    assert r.returncode == 0 and not ours, r.stdout + r.stderr


def test_daemonset_manifest() -> None:
    docs = load_yaml_all(DAEMONSET)
    kinds = {d["kind"]: d for d in docs}
    ds = kinds["DaemonSet"]
    assert ds["apiVersion"] == "apps/v1"
    assert ds["metadata"]["namespace"] == "monitoring"
    pod = ds["spec"]["template"]["spec"]
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pod["hostNetwork"] is True and "hostPID" not in pod
    assert {"operator": "Exists"} in pod["tolerations"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    containers = {c["name"]: c for c in pod["containers"]}
    agent, exporter = containers["ebpf-telemetry"], containers["node-exporter"]

    sc = agent["securityContext"]
    assert sc["privileged"] is False
    assert set(sc["capabilities"]["add"]) == {"BPF", "PERFMON", "SYS_ADMIN"}
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sc.get("allowPrivilegeEscalation") is not False  # always true with SYS_ADMIN
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    host_paths = {
        m["mountPath"]: volumes[m["name"]]["hostPath"]["path"]
        for m in agent["volumeMounts"]
        if "hostPath" in volumes[m["name"]]
    }
    assert host_paths == {
        "/sys/fs/bpf": "/sys/fs/bpf",
        "/sys/kernel/tracing": "/sys/kernel/tracing",
        "/sys/kernel/btf": "/sys/kernel/btf",
    }
    assert mounts["/sys/kernel/tracing"]["readOnly"] is True
    assert mounts["/sys/kernel/btf"]["readOnly"] is True
    # Bidirectional propagation is only allowed in a privileged container
    # (API validation): the unprivileged agent sees the host's bpffs
    # (HostToContainer); the privileged init container mounts it if needed.
    assert mounts["/sys/fs/bpf"]["mountPropagation"] == "HostToContainer"
    init = {c["name"]: c for c in pod.get("initContainers", [])}["mount-bpffs"]
    init_mount = next(m for m in init["volumeMounts"] if m["mountPath"] == "/sys/fs/bpf")
    assert init_mount["mountPropagation"] == "Bidirectional"
    assert init["securityContext"]["privileged"] is True
    for c in [*pod["containers"], *pod.get("initContainers", [])]:
        for m in c.get("volumeMounts", []):
            if m.get("mountPropagation") == "Bidirectional":
                assert c["securityContext"].get("privileged") is True, c["name"]

    # The textfile directory is shared with the node-exporter sidecar.
    textfile_mount = next(m for m in agent["volumeMounts"] if m["name"] == "textfile")
    assert "emptyDir" in volumes["textfile"]
    assert exporter["image"].startswith("quay.io/prometheus/node-exporter")
    args = exporter["args"]
    directory = next(
        a.split("=", 1)[1] for a in args if a.startswith("--collector.textfile.directory=")
    )
    exporter_mount = next(m for m in exporter["volumeMounts"] if m["name"] == "textfile")
    assert exporter_mount["mountPath"] == directory
    assert "--collector.textfile" in args
    listen = next(a.split("=", 1)[1] for a in args if a.startswith("--web.listen-address="))
    port = int(listen.rsplit(":", 1)[1])
    assert any(p["containerPort"] == port for p in exporter["ports"])
    assert not any(p["containerPort"] == 9100 for p in exporter["ports"]), "9100 is node_exporter's"

    for c in pod["containers"]:
        res = c["resources"]
        assert {"cpu", "memory"} <= set(res["requests"]) and {"cpu", "memory"} <= set(res["limits"])

    # The agent's config: the ConfigMap, read by the agent's own loader, and
    # a textfile path inside the shared directory.
    cm = kinds["ConfigMap"]
    config_volume = volumes["config"]["configMap"]["name"]
    assert cm["metadata"]["name"] == config_volume
    assert cm["metadata"]["namespace"] == "monitoring"
    cfg = load_agent_config(cm["data"]["config.toml"])
    assert Path(cfg.textfile).parent == Path(textfile_mount["mountPath"])
    config_arg = next(a for a in agent["args"] if a.startswith("--config="))
    config_mount = next(m for m in agent["volumeMounts"] if m["name"] == "config")
    assert Path(config_arg.split("=", 1)[1]).parent == Path(config_mount["mountPath"])


def load_agent_config(text: str) -> Any:
    config = pytest.importorskip("ebpf_telemetry.config")
    return config.from_mapping(tomllib.loads(text), "test")


def test_example_config_loads() -> None:
    text = CONFIG.read_text(encoding="utf-8")
    cfg = load_agent_config(text)
    assert cfg.textfile == "/var/lib/prometheus/node-exporter/ebpf_telemetry.prom"
    assert cfg.pin_dir == "/sys/fs/bpf/ebpf_telemetry"
    assert cfg.interval_seconds == 5
    assert cfg.peers and "other" not in cfg.peers
    # Every key the agent knows is shown, set or commented out.
    for key in (
        "node_name",
        "interval_seconds",
        "pin_dir",
        "textfile",
        "listen",
        "sample_rate",
        "max_peers",
        "peers",
    ):
        assert re.search(rf"^#?\s*\[?{key}\]?\b", text, re.MULTILINE), key


def test_deploy_doc_names_the_assets() -> None:
    text = DEPLOY_DOC.read_text(encoding="utf-8")
    for needle in (
        "docs/prometheus/rules.yml",
        "docs/prometheus/scrape.yml",
        "docs/grafana/ebpf-telemetry.json",
        "deploy/ebpf-telemetry.service",
        "deploy/daemonset.yaml",
        "ebpf-telemetry unload",
        "histogram_quantile",
    ):
        assert needle in text, needle
