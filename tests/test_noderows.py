"""16,384 peers: the node rows' layout, reading them as arrays (noderows.py),
the window's per-node arrays, and a real load of the largest table.

The kernel test loads max_peers = MAX_PEERS_LIMIT into its own pin dir,
sends real TCP between namespaces it makes to the peer with the highest id,
and checks every RTT sample (the events at sample_rate 1) against the rows
read back. The other tests need no kernel.
"""

from __future__ import annotations

import ipaddress
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from agentlab import EventDrain, attach, peer_id
from ebpf_telemetry import config, layout, lowwords, noderows
from ebpf_telemetry.binding import TelemetryError, ffi, lib
from ebpf_telemetry.histogram import MAX_SLOTS, quantiles, quantiles_rows, value_to_slot
from ebpf_telemetry.metrics import TelemetryCollector
from ebpf_telemetry.snapshot import HOST, Snapshot, Window, take
from ebpf_telemetry.values import Hist, NodeMetrics
from netlab import Netns, TcpEchoServer, tcp_pingpong, veth_pair, wait_until

MAX = lib.MAX_PEERS_LIMIT
MIB = 1 << 20


# -- layout and kernel memory, from the maps' definitions --------------------------


def node_map_bytes(max_peers: int, ncpu: int) -> dict[str, int]:
    """Kernel memory of the maps indexed by node id, from their layout (value
    size, per-CPU or not) at max_peers + 2 rows; the host's per-CPU rows."""
    out = {}
    for name in ("rtt_hist_map", "node_metrics_map", "host_metrics_map", "rtt_host_hist_map"):
        spec = layout.MAPS[name]
        assert spec.value is not None
        rows = max_peers + 2 if name in layout.NODE_MAPS else 1
        per_cpu = spec.map_type == layout.MAP_PERCPU_ARRAY
        out[name] = rows * ffi.sizeof(spec.value) * (ncpu if per_cpu else 1)
    return out


def test_max_peers_limit_is_16384_and_validated() -> None:
    assert MAX == 16384
    assert config.from_mapping({"max_peers": MAX}, "t").max_peers == MAX
    with pytest.raises(config.ConfigError, match=f"max_peers must be 1..{MAX}"):
        config.from_mapping({"max_peers": MAX + 1}, "t")


def test_peer_rows_are_shared_and_the_hosts_per_cpu() -> None:
    """At 16,384 peers and 256 CPUs no node-indexed map grows with CPUs x
    peers: per-peer rows are shared (atomic adds), node 0's are per-CPU."""
    for name in ("rtt_hist_map", "node_metrics_map"):
        assert layout.MAPS[name].map_type == layout.MAP_ARRAY
        assert name in layout.NODE_MAPS
    assert layout.MAPS["node_metrics_map"].flags & layout.BPF_F_MMAPABLE
    for name in ("rtt_host_hist_map", "host_metrics_map"):
        assert layout.MAPS[name].map_type == layout.MAP_PERCPU_ARRAY
        assert name not in layout.NODE_MAPS
    at256 = node_map_bytes(MAX, 256)
    # what the per-CPU layout of node_metrics_map would have cost
    percpu = (MAX + 2) * ffi.sizeof("struct node_metrics") * 256
    assert percpu > 256 * MIB > 2 * MIB > at256["node_metrics_map"]
    # with the 16 MiB ring buffer and the rest (bench part 3 sums every map)
    assert sum(at256.values()) + (1 << 24) <= 56 * MIB, at256


def test_metric_words_follow_the_struct() -> None:
    assert ffi.sizeof("struct node_metrics") == noderows.WORDS * 8
    for name, w in noderows.WORD.items():
        assert ffi.offsetof("struct node_metrics", name) == 8 * w
    row = np.zeros(noderows.WORDS, dtype=np.uint64)
    row[noderows.WORD["rtt_count"]], row[noderows.WORD["retrans_count"]] = 7, 3
    assert noderows.metrics_of(row) == NodeMetrics(rtt_count=7, retrans_count=3)


# -- quantiles of many rows at once -------------------------------------------------

rows_st = st.lists(
    st.dictionaries(st.integers(0, MAX_SLOTS - 1), st.integers(1, 10**6), max_size=12),
    min_size=1,
    max_size=8,
)


