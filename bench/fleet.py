"""Fleet simulation (issue 17 item 6): `make bench-fleet` (bench/fleet.py).

F synthetic nodes, each with P peers (default 1,000) in 6 zones, export
through the REAL export code: one `metrics.TelemetryCollector` per node, fed
a `snapshot.Window` of two synthetic Snapshots through update(), rendered by
prometheus_client's generate_latest. A small HTTP server on 127.0.0.1 serves
the F expositions (one port, one path per node; a target per node). ONE real
Prometheus (the Makefile's, started by tests/promstack.py) scrapes them with
the shipped rules (docs/prometheus/rules.yml). Measured: samples per node,
Prometheus head series and RSS, rule group evaluation time, the zone-pair p99
against the synthetic truth, and whether each node's worst peers (the
retransmitting, then the slow ones) were among those exported.

MOCKED: only the kernel's snapshots (what `snapshot.take` reads from the
pinned maps): `synthetic_snapshot` builds them, the ONE place to adapt when
the snapshot's layout changes. Each peer's RTT is log-normal with a known
median (by zone pair and a per-peer jitter, 20 ms for 5 slow peers a node;
3 peers retransmit); its histogram slots hold the expected count of each
slot (round k: k times a round's samples), so counters advance every round
and the truth is the exact quantile of the known mixture. Nothing touches
the kernel (no lock needed); run it with `nice -n 10`.

60 template nodes are rendered by their own collector (in a child process,
so that rendering does not starve the server's threads); node i has the
inputs of node i % 60 and serves its template's text with the node label
renamed; `check_copy` renders one such node with its own collector and
compares. Rounds: node i's round k is published only once Prometheus has
scraped its round k-1 whole, so every round is ingested whatever rendering
costs.

    bench/fleet.py [--nodes F ...] [--detail quantiles|histogram|none ...]
                   [--peers P] [--rounds K] [--scrape-interval S]
                   [--rtt-buckets pow2|pow2x2|all] [--max-series N]
                   [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import http.server
import json
import logging
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from report import Report, fmt

from ebpf_telemetry.config import Config, ConfigError
from ebpf_telemetry.cputime import CpuTime
from ebpf_telemetry.histogram import EDGE_SCHEMES, MAX_SLOTS, slot_lower, slot_upper
from ebpf_telemetry.metrics import TelemetryCollector
from ebpf_telemetry.naming import Zones
from ebpf_telemetry.snapshot import HOST, Snapshot, Window
from ebpf_telemetry.values import STATS, Hist, NodeMetrics
from promstack import Prometheus, StackError, http_get, poll

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "docs" / "prometheus" / "rules.yml"
ZONE_RULE = "zone:ebpf_tcp_rtt_seconds:p99_rate5m"

# --- the synthetic fleet -----------------------------------------------------
ZONES = tuple(f"zone-{c}" for c in "abcdef")
SIGMA = 0.25  # log-normal shape of every peer: p99 = 1.79 x median
SAME_ZONE_US = 200.0  # median RTT within a zone
CROSS_ZONE_US = 800.0  # ... to the next zone, + STEP_US per zone further
STEP_US = 300.0
JITTER = (0.8, 0.9, 1.0, 1.1, 1.25)  # per-peer factor on the zone pair's median
SLOW_US = 20_000.0  # median of a slow peer (a congested path), whatever its zone
SLOW_PER_NODE = 5
RETRANS_PER_NODE = 3
SAMPLES_PER_ROUND = (200, 400, 600)  # RTT samples per peer per round, by peer
ROUND_SECONDS = 5.0  # the synthetic agent interval (snapshot clocks)
WALL0 = 1.8e9  # the snapshots' Unix time at round 0


@dataclass(frozen=True)
class Peer:
    name: str
    zone: str
    median_us: float
    per_round: int  # RTT samples per round
    retrans_per_round: int
    slow: bool


@dataclass(frozen=True)
class Node:
    index: int
    name: str
    zone: str
    peers: tuple[Peer, ...]

    @property
    def worst(self) -> frozenset[str]:
        """The peers a budget must export first: retransmitting, then slow."""
        return frozenset(p.name for p in self.peers if p.retrans_per_round or p.slow)


def zone_median_us(a: int, b: int) -> float:
    return SAME_ZONE_US if a == b else CROSS_ZONE_US + STEP_US * (abs(a - b) - 1)


TEMPLATES = 60  # distinct nodes (a multiple of the zones); node i is like node i % 60


def make_node(i: int, npeers: int, templates: int = TEMPLATES) -> Node:
    """Node i of the fleet: its zone, its peers and their known RTT (those of
    node i % templates: nodes with the same inputs export the same samples)."""
    name, i = f"node-{i:05d}", i % templates
    own = i % len(ZONES)
    slow = {(i * 37 + s * 199) % npeers for s in range(min(SLOW_PER_NODE, npeers))}
    retrans_ids = [(i * 53 + s * 331 + 7) % npeers for s in range(RETRANS_PER_NODE)]
    retrans = {j: 5 + s for s, j in enumerate(retrans_ids) if j not in slow}
    peers = []
    for j in range(npeers):
        z = j % len(ZONES)
        median = zone_median_us(own, z) * JITTER[(i * 7 + j * 13) % len(JITTER)]
        peers.append(
            Peer(
                name=f"peer-{j:04d}",
                zone=ZONES[z],
                median_us=SLOW_US * JITTER[j % len(JITTER)] if j in slow else median,
                per_round=SAMPLES_PER_ROUND[j % len(SAMPLES_PER_ROUND)],
                retrans_per_round=retrans.get(j, 0),
                slow=j in slow,
            )
        )
    return Node(int(name[5:]), name, ZONES[own], tuple(peers))


def _lognormal_cdf(x: float, median: float) -> float:
    if x <= 0:
        return 0.0
    return 0.5 * math.erfc(-math.log(x / median) / (SIGMA * math.sqrt(2)))


@functools.cache
def _slot_probs(median_us: float) -> tuple[float, ...]:
    """P(an RTT sample lands in slot s): slot s holds [lower(s), upper(s)) us."""
    probs = [
        _lognormal_cdf(slot_upper(s), median_us) - _lognormal_cdf(slot_lower(s), median_us)
        for s in range(MAX_SLOTS - 1)
    ]
    return (*probs, 1.0 - _lognormal_cdf(slot_lower(MAX_SLOTS - 1), median_us))


@functools.cache
def _cum_hist(median_us: float, per_round: int, k: int) -> Hist:
    """A peer's cumulative slots after k rounds (expected counts, rounded)."""
    n = k * per_round
    return Hist(tuple(int(n * p + 0.5) for p in _slot_probs(median_us)))


