"""Drop reasons within max_series (dropreasons.py): more reasons than the room
at the minimum max_series are shown within reason="other", the sum stays every
drop, a reason shown once keeps its series and no series goes down. No
kernel: the collector is fed hand-made readings (names from the host's BTF)."""

from __future__ import annotations

import dataclasses
import random

from ebpf_telemetry.config import from_mapping
from ebpf_telemetry.dropreasons import FOLDED, DropReasons
from ebpf_telemetry.metrics import TelemetryCollector, minimum_series
from ebpf_telemetry.snapshot import Window
from test_budget import Host, families, promtool_problems, sample_lines


def test_reasons_fit_then_newcomers_fold_and_shown_ones_stay() -> None:
    d = DropReasons()
    assert d.choose({"A": 5, "B": 1}, 3) == [("A", 5), ("B", 1)]
    got = d.choose({"A": 5, "B": 1, "C": 100, "D": 50, "E": 7}, 4)
    assert got == [("A", 5), ("B", 1), ("C", 100), (FOLDED, 57)]  # B stays, C the largest new
    assert d.folding
    got = d.choose({"A": 6, "B": 1, "C": 100, "D": 90, "E": 7}, 4)
    assert got == [("A", 6), ("B", 1), ("C", 100), (FOLDED, 97)]  # D grew: still folded
    got = d.choose({"A": 6, "B": 1, "C": 100, "D": 90, "E": 7}, 2)  # less room: the largest
    assert got == [("C", 100), (FOLDED, 104)]
    assert d.choose({"A": 6}, 0) == [(FOLDED, 6)]  # never below one sample: the total
    assert d.choose({"A": 6, "B": 1}, 5) == [("A", 6), ("B", 1)] and not d.folding


def test_more_drop_reasons_than_room_at_the_minimum_max_series_keep_the_total() -> None:
    """At the least max_series the config allows, 10 reasons, then 150 (the
    kernel's ~120 names and more): the export stays within max_series, the
    family sums to every drop, the first 10 keep their series, and from one
    interval to the next no series goes down."""
    wide = from_mapping({"node_name": "n"}, "test")
    least = minimum_series(*reversed(TelemetryCollector.check(wide)))
    cfg = from_mapping({"node_name": "n", "max_series": least}, "test")
    c = TelemetryCollector(cfg)
    names = {i: f"10.4.0.{i}" for i in range(1, 41)}
    host = Host(names)
    rng = random.Random(7)
    drops = {v: 1 for v in range(2, 12)}
    prev = host.snap()
    seen: dict[str, float] = {}
    for step in range(3):
        for i in names:
            host.traffic(i, [100 + i] * 2)
        if step:  # 150 reasons; the first ten the smallest of all
            for v in range(2, 152):
                drops[v] = drops.get(v, 0) + (0 if v < 12 else rng.randint(2, 50))
        cur = dataclasses.replace(host.snap(), drops=dict(drops))
        c.update(Window(prev, cur), 0.01)
        prev = cur
        text, fams = families(c)
        assert sample_lines(text) <= least
        assert not promtool_problems(text)
        shown = {lb["reason"]: v for lb, v in fams["ebpf_packet_drops_total"]}
        assert sum(shown.values()) == sum(drops.values())
        if step == 0:
            assert len(shown) == 10 and FOLDED not in shown
        else:  # the ten, some newcomers, and the rest within "other"
            assert FOLDED in shown and 10 < len(shown) - 1 < 150
        assert all(shown.get(r, -1) >= v for r, v in seen.items())  # none went away or down
        seen = shown
