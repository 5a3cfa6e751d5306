"""The series budget and the zone totals over synthetic windows (no kernel):
ranking, hysteresis, the sample count of the real exposition, zones summing
to the host. The same code runs on real traffic in test_peers.py
(test_budget_with_hundreds_of_peers)."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ebpf_telemetry import budget
from ebpf_telemetry.budget import Budget, PeerInput
from ebpf_telemetry.config import ConfigError, from_mapping
from ebpf_telemetry.cputime import CpuTime
from ebpf_telemetry.histogram import value_to_slot
from ebpf_telemetry.metrics import TelemetryCollector
from ebpf_telemetry.naming import Zones
from ebpf_telemetry.snapshot import Snapshot, Window
from ebpf_telemetry.values import Hist, NodeMetrics
from ebpf_telemetry.zonehist import ZoneTotals
from promstack import require

MAX_SLOTS = len(Hist.empty().slots)


def peer(node: int, retrans: int = 0, p99: float | None = None, label: str = "") -> PeerInput:
    q = (p99 / 2, p99 / 2, p99) if p99 is not None else (None, None, None)
    return PeerInput(node, label or f"p{node:03d}", retrans, q)


def labels(c: budget.Choice) -> list[str]:
    return [p.label for p in c.exported]


def test_ranking_is_retransmits_then_p99_then_label() -> None:
    b = Budget(hold=0, detail="quantiles")
    peers = [peer(1, 0, 100.0), peer(2, 5, 10.0), peer(3, 0, 900.0), peer(4, 5, 20.0),
             peer(5), peer(6, 1)]  # fmt: skip
    assert labels(b.choose(peers, 3)) == ["p002", "p004", "p006"]
    assert labels(b.choose(peers, 5)) == ["p001", "p002", "p003", "p004", "p006"]
    c = b.choose(peers, 10)
    assert len(c.exported) == 6 and c.folded == 0
    assert b.choose(peers, 0).folded == 6


def test_hysteresis_keeps_a_peer_for_hold_intervals_then_lets_it_go() -> None:
    hold = 3
    b = Budget(hold=hold, detail="quantiles")
    slow = peer(1, 0, 500.0)
    others = [peer(i, 0, 100.0) for i in range(2, 6)]
    assert labels(b.choose([slow, *others], 1)) == ["p001"]
    worse = peer(9, 2, 50.0)  # outranks p001 from now on
    for _ in range(hold):  # p001 still has traffic: kept while its hold lasts
        assert labels(b.choose([slow, worse, *others], 1)) == ["p001"]
    assert labels(b.choose([slow, worse, *others], 1)) == ["p009"]
    # p009 then stays while outranked, for hold intervals
    worst = peer(7, 9, 10.0)
    for _ in range(hold):
        assert labels(b.choose([slow, worse, worst, *others], 1)) == ["p009"]
    assert labels(b.choose([slow, worse, worst, *others], 1)) == ["p007"]


def test_a_held_peer_that_goes_idle_gives_its_place_up_at_once() -> None:
    b = Budget(hold=12, detail="quantiles")
    assert labels(b.choose([peer(1, 3), peer(2, 0, 10.0)], 1)) == ["p001"]
    assert labels(b.choose([peer(1), peer(2, 0, 10.0)], 1)) == ["p002"]


def test_a_peer_that_keeps_ranking_in_renews_its_hold() -> None:
    b = Budget(hold=2, detail="quantiles")
    for _ in range(10):
        assert labels(b.choose([peer(1, 5), peer(2, 0, 9.0)], 1)) == ["p001"]
    assert b.held == {"p001": 2}


def test_room_and_samples_per_peer() -> None:
    assert budget.samples_per_peer("quantiles", 26) == 4
    assert budget.samples_per_peer("histogram", 26) == 26 + 3 + 3 + 1
    assert budget.samples_per_peer("none", 26) == 0
    assert budget.room(1000, 300, 4) == 175
    assert budget.room(200, 300, 4) == 0
    assert budget.room(1000, 300, 0) == 0


def test_folding_is_logged_once_when_it_starts_and_once_when_it_stops() -> None:
    from structlog.testing import capture_logs

    b = Budget(hold=0, detail="quantiles")
    peers = [peer(i, 0, float(i)) for i in range(1, 6)]
    with capture_logs() as logs:
        for fit in (10, 2, 2, 3, 10, 10):
            b.choose(peers, fit)
    events = [e["event"] for e in logs]
    assert len(events) == 2, events
    assert "max_series" in events[0] and "folding stopped" in events[1]


# -- synthetic windows through the real collector --------------------------


def hist(samples_us: Iterable[int]) -> Hist:
    slots = [0] * MAX_SLOTS
    for v in samples_us:
        slots[value_to_slot(v)] += 1
    return Hist(tuple(slots))


class Host:
    """A synthetic host: cumulative per-peer RTT samples and retransmits, node 0 holding all."""

    def __init__(self, names: dict[int, str]) -> None:
        self.names = names
        self.samples: dict[int, list[int]] = defaultdict(list)
        self.retrans: dict[int, int] = defaultdict(int)
        self.t = 0.0

    def traffic(self, node: int, rtt_us: Iterable[int], retrans: int = 0) -> None:
        """node 0: samples no peer row holds."""
        s = list(rtt_us)
        self.samples[node] += s
        self.retrans[node] += retrans
        if node:
            self.samples[0] += s
            self.retrans[0] += retrans

    def snap(self) -> Snapshot:
        self.t += 5
        nodes = set(self.samples) | set(self.retrans) | {0}
        hists = {n: hist(self.samples[n]) for n in nodes}
        metrics = {n: NodeMetrics(rtt_sum=sum(self.samples[n]), rtt_count=len(self.samples[n]),
                                  retrans_count=self.retrans[n]) for n in nodes}  # fmt: skip
        stats: defaultdict[str, int] = defaultdict(int)
        return Snapshot(self.t, 1e9 + self.t, hists, metrics, stats, dict(self.names),
                        Hist.empty(), {}, CpuTime(), {}, {}, 0, 4096)  # fmt: skip


def families(c: TelemetryCollector) -> tuple[str, dict[str, list[tuple[dict[str, str], float]]]]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(c)
    text = generate_latest(registry).decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name].append((s.labels, s.value))
    return text, out


def sample_lines(text: str) -> int:
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


SEED_NAMES = ("ebpf_rtt_p50_milliseconds", "ebpf_rtt_p99_milliseconds")  # kept on purpose


def promtool_problems(text: str) -> list[str]:
    """promtool check metrics on text, but for the seed's two gauge names."""
    r = subprocess.run([require(("promtool",)), "check", "metrics"], input=text,
                       capture_output=True, text=True, timeout=30)  # fmt: skip
    lines = [x for x in (r.stdout + r.stderr).splitlines() if x.strip()]
    return [x for x in lines if not x.startswith(SEED_NAMES)]