def _mean_us(median_us: float) -> float:
    return median_us * math.exp(SIGMA * SIGMA / 2)


def _sum_hists(weighted: Counter[Hist]) -> Hist:
    slots = [0] * MAX_SLOTS
    for h, times in weighted.items():
        for s, c in enumerate(h.slots):
            if c:
                slots[s] += c * times
    return Hist(tuple(slots))


def synthetic_snapshot(node: Node, k: int) -> Snapshot:
    """What `snapshot.take` would read on `node` after round k: the one mock.

    Peer ids 1..P; node id 0 (HOST) is the sum of all peers."""
    hists: dict[int, Hist] = {}
    metrics: dict[int, NodeMetrics] = {}
    host = Counter[Hist]()
    rtt_sum = rtt_count = retrans = 0
    for j, p in enumerate(node.peers, start=1):
        h = _cum_hist(p.median_us, p.per_round, k)
        m = NodeMetrics(
            rtt_sum=int(k * p.per_round * _mean_us(p.median_us)),
            rtt_count=h.count,
            retrans_count=k * p.retrans_per_round,
            timestamp=k,
        )
        hists[j], metrics[j] = h, m
        host[h] += 1
        rtt_sum += m.rtt_sum
        rtt_count += m.rtt_count
        retrans += m.retrans_count
    hists[HOST] = _sum_hists(host)
    runq = _cum_hist(20.0, 1000, k)
    metrics[HOST] = NodeMetrics(
        rtt_sum=rtt_sum,
        rtt_count=rtt_count,
        retrans_count=retrans,
        runqlat_sum=int(k * 1000 * _mean_us(20.0)),
        runqlat_count=runq.count,
        timestamp=k,
    )
    return Snapshot(
        monotonic=k * ROUND_SECONDS,
        wall=WALL0 + k * ROUND_SECONDS,
        hists=hists,
        metrics=metrics,
        stats=dict.fromkeys(STATS, 0),
        peers={j: p.name for j, p in enumerate(node.peers, start=1)},
        runqlat=runq,
        drops={},
        cpu=CpuTime(idle_ns=k * 10**10, busy_ns=k * 10**9),
        misses={},
        seen={},
        boottime_ns=int(k * ROUND_SECONDS * 1e9),
        max_peers=len(node.peers) + 1,
    )


