"""1. Per-event cost of each hook (bpf_stats), ours beside the empty floor,
bpftrace (tcp_probe) and libbpf-tools runqlat (sched), all attached together
under one workload, so every program sees the same events; two workloads in
turn: sockperf ping-pong and a one-way bulk transfer.

Our sched collector is one sched_switch program (variant rq_clock, no task
storage): nothing of ours runs on sched_wakeup or sched_wakeup_new, whose
rows say so. runqlat runs on all three (it stamps the wakeup in a hash map
and reads it back at the switch), so the sched comparison is of totals: each
tool's run_time_ns summed over its programs on the sched hooks, divided by
the context switches (sched_switch runs) of the same interval."""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import probes
import workload
from bpfstats import ProgStats, during, prog_stats, stats_enabled

from ebpf_telemetry.maps import Pins
from ebpf_telemetry.snapshot import take

EMPTY_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "empty.bpf.c")
SCHED_HOOKS = ("sched_wakeup", "sched_wakeup_new", "sched_switch")
HOOKS = ("tcp_probe", *SCHED_HOOKS)
NAME_LEN = 15  # the kernel keeps 15 characters of a program's name
WORKLOADS = ("ping-pong", "bulk")


@dataclass(frozen=True)
class HookCost:
    hook: str
    who: str  # ours, ours-cold (first on the hook), empty, bpftrace, runqlat
    workload: str
    ns: float | None  # per run of this program; 0.0: nothing of `who` attached
    events: int
    run_time_ns: int = 0
    attached: bool = True


@dataclass
class HookResult:
    costs: list[HookCost]
    seconds: float
    notes: list[str]
    load: dict[str, float]  # workload -> 1-minute load average right after it

    def ns(self, hook: str, who: str, load: str = "ping-pong") -> float | None:
        for c in self.costs:
            if c.hook == hook and c.who == who and c.workload == load:
                return c.ns
        return None

    def sched_total(self, who: str, load: str = "ping-pong") -> float | None:
        """ns per context switch of everything `who` runs on the sched hooks:
        its run_time_ns summed over sched_wakeup, sched_wakeup_new and
        sched_switch, divided by the sched_switch runs of the interval (every
        program on a hook runs once per event, so any program's count is it)."""
        mine = [c for c in self.costs if c.workload == load and c.hook in SCHED_HOOKS]
        switches = max((c.events for c in mine if c.hook == "sched_switch"), default=0)
        runs = [c for c in mine if c.who == who and c.attached]
        if not switches or not runs:
            return None
        return sum(c.run_time_ns for c in runs) / switches


def hook_of(prog_name: str) -> str | None:
    """The hook a comparison tool's program is on, from its (truncated) name:
    runqlat's tp_btf programs are named for their hook."""
    return next((h for h in HOOKS if prog_name == h[:NAME_LEN]), None)


def _watch(
    t: probes.Telemetry, empty: probes.Held, tools: list[probes.Tool]
) -> dict[tuple[str, str], int]:
    """(hook, who) -> program id."""
    ids = {(h, "ours"): i for h, i in t.prog_ids().items() if h in HOOKS}
    ids |= {(name.removeprefix("empty_"), "empty"): i for name, i in empty.ids.items()}
    for tool in tools:
        for name, i in tool.ids.items():
            hook = "tcp_probe" if tool.name == "bpftrace" else hook_of(name)
            if hook in HOOKS:
                ids[(hook, tool.name)] = i
    return ids


def _runs(port: int, seconds: float) -> dict[str, Callable[[], object]]:
    return {
        "ping-pong": lambda: workload.ping_pong(port, seconds),
        "bulk": lambda: bulk(seconds),
    }


def measure(seconds: float) -> HookResult:
    notes: list[str] = []
    costs: list[HookCost] = []
    load: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        empty_obj = probes.compile_bpf(EMPTY_SRC, os.path.join(tmp, "empty.bpf.o"))
        # programs on one hook run in attach order; the first to read the
        # socket or task meets its cache lines cold (lines the kernel reads
        # right after anyway). A copy of ours goes first and takes that, shown
        # as "ours-cold"; every program measured after it sees the lines warm
        with (
            probes.telemetry("hooks-cold") as cold,
            probes.telemetry("hooks") as t,
            probes.held_object(empty_obj) as empty,
            probes.tools() as tools,
            workload.sockperf_server() as port,
        ):
            for tool in tools:
                if tool.error:
                    notes.append(f"{tool.name}: could not run: {tool.error}")
            ids = _watch(t, empty, tools)
            ids |= {(h, "ours-cold"): i for h, i in cold.prog_ids().items() if h in HOOKS}
            for wl, run in _runs(port, seconds).items():
                after, _ = during(ids, run)
                load[wl] = os.getloadavg()[0]
                costs += [_cost(k, wl, after[k]) for k in sorted(ids)]
                costs += _nothing_attached(ids, wl)
    return HookResult(costs, seconds, notes, load)


def _cost(key: tuple[str, str], wl: str, d: ProgStats) -> HookCost:
    return HookCost(key[0], key[1], wl, d.ns_per_event, d.run_cnt, d.run_time_ns)


def _nothing_attached(ids: dict[tuple[str, str], int], wl: str) -> list[HookCost]:
    """A row for each hook none of our programs is on: 0 ns per event."""
    return [
        HookCost(h, "ours", wl, 0.0, 0, 0, attached=False) for h in HOOKS if (h, "ours") not in ids
    ]


# -- tcp_probe: segments that carry an RTT measurement, and those that do not --------


@dataclass(frozen=True)
class ProbeSplit:
    workload: str
    ns: float | None  # tcp_probe per run
    runs: int
    samples: int  # RTT samples recorded (one per measurement)


def bulk(seconds: float) -> None:
    """One-way bulk TCP on loopback: the receiver acknowledges nothing new."""
    with socket.create_server((workload.HOST, 0)) as lst:
        sender = socket.create_connection(lst.getsockname())
        receiver, _ = lst.accept()
        stop = threading.Event()
        t = threading.Thread(
            target=lambda: [receiver.recv(1 << 20) for _ in iter(stop.is_set, True)]
        )
        t.start()
        chunk, end = b"\0" * (1 << 20), time.monotonic() + seconds
        while time.monotonic() < end:
            sender.sendall(chunk)
        stop.set()
        sender.close()
        t.join()
        receiver.close()


def probe_split(seconds: float) -> list[ProbeSplit]:
    """tcp_probe's cost per run under ping-pong (every segment acknowledges new
    data: a sample each, the whole program runs) and under a one-way bulk
    transfer (the receiver's segments return after the ack check). Before RTT
    was taken per measurement, every run cost what a recorded one does."""
    out = []
    with probes.telemetry("split") as t, workload.sockperf_server() as port, Pins(t.pins) as pins:
        prog = t.prog_ids()["tcp_probe"]
        for name, run in (
            ("ping-pong", lambda: workload.ping_pong(port, seconds)),
            ("bulk one-way", lambda: bulk(seconds)),
        ):
            with stats_enabled():
                s0, n0 = prog_stats(prog), take(pins).node(0).rtt_count
                run()
                d, n1 = prog_stats(prog).since(s0), take(pins).node(0).rtt_count
            out.append(ProbeSplit(name, d.ns_per_event, d.run_cnt, n1 - n0))
    return out