@pytest.mark.parametrize("detail", ["quantiles", "histogram", "none"])
def test_the_export_never_exceeds_max_series_and_keeps_the_totals(detail: str) -> None:
    names = {i: f"10.0.{i // 250}.{i % 250 + 1}" for i in range(1, 401)}
    zones = Zones("z-a", {n: f"z-{i % 3}" for i, n in names.items() if i % 4})
    # four zones at every edge (about 113 samples each) and room for peers
    cfg = from_mapping({"node_name": "n", "max_series": 800, "peer_detail": detail}, "test")
    c = TelemetryCollector(cfg)
    c.configure(cfg, zones)
    host = Host(names)
    prev = host.snap()
    for round_ in range(3):
        for i in names:
            host.traffic(i, [100 + i] * 3, retrans=1 if i in (7, 77) else 0)
        host.traffic(17, [90_000] * 3)  # slow
        host.traffic(0, [50, 60])  # not attributed to a peer
        cur = host.snap()
        c.update(Window(prev, cur), 0.01)
        prev = cur
        text, fams = families(c)
        assert sample_lines(text) <= 800
        assert not promtool_problems(text)
        node_count = fams["ebpf_node_tcp_rtt_seconds_count"][0][1]
        zone_counts = fams["ebpf_zone_tcp_rtt_seconds_count"]
        assert sum(v for _, v in zone_counts) == node_count == len(host.samples[0])
        retrans = fams["ebpf_zone_tcp_retransmits_total"]
        assert sum(v for _, v in retrans) == host.retrans[0] == 2 * (round_ + 1)
        assert {lb["peer_zone"] for lb, _ in zone_counts} == {"", "z-0", "z-1", "z-2"}
        assert {lb["zone"] for lb, _ in zone_counts} == {"z-a"}
        exported = fams["ebpf_peers_exported"][0][1]
        folded = fams["ebpf_peers_folded"][0][1]
        assert exported + folded == 400
        shown = {lb["peer"] for lb, _ in fams["ebpf_tcp_retransmits_total"]}
        assert len(shown) == exported
        if detail != "none":  # the worst first: retransmits, then the slow one
            assert {names[7], names[77], names[17]} <= shown
            assert 0 < exported < 400
        else:
            assert exported == 0