def truth_p99(nodes: Sequence[Node]) -> dict[tuple[str, str], float]:
    """(zone, peer_zone) -> p99 of all RTT samples between them, seconds:
    the quantile of the mixture of the peers' log-normals, by bisection."""
    mix: dict[tuple[str, str], Counter[float]] = {}
    for node in nodes:
        for p in node.peers:
            mix.setdefault((node.zone, p.zone), Counter())[p.median_us] += p.per_round
    return {pair: _mixture_quantile(0.99, weights) * 1e-6 for pair, weights in mix.items()}


def _mixture_quantile(q: float, weights: Counter[float]) -> float:
    total = sum(weights.values())

    def cdf(x: float) -> float:
        return sum(w * _lognormal_cdf(x, m) for m, w in weights.items()) / total

    lo, hi = min(weights) / 10, max(weights) * 10
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if cdf(mid) < q else (lo, mid)
    return math.sqrt(lo * hi)


# --- one node's export: the real collector -------------------------------------
class NodeExport:
    """One node's agent, as far as exporting goes: its collector and registry."""

    def __init__(self, node: Node, cfg: Config) -> None:
        self.node = node
        self.collector = TelemetryCollector(cfg)
        zones = {p.name: p.zone for p in node.peers}
        self.collector.configure(cfg, Zones(node.zone, zones))
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)

    def render(self, k: int) -> bytes:
        """The exposition after round k (the window: rounds k-1 to k)."""
        prev, cur = synthetic_snapshot(self.node, k - 1), synthetic_snapshot(self.node, k)
        self.collector.update(Window(prev, cur), 0.001)
        return generate_latest(self.registry)


def node_config(
    node: Node, detail: str, max_series: int | None, rtt_buckets: str = Config.rtt_buckets
) -> Config:
    """The agent config of a node: the defaults, its name and zone, and the
    series budget when this release has one."""
    kw: dict[str, Any] = {"node_name": node.name, "zone": node.zone, "rtt_buckets": rtt_buckets}
    have = {f.name for f in dataclasses.fields(Config)}
    if "peer_detail" in have:
        kw["peer_detail"] = detail
    if "max_series" in have and max_series is not None:
        kw["max_series"] = max_series
    return dataclasses.replace(Config(), **kw)


def has_budget() -> bool:
    return {"peer_detail", "max_series"} <= {f.name for f in dataclasses.fields(Config)}


# --- serving F targets -----------------------------------------------------------
class Targets:
    """The latest exposition of each node, and which round Prometheus last took."""

    def __init__(self, n: int) -> None:
        self.texts: list[bytes] = [b""] * n
        self.rounds = [0] * n  # round of texts[i]
        self.served = [0] * n  # round last served whole
        self.failed = 0  # responses that could not be sent (scrape timeouts)
        self.lock = threading.Lock()

    def publish(self, i: int, k: int, text: bytes) -> None:
        with self.lock:
            self.texts[i], self.rounds[i] = text, k

    def take(self, i: int) -> tuple[int, bytes]:
        with self.lock:
            return self.rounds[i], self.texts[i]

    def sent(self, i: int, k: int) -> None:
        """Prometheus received node i's round k whole."""
        with self.lock:
            self.served[i] = max(self.served[i], k)

    def wait_served(self, i: int, k: int) -> None:
        """Until Prometheus has scraped node i's round k (or a later one)."""
        if self.served[i] < k:
            poll(lambda: self.served[i] >= k, 600, f"a scrape of node {i}'s round {k}")

    def all_served(self, k: int) -> bool:
        with self.lock:
            return min(self.served) >= k


