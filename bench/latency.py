"""2. Loopback TCP request/response latency, all collectors attached vs none:
sockperf ping-pong medians from alternating runs (bpf stats off); then one
run with bpf stats on that gives the programs' own run time per round trip,
beside an empty program's on each of the same hooks (inline()).
"""

from __future__ import annotations

import os
import statistics
import tempfile
from dataclasses import dataclass

import probes
import workload
from bpfstats import during
from hooks import EMPTY_SRC


@dataclass(frozen=True)
class LatencyResult:
    with_us: list[float]
    without_us: list[float]

    @property
    def median_with(self) -> float:
        return statistics.median(self.with_us)

    @property
    def median_without(self) -> float:
        return statistics.median(self.without_us)

    @property
    def ratio(self) -> float:
        """Median of the per-pair ratios: each pair ran back to back, so
        slow drift of the machine's load cancels out within a pair."""
        pairs = zip(self.with_us, self.without_us, strict=True)
        return statistics.median(w / wo for w, wo in pairs)


def measure(pairs: int, seconds: float) -> LatencyResult:
    """Alternate none/all (then all/none) so drift hits both sides alike."""
    with_us: list[float] = []
    without_us: list[float] = []
    with workload.sockperf_server() as port:
        workload.ping_pong(port, 1)  # warm-up
        for i in range(pairs):
            for attached in (False, True) if i % 2 == 0 else (True, False):
                if attached:
                    with probes.telemetry("latency"):
                        with_us.append(workload.ping_pong(port, seconds))
                else:
                    without_us.append(workload.ping_pong(port, seconds))
    return LatencyResult(with_us, without_us)


Runs = dict[str, tuple[int, int]]  # hook -> (runs, run time ns) over one run


@dataclass(frozen=True)
class InlineCost:
    """One ping-pong run, ours and an empty program on each hook ours uses
    both attached, bpf stats on. The programs run inside the round trip
    (softirq, scheduler): their run time per round trip is what they add to
    its latency at most, measured by the kernel, without the run-to-run noise
    of the paired medians; the empty programs' is what any program on those
    hooks adds (dispatch, bpf_stats)."""

    round_trips: int
    rtt_us: float  # 2 x the run's median one-way latency
    ours: Runs
    empty: Runs

    def ns_per_round_trip(self, who: Runs) -> float:
        return sum(ns for _, ns in who.values()) / max(self.round_trips, 1)

    def share(self, who: Runs) -> float:
        """Run time per round trip, % of the round trip."""
        return 100 * self.ns_per_round_trip(who) / (self.rtt_us * 1000)

    def runs_per_round_trip(self, who: Runs, hook: str) -> float:
        return who[hook][0] / max(self.round_trips, 1)


def inline(seconds: float) -> InlineCost:
    with tempfile.TemporaryDirectory() as tmp:
        empty_obj = probes.compile_bpf(EMPTY_SRC, os.path.join(tmp, "empty.bpf.o"))
        with (
            probes.telemetry("latency-inline") as t,
            probes.held_object(empty_obj) as empty,
            workload.sockperf_server() as port,
        ):
            workload.ping_pong(port, 1)  # warm-up
            ours = t.prog_ids()
            floor = {h: i for n, i in empty.ids.items() if (h := n.removeprefix("empty_")) in ours}
            ids = {("ours", h): i for h, i in ours.items()} | {
                ("empty", h): i for h, i in floor.items()
            }
            runs, pp = during(ids, lambda: workload.ping_pong_run(port, seconds))
    return InlineCost(
        pp.round_trips,
        2 * pp.median_us,
        {h: (d.run_cnt, d.run_time_ns) for (who, h), d in runs.items() if who == "ours"},
        {h: (d.run_cnt, d.run_time_ns) for (who, h), d in runs.items() if who == "empty"},
    )
