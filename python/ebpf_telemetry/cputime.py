"""CPU utilisation from the kernel's own per-CPU time accounting (/proc/stat).

Why not from sched_switch: idle accounting in a BPF program is exact only if
every switch to and from the idle task reaches the tracepoint. On some
virtualised kernels it does not: on the CI host (6.18.44-fc, booted with
sched_vcpu_pack), ftrace's own sched_switch events showed 108 switches into
idle on CPU 1 over 3 s and none out of it, and a program that tracked idle
state from them read 21% busy on an idle machine. The kernel's accounting
(/proc/stat: ticks for busy time, the nohz idle clock for idle time) does not
depend on the tracepoint, costs nothing in the scheduler's hot path, and is
the figure every other tool (node_exporter, top, mpstat) reports.

busy = user + nice + system + irq + softirq + steal; idle = idle + iowait
(guest time is already inside user and nice).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

PROC_STAT = "/proc/stat"
_NS_PER_TICK = 1_000_000_000 // os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class CpuTime:
    """Idle and busy time of all CPUs together since boot, nanoseconds."""

    idle_ns: int = 0
    busy_ns: int = 0

    def utilization_since(self, prev: CpuTime) -> float | None:
        """Busy share of the time between prev and self; None when no time
        passed or a count went down (a CPU went offline: its counts leave the
        sum), rather than a ratio of unrelated totals."""
        idle, busy = self.idle_ns - prev.idle_ns, self.busy_ns - prev.busy_ns
        if idle < 0 or busy < 0 or idle + busy == 0:
            return None
        return busy / (idle + busy)


def parse(text: str) -> CpuTime:
    """The aggregate `cpu` line of /proc/stat's text."""
    line = text.split("\n", 1)[0].split()
    if not line or line[0] != "cpu":
        raise ValueError("no aggregate cpu line")
    # user nice system idle iowait irq softirq steal [guest guest_nice]
    ticks = [int(x) for x in line[1:9]] + [0] * max(0, 9 - len(line))
    idle = ticks[3] + ticks[4]
    return CpuTime(idle * _NS_PER_TICK, (sum(ticks) - idle) * _NS_PER_TICK)


def read(path: str = PROC_STAT) -> CpuTime:
    with open(path) as f:
        return parse(f.readline())