def serve(targets: Targets) -> http.server.ThreadingHTTPServer:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            parts = urllib.parse.urlsplit(self.path).path.strip("/").split("/")
            if len(parts) != 2 or parts[0] != "node" or not parts[1].isdigit():
                self.send_error(404)
                return
            i = int(parts[1])
            if i >= len(targets.texts):
                self.send_error(404)
                return
            k, body = targets.take(i)
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
            targets.sent(i, k)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 1024

        def handle_error(self, request: Any, client_address: Any) -> None:
            targets.failed += 1  # a scrape that timed out: it is not counted as served

    server = Server(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class FleetPrometheus(Prometheus):
    """One target per node: the same port, path /node/<i>, instance = node name."""

    def __init__(self, port: int, nodes: Sequence[Node], interval: str) -> None:
        super().__init__([], scrape_interval=interval, rule_files=[RULES], job="fleet")
        self.fleet_port, self.nodes = port, nodes

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        groups = [
            {
                "targets": [f"127.0.0.1:{self.fleet_port}"],
                "labels": {
                    "__metrics_path__": f"/node/{n.index}",
                    "instance": n.name,
                    "node_zone": n.zone,
                },
            }
            for n in self.nodes
        ]
        cfg["scrape_configs"] = [{"job_name": "fleet", "static_configs": groups}]
        return cfg

    def query(self, expr: str, at: float | None = None) -> Any:
        """An instant query with room for a million series (promstack's 10 s is not)."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        status, body = http_get(url, timeout=300.0)
        doc = json.loads(body)
        if doc.get("status") != "success":
            raise StackError(f"query {expr!r} answered {status}: {doc.get('error')}")
        return doc["data"]["result"]

    def own_metrics(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        _, body = http_get(self.url + "/metrics", timeout=30.0)
        out: dict[str, list[tuple[dict[str, str], float]]] = {}
        for fam in text_string_to_metric_families(body.decode()):
            for s in fam.samples:
                out.setdefault(s.name, []).append((s.labels, s.value))
        return out


# --- one run -----------------------------------------------------------------------
@dataclass(frozen=True)
class FleetResult:
    nodes: int
    peers: int
    peer_detail: str
    max_series: int | None
    rtt_buckets: str
    budget: bool  # this release has max_series / peer_detail
    rounds: int
    scrape_interval_s: float
    seconds: float
    render_ms_per_node: float
    collectors: int  # nodes rendered by their own collector; the rest are renamed copies
    copies_equal: bool | None  # a copy equals what its own collector renders
    scrapes_failed: int  # responses Prometheus gave up on (timeouts)
    samples_per_node: float  # lines of node 0's exposition
    scraped_samples_mean: float  # Prometheus' scrape_samples_scraped, all targets
    head_series: float
    prometheus_rss_mb: float
    rule_eval_ms: dict[str, float]  # rule group -> last duration
    slowest_rules_ms: dict[str, float]  # the 3 slowest rules -> last duration
    zone_source: str  # what the zone-pair p99 was read from
    zone_pairs: int
    zone_p99_err_max_pct: float | None
    zone_p99_err_mean_pct: float | None
    worst_exported_nodes: int  # nodes whose every worst peer was exported
    peers_exported_mean: float


def count_samples(text: bytes) -> int:
    return sum(1 for line in text.splitlines() if line and not line.startswith(b"#"))


def renamed(text: bytes, template: Node, node: Node) -> bytes:
    """A template's exposition as `node` would export it: only the node label
    differs (names of the same length; see check_copy)."""
    return text.replace(f'node="{template.name}"'.encode(), f'node="{node.name}"'.encode())


class Renderer:
    """The template nodes' collectors, in a child process: rendering holds
    the GIL for seconds, which would starve the server's threads (scrapes
    time out). Forked before any thread starts."""

    def __init__(self, nodes: Sequence[Node], cfgs: Sequence[Config]) -> None:
        ctx = multiprocessing.get_context("fork")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_render_loop, args=(child, nodes, cfgs), daemon=True)
        self.proc.start()
        child.close()

    def render(self, k: int) -> tuple[list[bytes], float]:
        """Every template's exposition after round k; seconds spent rendering."""
        self.conn.send(k)
        texts, seconds = self.conn.recv()
        return texts, seconds

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