def test_more_zones_than_max_series_holds_fold_the_smallest_into_the_empty_zone() -> None:
    """40 zones of 30 samples each would take 1,200: the biggest zones fit, the
    rest are shown within peer_zone="", and the sum is still the host's."""
    names = {i: f"10.1.0.{i}" for i in range(1, 41)}
    zones = Zones("z-a", {n: f"zone-{i:02d}" for i, n in names.items()})
    cfg = from_mapping({"node_name": "n", "max_series": 600}, "test")
    c = TelemetryCollector(cfg)
    c.configure(cfg, zones)  # as a peers file's table sets them
    host = Host(names)
    prev = host.snap()
    for i in names:
        host.traffic(i, [100] * i)  # zone-40 the biggest
    cur = host.snap()
    c.update(Window(prev, cur), 0.01)
    text, fams = families(c)
    assert sample_lines(text) <= 600
    shown = {lb["peer_zone"]: v for lb, v in fams["ebpf_zone_tcp_rtt_seconds_count"]}
    assert 1 < len(shown) < 41 and "" in shown
    assert "zone-40" in shown and "zone-01" not in shown  # the biggest kept
    assert sum(shown.values()) == fams["ebpf_node_tcp_rtt_seconds_count"][0][1]


def test_zones_sum_to_the_host_when_reads_race_and_ids_are_reused() -> None:
    """A zoned peer's row ahead of node 0 in a read (a sample between the two
    reads): peer_zone="" owes it and the sum is exact again an interval later;
    counters never go down."""
    zt = ZoneTotals()
    names = {1: "a", 2: "b"}
    zone_of = {0: "", 1: "z1", 2: ""}
    host = Host(names)
    host.traffic(1, [100] * 5)
    host.traffic(2, [200] * 5)
    s0 = host.snap()
    zt.add(Window(s0, s0), zone_of)
    assert zt.zones["z1"].hist().count == 5 and zt.zones[""].hist().count == 5
    # the peer row read with 2 samples node 0 did not show yet
    host.traffic(1, [100] * 2)
    s1 = host.snap()
    lagging = dict(s1.hists)
    lagging[0] = hist(host.samples[0][:-2])
    zt.add(Window(s0, Snapshot(**{**s1.__dict__, "hists": lagging})), zone_of)
    assert zt.zones["z1"].hist().count == 7 and zt.zones[""].hist().count == 5
    assert sum(zt.debt.slots) == 2
    host.traffic(2, [200] * 3)
    s2 = host.snap()
    racing = Snapshot(**{**s1.__dict__, "hists": lagging})
    zt.add(Window(racing, s2), zone_of)
    total = sum(t.hist().count for t in zt.zones.values())
    assert total == s2.hist(0).count == 15 and sum(zt.debt.slots) == 0


