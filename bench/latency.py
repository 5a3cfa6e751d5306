"""2. Loopback TCP request/response latency, all collectors attached vs none:
sockperf ping-pong medians from alternating runs (bpf stats off)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import probes
import workload


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