def _render_loop(conn: Connection, nodes: Sequence[Node], cfgs: Sequence[Config]) -> None:
    exports = [NodeExport(n, c) for n, c in zip(nodes, cfgs, strict=True)]
    while (k := conn.recv()) is not None:
        t = time.perf_counter()
        texts = [e.render(k) for e in exports]
        conn.send((texts, time.perf_counter() - t))


def run_rounds(
    renderer: Renderer, nodes: Sequence[Node], templates: int, targets: Targets, rounds: int
) -> float:
    """Publish rounds 1..rounds, each to a node once its previous round was
    scraped: the real collector of each template renders it; the nodes that
    share the template get its text renamed. Mean ms per render."""
    spent = 0.0
    for k in range(1, rounds + 1):
        texts, seconds = renderer.render(k)
        spent += seconds
        for n in nodes:
            template = nodes[n.index % templates]
            targets.wait_served(n.index, k - 1)
            targets.publish(n.index, k, renamed(texts[template.index], template, n))
        print(f"fleet: round {k}/{rounds} published", file=sys.stderr, flush=True)
    poll(lambda: targets.all_served(rounds), 600, "the last round's scrapes")
    return 1000 * spent / (rounds * templates)


VOLATILE = (b"ebpf_config_last_reload_success_timestamp_seconds",)


def check_copy(nodes: Sequence[Node], cfg: Config, targets: Targets, rounds: int) -> bool | None:
    """Does the real collector of a renamed node (the last) render, round after
    round, what was served for it? None when every node was rendered."""
    node = nodes[-1]
    if node.index < TEMPLATES:
        return None
    e = NodeExport(node, dataclasses.replace(cfg, node_name=node.name))
    text = b""
    for k in range(1, rounds + 1):
        text = e.render(k)

    def stable(t: bytes) -> list[bytes]:
        return [line for line in t.splitlines() if not line.startswith(VOLATILE)]

    return stable(text) == stable(targets.texts[node.index])


def wait_rules(prom: Prometheus, after: float) -> tuple[dict[str, float], dict[str, float]]:
    """Wait until every rule group evaluated after `after` (Unix time); the
    groups' last evaluation durations, and the slowest 3 rules', ms."""

    def groups() -> list[dict[str, Any]]:
        g: list[dict[str, Any]] = prom.api("rules")["data"]["groups"]
        return g

    def evaluated() -> bool:
        for g in groups():
            last = g.get("lastEvaluation", "")
            if not last or last.startswith("0001"):
                return False
            if _rfc3339(last) < after:
                return False
        return True

    poll(evaluated, 300, "a rule evaluation after the last scrape", interval=0.5)
    done = groups()
    rules = {
        str(r.get("name")): 1000 * float(r.get("evaluationTime", 0.0))
        for g in done
        for r in g.get("rules", [])
    }
    slowest = dict(sorted(rules.items(), key=lambda kv: -kv[1])[:3])
    return {g["name"]: 1000 * float(g.get("evaluationTime", 0.0)) for g in done}, slowest


def _rfc3339(s: str) -> float:
    from datetime import datetime

    # Prometheus writes nanoseconds; datetime takes microseconds
    head, _, rest = s.partition(".")
    frac = "".join(c for c in rest if c.isdigit())[:6]
    tz = rest.lstrip("0123456789") or "Z"
    iso = f"{head}.{frac or '0'}{'+00:00' if tz == 'Z' else tz}"
    return datetime.fromisoformat(iso).timestamp()