def test_max_series_below_what_the_config_always_exports_is_refused() -> None:
    cfg = from_mapping({"max_series": 200}, "test")
    with pytest.raises(ConfigError, match=r"max_series 200 is below \d+, the least"):
        TelemetryCollector(cfg)
    wide = from_mapping({"max_series": 200, "rtt_bucket_range_seconds": [0.001, 0.002]}, "test")
    TelemetryCollector(wide)  # few edges: fits


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"max_series": 10}, "max_series must be 200.."),
        ({"max_series": "1000"}, "max_series must be int"),
        ({"peer_detail": "all"}, "peer_detail must be one of quantiles, histogram, none"),
        ({"peer_detail_hold_intervals": -1}, "peer_detail_hold_intervals must be 0.."),
    ],
)
def test_bad_budget_keys_are_one_line(keys: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as e:
        from_mapping(keys, "test")
    assert "\n" not in str(e.value)


def test_run_refuses_a_max_series_below_the_minimum_in_one_line(tmp_path: Path) -> None:
    """At start, before anything touches the kernel: one line naming the minimum, exit 1."""
    cfg = tmp_path / "c.toml"
    cfg.write_text("max_series = 200\n")
    r = subprocess.run(
        [sys.executable, "-m", "ebpf_telemetry", "run", "--once", "--config", str(cfg),
         "--pin-dir", "/sys/fs/bpf/ebt-test-never", "--textfile", str(tmp_path / "t.prom")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(r"max_series 200 is below \d+, the least", lines[0]), lines
    assert not (tmp_path / "t.prom").exists()


@pytest.mark.parametrize("fit", [0, 1, 7, 40, 400])
def test_candidates_from_arrays_choose_as_the_scalar_definition(fit: int) -> None:
    """budget.candidates() (numpy over the window's arrays) against
    peer_inputs() (one peer at a time) through two Budgets with holds, over
    intervals with ties on retransmits and p99, idle peers and fewer active
    peers than places: the same peers, quantiles, folded count and holds."""
    import random

    rng = random.Random(fit)
    names = {i: f"10.2.{i // 250}.{i % 250}" for i in range(1, 301)}
    host = Host(names)
    scalar, vector = Budget(hold=2, detail="quantiles"), Budget(hold=2, detail="quantiles")
    prev = host.snap()
    for step in range(8):
        for i in rng.sample(sorted(names), 12 if step % 3 == 2 else 120):
            rtt = rng.choice([100, 200, 400, 800]) * rng.choice([1, 1, 2])
            host.traffic(i, [rtt] * rng.randint(1, 4), rng.choice([0, 0, 0, 1, 3]))
        cur = host.snap()
        w = Window(prev, cur)
        want = scalar.choose(budget.peer_inputs(w, sorted(names.items())), fit)
        got = vector.choose(budget.candidates(w, cur.peers, fit, vector.holding()), fit)
        assert labels(got) == labels(want) and got.folded == want.folded
        assert [p.retrans for p in got.exported] == [p.retrans for p in want.exported]
        for g, s in zip(got.exported, want.exported, strict=True):
            assert g.quantiles == pytest.approx(s.quantiles)
        assert vector.held == scalar.held
        prev = cur


def test_zone_totals_from_moved_rows_equal_the_per_peer_sums() -> None:
    """ZoneTotals.add() over a reader's consecutive readings (rows summed per
    zone with numpy, only the rows that moved) against the same counts as
    hand-made snapshots (one peer at a time): equal zones and debt."""
    import random

    import numpy as np

    from ebpf_telemetry import noderows

    rng = random.Random(3)
    names = {i: f"10.3.0.{i}" for i in range(1, 9)}
    zone_of = {0: "", **{i: ("za", "zb", "")[i % 3] for i in names}}
    nodes = 10  # max_peers 8: ids 0..9

    def counts() -> tuple[np.ndarray, np.ndarray]:
        rows = np.zeros((nodes, MAX_SLOTS), dtype=np.uint64)
        words = np.zeros((nodes, noderows.WORDS), dtype=np.uint64)
        for i in names:
            for _ in range(rng.randint(0, 5)):
                rows[i, rng.randrange(60, 120)] += rng.randint(1, 4)
            words[i, noderows.RETRANS] = rng.randint(0, 2)
        return rows, words

    a_rows, a_words = counts()
    d_rows, d_words = counts()
    d_rows[[2, 5]] = 0  # not moving
    d_words[[2, 5]] = 0
    b_rows, b_words = a_rows + d_rows, a_words + d_words
    for rows, words in ((a_rows, a_words), (b_rows, b_words)):
        rows[0] = rows[1:].sum(axis=0) + 3  # node 0: all, and some no peer row holds
        words[:, noderows.RTT_COUNT] = rows.sum(axis=1)
        words[:, noderows.RTT_SUM] = words[:, noderows.RTT_COUNT] * 150
        words[0, noderows.RETRANS] = words[1:, noderows.RETRANS].sum() + 1

    def snap(t: float, hists: Any, metrics: Any) -> Snapshot:
        return Snapshot(t, 1e9 + t, hists, metrics, {}, dict(names), Hist.empty(), {},
                        CpuTime(), {}, {}, 0, 8)  # fmt: skip

    def by_hand(rows: np.ndarray, words: np.ndarray, t: float) -> Snapshot:
        hists = {i: Hist(tuple(rows[i].tolist())) for i in range(nodes)}
        return snap(t, hists, {i: noderows.metrics_of(words[i]) for i in range(nodes)})

    class Reader:  # HistRows.follows() asks only that both come from one reader
        def row_at(self, node: int, seq: int) -> np.ndarray:
            return np.zeros(MAX_SLOTS, dtype=np.uint64)  # a row not read had no samples

    reader: Any = Reader()
    moved = np.flatnonzero(d_rows[1:].any(axis=1)).astype(np.int64) + 1  # the rows re-read
    read = np.flatnonzero(a_rows[1:].any(axis=1)).astype(np.int64) + 1
    host_a, host_b = Hist(tuple(a_rows[0].tolist())), Hist(tuple(b_rows[0].tolist()))
    prev = snap(5.0, noderows.HistRows(nodes, host_a, read, a_rows[read], 1, 0, None, reader),
                noderows.MetricRows(a_words))  # fmt: skip
    cur = snap(10.0, noderows.HistRows(nodes, host_b, moved, b_rows[moved], 2, 1,
                                       (b_rows[moved] - a_rows[moved]).astype(np.uint32),
                                       reader),
               noderows.MetricRows(b_words))  # fmt: skip
    w = Window(prev, cur)
    assert w.moved() is not None and set(moved.tolist()) <= set(w.moved().tolist())
    scalar, vector = ZoneTotals(), ZoneTotals()
    hand_a, hand_b = by_hand(a_rows, a_words, 5.0), by_hand(b_rows, b_words, 10.0)
    scalar.add(Window(hand_a, hand_a), zone_of)
    vector.add(Window(prev, prev), zone_of)
    scalar.add(Window(hand_a, hand_b), zone_of)
    vector.add(w, {i: zone_of[i] for i in w.moved().tolist() if i in zone_of})
    assert vector.zones.keys() == scalar.zones.keys() == {"", "za", "zb"}
    for z, t in scalar.zones.items():
        assert (vector.zones[z].slots, vector.zones[z].rtt_sum, vector.zones[z].retrans) == (
            t.slots, t.rtt_sum, t.retrans), z  # fmt: skip
    assert vector.debt == scalar.debt
    assert sum(t.hist().count for t in vector.zones.values()) == int(b_rows[0].sum())