@settings(max_examples=200, deadline=None)
@given(rows_st, st.booleans())
def test_quantiles_rows_equal_the_scalar_quantiles(rows: list[dict[int, int]], mean: bool) -> None:
    qs = (0.0, 0.5, 0.9, 0.99, 1.0)
    dense = np.zeros((len(rows), MAX_SLOTS), dtype=np.uint64)
    for i, r in enumerate(rows):
        for s, c in r.items():
            dense[i, s] = c
    means = [
        (sum(c * (1 << min(s // 8, 40)) for s, c in r.items()) / sum(r.values()))
        if mean and r
        else None
        for r in rows
    ]
    got = quantiles_rows(dense, qs, np.array([np.nan if m is None else m for m in means]))
    for i in range(len(rows)):
        want = quantiles(dense[i].tolist(), qs, means[i])
        for g, w in zip(got[i], want, strict=True):
            if w is None:
                assert np.isnan(g)
            else:
                assert g == pytest.approx(w, rel=1e-9, abs=1e-6)


# -- windows over hand-made snapshots (as the budget's tests make them) --------------


def snapshot(metrics: dict[int, NodeMetrics], hists: dict[int, Hist], peers: dict[int, str]) -> Any:
    from ebpf_telemetry.cputime import CpuTime

    return Snapshot(
        monotonic=0.0, wall=0.0, hists=hists, metrics=metrics, stats={}, peers=peers,
        runqlat=Hist.empty(), drops={}, cpu=CpuTime(), misses={}, seen={},
        boottime_ns=0, max_peers=4,
    )  # fmt: skip


def hist(slots: dict[int, int]) -> Hist:
    out = [0] * MAX_SLOTS
    for s, c in slots.items():
        out[s] = c
    return Hist(tuple(out))


def test_window_arrays_agree_with_the_per_node_accessors() -> None:
    peers = {1: "a", 2: "b", 3: "c"}
    m0 = {1: NodeMetrics(rtt_sum=100, rtt_count=2), 2: NodeMetrics(rtt_count=5, retrans_count=1),
          3: NodeMetrics(rtt_sum=10, rtt_count=1)}  # fmt: skip
    h0 = {1: hist({40: 2}), 2: hist({50: 5}), 3: hist({10: 1})}
    m1 = {1: NodeMetrics(rtt_sum=400, rtt_count=6), 2: NodeMetrics(rtt_count=5, retrans_count=4),
          3: NodeMetrics(rtt_sum=30, rtt_count=2)}  # fmt: skip
    h1 = {1: hist({40: 3, 60: 3}), 2: hist({50: 5}), 3: hist({10: 1, 12: 1})}
    prev = snapshot(m0, h0, peers)
    cur = snapshot(m1, h1, {**peers, 3: "c2"})  # id 3 changed hands: all of cur
    w = Window(prev, cur)
    assert w.rtt_counts().tolist() == [w.node(i).rtt_count for i in range(4)] == [0, 4, 0, 2]
    assert w.retransmits().tolist()[1:] == [0, 3, 0]
    assert w.active().tolist() == [1, 2, 3]
    ids, q = w.rtt_quantiles_all((0.5, 0.99))
    assert ids.tolist() == [1, 3]
    for i, row in zip(ids.tolist(), q, strict=True):
        assert row.tolist() == pytest.approx(w.rtt_quantiles_us(i, (0.5, 0.99)))


WORD_VALUES = st.one_of(
    st.integers(0, 3), st.integers(0, 2**64 - 1), st.sampled_from([2**63, 2**64 - 1])
)
METRICS_ST = st.builds(
    NodeMetrics,
    **{name: WORD_VALUES for name in noderows.WORD},  # every word of the struct
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(METRICS_ST, METRICS_ST, st.booleans()), min_size=4, max_size=4))
def test_window_deltas_equal_the_per_node_differences(
    rows: list[tuple[NodeMetrics, NodeMetrics, bool]],
) -> None:
    """Window.deltas (every row at once, modulo 2^64) = NodeMetrics.since per
    node: counters that went back (maps reset) and ids that changed hands
    give all of cur, the `latest` words are cur's."""
    prev = snapshot({i: a for i, (a, _, _) in enumerate(rows)}, {}, {1: "a", 2: "b", 3: "c"})
    moved = {i: f"{label}2" if rows[i][2] else label for i, label in prev.peers.items()}
    cur = snapshot({i: b for i, (_, b, _) in enumerate(rows)}, {}, moved)
    w = Window(prev, cur)
    for i in range(len(rows)):
        assert noderows.metrics_of(w.deltas[i]) == w.node(i), i


# -- the largest table on the real kernel ---------------------------------------------


@pytest.fixture
def lab() -> Iterator[tuple[Netns, Netns, Any]]:
    with Netns("a") as a, Netns("b") as b:
        yield a, b, veth_pair(a, b)


def fillers(n: int) -> dict[str, list[str]]:
    """n named peers of one address each in 198.18.0.0/15 (no traffic)."""
    base = int(ipaddress.IPv4Address("198.18.0.0"))
    return {f"f{i:05d}": [f"{ipaddress.IPv4Address(base + i)}/32"] for i in range(n)}


def test_16384_peers_load_and_read_back_exactly(make_config: Any, lab: Any) -> None:
    """max_peers 16,384: the peer with the highest id gets real round trips;
    its rows, read by a first reading and by a reader's next, hold exactly
    the samples the events carried (every one at sample_rate 1), at id 16,384."""
    a, b, veth = lab
    peers = {**fillers(MAX - 1), "zz-b": [f"{veth.v4_b}/32"]}
    cfg = make_config(max_peers=MAX, sample_rate=1, peers=peers)
    with attach(cfg) as pins:
        reader = noderows.NodeReader(pins)
        try:
            s0 = take(pins, reader)
            node = peer_id(s0, "zz-b")
            assert node == MAX and len(s0.metrics) == MAX + 2
            with EventDrain(pins.pin_dir) as drain:
                with TcpEchoServer(b, veth.v4_b) as srv:
                    tcp_pingpong(a, veth.v4_b, srv.port, 60)
                s1 = take(pins, reader)
                count = s1.node(node).rtt_count
                wait_until(lambda: sum(e.node_id == node for e in drain.events) >= count, 5)
            full = take(pins)
        finally:
            reader.close()
        assert pins.stats()["events_lost"] == 0
    values = [e.value for e in drain.events if e.node_id == node and e.event_type == 1]
    assert len(values) == count >= 60
    want = Counter(value_to_slot(v) for v in values)
    slots = {s: c for s, c in enumerate(full.hist(node).slots) if c}
    assert slots == dict(want)
    assert full.node(node) == replace(s1.node(node), timestamp=full.node(node).timestamp)
    assert full.node(node).rtt_sum == sum(values)
    w = Window(s0, s1)
    assert w.hist(node) == full.hist(node) == s1.hist(node)  # the peer had nothing before
    # no filler moved; other traffic of this machine counts under `other` (MAX + 1)
    assert w.rtt_counts()[node] == count and int(w.rtt_counts()[1:MAX].sum()) == 0
    ids, q = w.rtt_quantiles_all((0.5, 0.99))
    assert node in ids.tolist() and set(ids.tolist()) <= {node, MAX + 1}
    row = q[ids.tolist().index(node)]
    assert row.tolist() == pytest.approx(w.rtt_quantiles_us(node, (0.5, 0.99)))
    assert w.node(HOST).rtt_count >= count  # the host counts every peer's samples


def _write(pins: Any, ids: np.ndarray, hists: np.ndarray) -> None:
    """Rows as the programs' adds leave them: RTT histogram and counters."""
    key = ffi.new("__u32 *")
    metrics = np.zeros((len(ids), noderows.WORDS), dtype=np.uint64)
    metrics[:, noderows.RTT_COUNT] = hists.sum(axis=1)
    for j, i in enumerate(ids.tolist()):
        key[0] = i
        pins["rtt_hist_map"].update(key, ffi.from_buffer(np.ascontiguousarray(hists[j])))
        pins["node_metrics_map"].update(key, ffi.from_buffer(metrics[j]))


@pytest.mark.matrix  # batch look-ups of arrays: 5.6
def test_rows_read_by_blocks_equal_the_rows_looked_up(
    make_config: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """read_rows (a batch look-up where most of a block moved, a look-up a row
    elsewhere) gives lookup_rows' rows for every pattern of ids: every peer
    to the table's last (a part block at the end), a few, most of a block
    with gaps, runs across block edges. Then a NodeReader's reading where
    every peer moved, narrow and wide rows, slots past 2^32: what it says
    was added, and each row as of it, against the rows written; a reading
    that fails halfway leaves the reader refusing, not undercounting."""
    n = 3 * noderows.BLOCK + 100
    rng = np.random.default_rng(5)
    ids = np.arange(1, n + 1, dtype=np.int64)  # not `other` (n + 1): this machine's traffic
    hists = np.zeros((n, MAX_SLOTS), dtype=np.uint64)
    narrow = rng.integers(0, MAX_SLOTS - 8, size=n)
    for s in range(8):
        hists[np.arange(n), narrow + s] = rng.integers(1, 1 << 40, size=n, dtype=np.uint64)
    wide = np.arange(n) % 3 == 0  # every slot used: kept whole by the reader
    hists[wide] = rng.integers(0, 1 << 36, size=(int(wide.sum()), MAX_SLOTS), dtype=np.uint64)
    b = noderows.BLOCK
    patterns = {
        "every": ids,
        "few": np.sort(rng.choice(ids, 40, replace=False)),
        "gaps": ids[(ids >= b) & (ids < 2 * b) & (ids % 7 != 0)],
        "edges": np.r_[ids[b - 300 : b + 300], ids[-20:]],
    }
    with attach(make_config(max_peers=n, peers=fillers(n))) as pins:
        _write(pins, ids, hists)
        hm = pins["rtt_hist_map"]
        for name, some in patterns.items():
            want = noderows.lookup_rows(hm, some)
            assert (want == hists[some - 1]).all(), name
            assert (noderows.read_rows(hm, some) == want).all(), name
            buf = np.ones((len(some) + 5, MAX_SLOTS), dtype=np.uint64)
            assert (noderows.read_rows(hm, some, buf) == want).all(), name
        reader = noderows.NodeReader(pins)
        try:
            s0 = take(pins, reader)
            before = [s0.hist(i).slots for i in (1, b, n // 2, n)]  # read again by s1 below
            added = rng.integers(0, 1000, size=(n, MAX_SLOTS), dtype=np.uint64)
            added[~wide] = 0
            added[np.arange(n), narrow + rng.integers(0, 8, size=n)] += np.uint64(1 << 32) + 3
            _write(pins, ids, hists + added)
            s1 = take(pins, reader)
            w = Window(s0, s1)
            assert (w.hist_rows(ids) == (added % (1 << 32)).astype(np.uint32)).all()
            for i, was in zip((1, b, n // 2, n), before, strict=True):
                assert was == tuple(hists[i - 1].tolist())
                assert s1.hist(i).slots == tuple((hists[i - 1] + added[i - 1]).tolist())
            with pytest.raises(noderows.SupersededError):  # s1 read every row again
                s0.hist(1)
            _write(pins, ids, hists + 2 * added)  # a reading that fails after its first chunk
            calls = iter([True, False])

            def fail_second(*args: Any) -> np.ndarray:
                if not next(calls, False):
                    raise OSError("the second chunk")
                return real(*args)

            real = noderows.read_rows
            with monkeypatch.context() as m:
                m.setattr(noderows, "read_rows", fail_second)
                with pytest.raises(OSError):
                    take(pins, reader)
            with pytest.raises(TelemetryError, match="failed halfway"):  # not undercounted
                take(pins, reader)
        finally:
            reader.close()


def test_chunks_hold_whole_blocks() -> None:
    """A run of moved ids is cut where a block begins (a block's batch read is
    never split), each at most CHUNK ids, all of them once, in order."""
    b, size = noderows.BLOCK, noderows.NodeReader.CHUNK
    rng = np.random.default_rng(3)
    for ids in (
        np.arange(1, 16385),
        np.sort(rng.choice(np.arange(1, 16385), 1024, replace=False)),
        np.sort(rng.choice(np.arange(1, 16385), 5000, replace=False)),
        np.arange(b - 3, b + 3),
        np.arange(0),
    ):
        runs = list(noderows.chunks(ids, size))
        assert [i for a, c in runs for i in ids[a:c]] == ids.tolist()
        assert all(0 < c - a <= size for a, c in runs)
        assert all(ids[c - 1] // b != ids[c] // b for _, c in runs[:-1])


def test_a_scrape_after_the_next_reading_shows_the_interval_exported(make_config: Any) -> None:
    """/metrics is collected in another thread, at any time: a scrape after
    the agent took its next reading (rows moved, the reader's low words
    advanced) still shows the interval update() exported, per-peer
    histograms too: collect() reads no map."""
    n = 8
    cfg = make_config(max_peers=n, peers=fillers(n))  # peer_detail "histogram" here
    ids = np.arange(1, n + 1, dtype=np.int64)
    hists = np.zeros((n, MAX_SLOTS), dtype=np.uint64)
    hists[:, 90:94] = 5
    with attach(cfg) as pins:
        reader = noderows.NodeReader(pins)
        collector = TelemetryCollector(cfg)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)
        try:
            s0 = take(pins, reader)
            _write(pins, ids, hists)
            s1 = take(pins, reader)
            collector.update(Window(s0, s1), 0.0)
            text = generate_latest(registry)
            assert b'ebpf_tcp_rtt_seconds_count{node="test-node",peer="f00007"' in text
            _write(pins, ids, hists * 3)
            take(pins, reader)  # the next interval's reading, not exported yet
            assert generate_latest(registry) == text
        finally:
            reader.close()


def test_reader_windows_equal_full_windows_on_hand_made_rows() -> None:
    """A reader's differences modulo 2^32 against the exact differences: rows
    near and past 2^32 in a slot, random moves, some ids not moving."""
    rng = random.Random(7)
    rows = np.zeros((6, MAX_SLOTS), dtype=np.uint64)
    rows[:, 100] = (1 << 32) - 3
    after = rows.copy()
    for i in range(6):
        after[i, rng.randrange(MAX_SLOTS)] += rng.randrange(1, 10)
    after[:, 100] += 5  # past 2^32
    ids, low = np.arange(1, 7, dtype=np.int64), lowwords.LowWords(7)
    low.put(ids, rows)  # as the reader keeps them at its previous reading
    since = low.advance(ids, after)
    h = noderows.HistRows(7, Hist.empty(), ids, after, 2, 1, since)
    assert (h.added() == after - rows).all()


@st.composite
def low_rows(draw: Any) -> tuple[list[int], list[np.ndarray]]:
    """Readings of a few ids, each a whole row: a narrow span or a wide one
    (past lowwords.WIDTH), at the top slots, empty, near 2^32 in a slot."""
    ids = draw(st.lists(st.integers(1, 9), min_size=1, max_size=9, unique=True))
    rows = []
    for _ in ids:
        row = np.zeros(MAX_SLOTS, dtype=np.uint64)
        lo = draw(st.integers(0, MAX_SLOTS - 1))
        span = draw(st.sampled_from([0, 1, lowwords.WIDTH - 1, lowwords.WIDTH, 200]))
        for s in {lo, min(lo + span, MAX_SLOTS - 1), draw(st.integers(lo, MAX_SLOTS - 1))}:
            row[s] = draw(st.sampled_from([0, 1, 7, (1 << 32) - 1, 1 << 32, (1 << 32) + 5]))
        rows.append(row)
    return ids, rows


@settings(max_examples=300, deadline=None)
@given(st.lists(low_rows(), min_size=1, max_size=6))
def test_low_words_equal_the_whole_rows_low_words(readings: list[Any]) -> None:
    """What LowWords gives back is every slot's low 32 bits of the last row
    put for that id (0 for an id never put), and advance() a row's low
    words less those (then as put()), however the rows' spans move between
    the narrow form and the whole one."""
    low, want = lowwords.LowWords(10), np.zeros((10, MAX_SLOTS), dtype=np.uint32)
    other = lowwords.LowWords(10)  # the same readings through advance()
    for ids, rows in readings:
        arr = np.array(ids, dtype=np.int64)
        now = np.array(rows, dtype=np.uint64).astype(np.uint32)
        assert (other.advance(arr, np.array(rows, dtype=np.uint64)) == now - want[arr]).all()
        low.put(arr, np.array(rows, dtype=np.uint64))
        assert (other.get(np.arange(10, dtype=np.int64)) == low.get(np.arange(10))).all()
        want[arr] = np.array(rows, dtype=np.uint64).astype(np.uint32)
        every = np.arange(10, dtype=np.int64)
        assert (low.get(every) == want).all()
        assert (low.get(arr[::-1]) == want[arr[::-1]]).all()