def zone_p99(prom: Prometheus) -> tuple[str, dict[tuple[str, str], float]]:
    """Zone-pair p99 as Prometheus has it: the shipped recording rule, or
    (rules without it) the same from the zone families, or (a release without
    zone families) from the per-peer histograms."""
    if ZONE_RULE in RULES.read_text():
        return ZONE_RULE, _by_zone(prom.query(ZONE_RULE), "zone")
    expr = (
        "histogram_quantile(0.99, sum by (zone, peer_zone, le) "
        "(rate(ebpf_zone_tcp_rtt_seconds_bucket[5m])))"
    )
    rows = prom.query(expr)
    if rows:
        return "ebpf_zone_tcp_rtt_seconds (no zone rule in rules.yml)", _by_zone(rows, "zone")
    expr = (
        "histogram_quantile(0.99, sum by (node_zone, peer_zone, le) "
        "(rate(ebpf_tcp_rtt_seconds_bucket[5m])))"
    )
    rows = prom.query(expr)
    return "per-peer histograms (no zone families)", _by_zone(rows, "node_zone")


def _by_zone(rows: Any, own: str) -> dict[tuple[str, str], float]:
    return {
        (r["metric"].get(own, ""), r["metric"].get("peer_zone", "")): float(r["value"][1])
        for r in rows
    }


def exported_peers(prom: Prometheus) -> dict[str, set[str]]:
    # every peer_detail but "none" exports it for each exported peer
    rows = prom.query("group by (node, peer) (ebpf_tcp_retransmits_total)")
    out: dict[str, set[str]] = {}
    for r in rows:
        out.setdefault(r["metric"].get("node", ""), set()).add(r["metric"].get("peer", ""))
    return out


def run_fleet(
    nnodes: int,
    npeers: int = 1000,
    detail: str = "quantiles",
    max_series: int | None = None,
    rounds: int = 4,
    scrape_interval: float = 5.0,
    rtt_buckets: str = Config.rtt_buckets,
) -> FleetResult:
    """F nodes scraped by one Prometheus for `rounds` rounds; its figures."""
    t0 = time.monotonic()
    nodes = [make_node(i, npeers) for i in range(nnodes)]
    cfgs = [node_config(n, detail, max_series, rtt_buckets) for n in nodes[:TEMPLATES]]
    NodeExport(nodes[0], cfgs[0])  # a config the collector refuses: ConfigError here
    renderer = Renderer(nodes[:TEMPLATES], cfgs)
    targets = Targets(nnodes)
    server = serve(targets)
    try:
        with FleetPrometheus(server.server_address[1], nodes, f"{scrape_interval:g}s") as prom:
            render_ms = run_rounds(renderer, nodes, len(cfgs), targets, rounds)
            rule_ms, slowest = wait_rules(prom, time.time())
            result = measure(prom, nodes, targets, render_ms, rule_ms)
            same = check_copy(nodes, cfgs[-1], targets, rounds)
    finally:
        renderer.close()
        server.shutdown()
        server.server_close()
    return dataclasses.replace(
        result,
        peer_detail=detail,
        max_series=max_series,
        rtt_buckets=rtt_buckets,
        rounds=rounds,
        slowest_rules_ms=slowest,
        collectors=len(cfgs),
        scrapes_failed=targets.failed,
        copies_equal=same,
        scrape_interval_s=scrape_interval,
        seconds=time.monotonic() - t0,
    )


