"""1. Per-event cost of each hook (bpf_stats), ours beside the empty floor,
bpftrace (tcp_probe) and libbpf-tools runqlat (sched), all attached together
under one sockperf ping-pong, so every program sees the same events."""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
from dataclasses import dataclass

import probes
import workload
from bpfstats import ProgStats, prog_stats, stats_enabled

from ebpf_telemetry.maps import Pins
from ebpf_telemetry.snapshot import take

EMPTY_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "empty.bpf.c")
HOOKS = ("tcp_probe", "sched_wakeup", "sched_wakeup_new", "sched_switch")


@dataclass(frozen=True)
class HookCost:
    hook: str
    who: str  # ours, ours-cold (first on the hook), empty, bpftrace, runqlat
    ns: float | None
    events: int


@dataclass
class HookResult:
    costs: list[HookCost]
    seconds: float
    notes: list[str]

    def ns(self, hook: str, who: str) -> float | None:
        for c in self.costs:
            if c.hook == hook and c.who == who:
                return c.ns
        return None


def _watch(
    t: probes.Telemetry, empty: probes.Held, tools: list[probes.Tool]
) -> dict[tuple[str, str], int]:
    """(hook, who) -> program id."""
    ids = {(h, "ours"): i for h, i in t.prog_ids().items() if h in HOOKS}
    ids |= {(name.removeprefix("empty_"), "empty"): i for name, i in empty.ids.items()}
    for tool in tools:
        for name, i in tool.ids.items():
            hook = "tcp_probe" if tool.name == "bpftrace" else name
            if hook in HOOKS:
                ids[(hook, tool.name)] = i
    return ids


def measure(seconds: float) -> HookResult:
    notes: list[str] = []
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
            with stats_enabled():
                before = {k: prog_stats(i) for k, i in ids.items()}
                workload.ping_pong(port, seconds)
                after = {k: prog_stats(i) for k, i in ids.items()}
    costs = [_cost(k, after[k].since(before[k])) for k in sorted(ids)]
    return HookResult(costs, seconds, notes)


def _cost(key: tuple[str, str], d: ProgStats) -> HookCost:
    return HookCost(key[0], key[1], d.ns_per_event, d.run_cnt)


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
