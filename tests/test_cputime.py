"""cputime: /proc/stat's aggregate line into idle and busy time."""

from __future__ import annotations

import os

import pytest

from ebpf_telemetry import cputime
from ebpf_telemetry.cputime import CpuTime

TICK_NS = 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def test_parse_splits_idle_and_iowait_from_the_rest() -> None:
    # user nice system idle iowait irq softirq steal guest guest_nice
    t = cputime.parse("cpu  10 1 5 100 4 2 3 7 9 0\ncpu0 ...\n")
    assert t == CpuTime(idle_ns=104 * TICK_NS, busy_ns=28 * TICK_NS)  # guest is inside user


def test_parse_takes_an_old_kernels_shorter_line() -> None:
    assert cputime.parse("cpu 1 2 3 4") == CpuTime(4 * TICK_NS, 6 * TICK_NS)


def test_parse_refuses_what_is_not_the_aggregate_line() -> None:
    with pytest.raises(ValueError):
        cputime.parse("cpu0 1 2 3 4")


def test_utilization_is_the_busy_share_of_the_window() -> None:
    assert CpuTime(300, 100).utilization_since(CpuTime(200, 0)) == 0.5
    assert CpuTime(300, 100).utilization_since(CpuTime(300, 100)) is None  # no time passed


def test_a_count_that_went_down_gives_no_ratio() -> None:
    # a CPU went offline: its counts leave the sum; no ratio of unrelated totals
    assert CpuTime(100, 500).utilization_since(CpuTime(200, 400)) is None


def test_read_gives_this_machines_counts() -> None:
    t = cputime.read()
    assert t.idle_ns > 0 and t.busy_ns > 0