def measure(
    prom: FleetPrometheus,
    nodes: Sequence[Node],
    targets: Targets,
    render_ms: float,
    rule_ms: dict[str, float],
) -> FleetResult:
    own = prom.own_metrics()

    def one(name: str) -> float:
        return sum(v for _, v in own.get(name, []))

    scraped = prom.query('avg(scrape_samples_scraped{job="fleet"})')
    source, measured = zone_p99(prom)
    truth = truth_p99(nodes)
    errs = [
        100 * abs(measured[pair] - t) / t
        for pair, t in truth.items()
        if pair in measured and math.isfinite(measured[pair])
    ]
    exported = exported_peers(prom)
    samples = [count_samples(t) for t in targets.texts]
    return FleetResult(
        nodes=len(nodes),
        peers=len(nodes[0].peers),
        peer_detail="",
        max_series=None,
        rtt_buckets="",
        budget=has_budget(),
        rounds=0,
        scrape_interval_s=0.0,
        seconds=0.0,
        render_ms_per_node=render_ms,
        collectors=0,
        copies_equal=None,
        scrapes_failed=0,
        samples_per_node=sum(samples) / len(samples),
        scraped_samples_mean=float(scraped[0]["value"][1]) if scraped else 0.0,
        head_series=one("prometheus_tsdb_head_series"),
        prometheus_rss_mb=one("process_resident_memory_bytes") / 2**20,
        rule_eval_ms=rule_ms,
        slowest_rules_ms={},
        zone_source=source,
        zone_pairs=len(errs),
        zone_p99_err_max_pct=max(errs) if errs else None,
        zone_p99_err_mean_pct=sum(errs) / len(errs) if errs else None,
        worst_exported_nodes=sum(1 for n in nodes if n.worst <= exported.get(n.name, set())),
        peers_exported_mean=sum(len(v) for v in exported.values()) / max(len(nodes), 1),
    )


# --- the report ----------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    nodes: int
    detail: str
    scrape_interval: float = 5.0


CASES = (Case(100, "quantiles"), Case(1000, "quantiles", 15.0), Case(100, "histogram"))
QUICK_CASES = (Case(20, "quantiles"), Case(20, "histogram"))
EXTRAPOLATE_TO = 10_000


def extrapolate(results: Sequence[FleetResult], nodes: int) -> dict[str, float] | None:
    """Head series and Prometheus RSS at `nodes`, linear in the node count
    through the two largest runs of the same detail (per-node series are
    bounded by max_series, so both grow with nodes)."""
    runs = sorted(results, key=lambda r: r.nodes)[-2:]
    if len(runs) < 2 or runs[0].nodes == runs[1].nodes:
        return None
    a, b = runs
    per_node_series = (b.head_series - a.head_series) / (b.nodes - a.nodes)
    per_series_mb = (b.prometheus_rss_mb - a.prometheus_rss_mb) / max(
        b.head_series - a.head_series, 1.0
    )
    series = b.head_series + per_node_series * (nodes - b.nodes)
    return {
        "nodes": nodes,
        "series_per_node": per_node_series,
        "head_series": series,
        "prometheus_rss_mb": b.prometheus_rss_mb + per_series_mb * (series - b.head_series),
        "kib_per_series": 1024 * per_series_mb,
    }


def add_to_report(r: Report, results: Sequence[FleetResult]) -> None:
    s = "5. fleet simulation (real collector, synthetic snapshots, one real Prometheus)"
    for x in results:
        budget = f"max_series {fmt(x.max_series, 'd') if x.max_series else 'default'}"
        if not x.budget:
            budget = "no series budget in this release"
        r.row(
            s,
            f"F={x.nodes:<5} {x.peers} peers, {x.peer_detail}, {x.rtt_buckets}",
            f"{x.samples_per_node:,.0f} samples/node ({budget}); head series "
            f"{x.head_series:,.0f}; Prometheus RSS {x.prometheus_rss_mb:,.0f} MB; rules "
            + ", ".join(f"{g} {ms:.0f} ms" for g, ms in x.rule_eval_ms.items()),
        )
        r.row(
            s,
            f"F={x.nodes:<5} zone-pair p99 vs truth",
            f"{x.zone_pairs} pairs: error mean {fmt(x.zone_p99_err_mean_pct, '.1f', '%')}, "
            f"max {fmt(x.zone_p99_err_max_pct, '.1f', '%')} ({x.zone_source})",
        )
        r.row(
            s,
            f"F={x.nodes:<5} worst peers exported",
            f"{x.worst_exported_nodes}/{x.nodes} nodes had all their "
            f"{RETRANS_PER_NODE + SLOW_PER_NODE} worst peers exported "
            f"({x.peers_exported_mean:.0f} peers/node exported); "
            f"{x.seconds:.0f} s, render {x.render_ms_per_node:.0f} ms/node",
        )
        r.row(
            s,
            f"F={x.nodes:<5} collectors run",
            f"{x.collectors} (the other nodes: a template's exposition renamed; "
            f"equal to their own collector's: {x.copies_equal}); "
            f"{x.scrapes_failed} responses not taken (scrape timeouts)",
        )
        r.row(
            s,
            f"F={x.nodes:<5} slowest rules",
            ", ".join(f"{name} {ms:.0f} ms" for name, ms in x.slowest_rules_ms.items()),
        )
    quant = [x for x in results if x.peer_detail == "quantiles"]
    ex = extrapolate(quant, EXTRAPOLATE_TO)
    if ex is not None:
        r.add("fleet_extrapolated", ex)
        r.row(
            s,
            f"F={EXTRAPOLATE_TO:,} (extrapolated)",
            f"{ex['series_per_node']:,.0f} series/node, head series {ex['head_series']:,.0f}, "
            f"Prometheus RSS {ex['prometheus_rss_mb'] / 1024:,.1f} GiB "
            f"({ex['kib_per_series']:.1f} KiB/series)",
        )
    for x in quant:
        r.target(f"fleet zone-pair p99 error F={x.nodes}", x.zone_p99_err_max_pct, "%", 5.0)
    for x in results:
        r.target(
            f"fleet worst peers missing F={x.nodes} {x.peer_detail}",
            float(x.nodes - x.worst_exported_nodes),
            "nodes",
            0.0,
        )


def run(
    r: Report,
    cases: Sequence[Case],
    npeers: int = 1000,
    rounds: int = 4,
    rtt_buckets: str = Config.rtt_buckets,
    max_series: int | None = None,
) -> None:
    """Each case in turn (a fresh Prometheus each), into r."""
    results = []
    for c in cases:
        print(f"fleet: F={c.nodes} {c.detail} ...", file=sys.stderr, flush=True)
        x = run_fleet(c.nodes, npeers, c.detail, max_series, rounds, c.scrape_interval, rtt_buckets)
        results.append(x)
        print(f"fleet: {json.dumps(dataclasses.asdict(x))}", file=sys.stderr, flush=True)
    r.add("fleet", results)
    add_to_report(r, results)


def quiet_logs() -> None:
    """Errors only: each of the 60 collectors says once that it folds peers."""
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--nodes", type=int, action="append", help="F (repeat; default 100, 1000)")
    p.add_argument("--detail", choices=("quantiles", "histogram", "none"), action="append")
    p.add_argument("--peers", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--scrape-interval", type=float, default=5.0, help="with --nodes")
    p.add_argument("--max-series", type=int, help="the agents' max_series (default: theirs)")
    p.add_argument("--rtt-buckets", choices=EDGE_SCHEMES, default=Config.rtt_buckets)
    p.add_argument("--quick", action="store_true", help="F=20 only (development)")
    p.add_argument("--out", default="bench-results/fleet.json")
    a = p.parse_args()
    # 2 rounds leave rate() one step per node, at scrape times that differ by
    # node: its extrapolation then weighs the nodes of a zone unequally
    if a.peers < 1 or a.rounds < 3 or a.scrape_interval <= 0:
        print("fleet: --peers >= 1, --rounds >= 3, --scrape-interval > 0", file=sys.stderr)
        return 2
    if a.nodes:
        if any(n < 1 for n in a.nodes):
            print("fleet: --nodes must be >= 1", file=sys.stderr)
            return 2
        cases: Sequence[Case] = [
            Case(n, d, a.scrape_interval) for n in a.nodes for d in a.detail or ["quantiles"]
        ]
    else:
        cases = QUICK_CASES if a.quick else CASES
    quiet_logs()
    # a SIGTERM unwinds (stopping Prometheus and the server) like Ctrl-C
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    r = Report()
    t0 = time.monotonic()
    try:
        run(r, cases, a.peers, a.rounds, a.rtt_buckets, a.max_series)
    except ConfigError as e:
        print(f"fleet: {e}", file=sys.stderr)
        return 2
    print(r.table())
    print(f"\nfleet: {time.monotonic() - t0:.0f} s; JSON: {a.out}")
    r.write_json(a.out, {"seconds": time.monotonic() - t0, "cpus": os.cpu_count()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
