"""1c. Where tcp_probe's and sched_switch's nanoseconds go, by ablation.

Variants of the object are built with -DEBT_ABLATE=<bit> (bpf/ablate.bpf.h),
each with one part of the hot path removed, and attached together with the
shipped build and the empty program, so every program sees the same events
in one run (bpf_stats: run_time_ns / run_cnt per program). A part's cost is
the shipped build's ns/event minus the variant's; a part whose removal saves
nothing within the noise costs nothing worth cutting. Variants run the rtt
collector only (the others are detached) and count wrongly on purpose: their
figures are costs, never counts. Each variant keeps two collectors, rtt
(tcp_probe) and sched (sched_switch), the others are detached: one build
ablates a part in both programs where both have it (SCHED_BITS: settings,
slot, host histogram, host_metrics, emit_event), and both hooks are measured
in the same run. Two workloads: sockperf ping-pong (every tcp_probe run
records a sample) and a one-way bulk transfer (most runs stop at the ack
check); sched_switch sees every context switch of the machine under either.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass

import hooks
import probes
import workload
from bpfstats import during

from ebpf_telemetry import plan

SRC = os.path.join(probes.ROOT, "bpf", "telemetry.bpf.c")
SLOT, HOST_HIST, ACK_CHECK = 1 << 4, 1 << 5, 1 << 9  # bits of bpf/ablate.bpf.h named below
# (part, bit in bpf/ablate.bpf.h): one variant per part
PARTS: tuple[tuple[str, int], ...] = (
    ("settings look-up (a .data global instead)", 1 << 0),
    ("socket cast (the helper instead of the bpf_rdonly_cast kfunc)", 1 << 1),
    ("peer caches (tables every event)", 1 << 2),
    ("peer classification (all)", 1 << 3),
    ("slot computation", SLOT),
    ("host histogram", HOST_HIST),
    ("per-peer row (atomic)", 1 << 6),
    ("node metrics (host + peer)", 1 << 7),
    ("event sampling + lease check", 1 << 8),
    ("ack check", ACK_CHECK),
)
ALL_BUT_FLOOR = sum(bit for _, bit in PARTS)
# the other way round: everything removed but one part, what that part costs
# on its own over the floor (the empty program): the least any program doing
# it can cost. The histogram add keeps its slot computation and, in
# tcp_probe, the ack check (a bulk transfer's runs stop there, as shipped).
HIST_ALONE = "the histogram add alone (slot computed; tcp_probe: ack check kept)"
ACK_ALONE = "the ack check alone (tcp_probe: the socket's lines read)"
ALONE: tuple[tuple[str, int], ...] = (
    (HIST_ALONE, ALL_BUT_FLOOR & ~(SLOT | HOST_HIST | ACK_CHECK)),
    (ACK_ALONE, ALL_BUT_FLOOR & ~ACK_CHECK),
)
# the parts sched_switch has (bpf/sched.bpf.h), named for what they are there
SCHED_PARTS = {
    1 << 0: "settings look-up (a .data global instead)",
    1 << 4: "slot computation",
    1 << 5: "host histogram",
    1 << 7: "host_metrics (sum, count; the 1-in-N test then counts in sample_ctr)",
    1 << 8: "emit_nth_event (1-in-N test on runqlat_count + lease check)",
}
SCHED_BITS = sum(SCHED_PARTS)
HOOKS = ("tcp_probe", "sched_switch")
KEPT = ("rtt", "sched")  # collectors a variant keeps attached
WARM = "shipped (warm-up copy, first)"
FIRST, LAST = "shipped (before variants)", "shipped (after variants)"


@dataclass(frozen=True)
class Ablated:
    hook: str  # tcp_probe or sched_switch
    part: str  # "shipped", "empty", "everything removed", or a part of PARTS
    workload: str
    ns: float | None
    runs: int


@dataclass
class AblationResult:
    rows: list[Ablated]
    notes: list[str]
    load: dict[str, float]  # workload -> 1-minute load average right after it

    def ns(self, part: str, load: str, hook: str = "tcp_probe") -> float | None:
        return next(
            (r.ns for r in self.rows if r.part == part and r.workload == load and r.hook == hook),
            None,
        )


def sched_label(part: str) -> str | None:
    """What a variant removes from sched_switch; None: nothing (the part is tcp_probe's)."""
    bits = dict(PARTS).get(part)
    if part == "everything removed":
        return part
    if part == HIST_ALONE:
        return "the histogram add alone (slot computed)"
    if part == ACK_ALONE:
        return None  # sched_switch has no ack check: it is the floor variant there
    return SCHED_PARTS.get(bits) if bits is not None else part


def _build(tmp: str, bits: int) -> str:
    return probes.compile_bpf(SRC, os.path.join(tmp, f"abl-{bits}.bpf.o"), [f"-DEBT_ABLATE={bits}"])


def _kept(t: probes.Telemetry, part: str) -> dict[tuple[str, str], int]:
    """Detach all but rtt and sched: (hook, part) -> program id."""
    for c in plan.COLLECTORS:
        if c.name not in KEPT:
            with contextlib.suppress(FileNotFoundError):
                t.detach(c.name)
    ids = t.prog_ids()
    return {(h, part): ids[h] for h in HOOKS if h in ids}


def measure(seconds: float) -> AblationResult:
    notes: list[str] = []
    variants = [*PARTS, ("everything removed", ALL_BUT_FLOOR), *ALONE]
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        empty = stack.enter_context(
            probes.held_object(probes.compile_bpf(hooks.EMPTY_SRC, os.path.join(tmp, "e.bpf.o")))
        )
        ids = {(h, "empty"): empty.ids[f"empty_{h}"] for h in HOOKS}
        # programs on one hook run in attach order and the first of ours
        # meets the socket's lines cold: a shipped copy goes first to take
        # that, and the shipped build is measured before and after the variants
        ids |= _kept(stack.enter_context(probes.telemetry("abl-warm")), WARM)
        ids |= _kept(stack.enter_context(probes.telemetry("abl-0")), FIRST)
        for part, bits in variants:
            try:
                t = stack.enter_context(probes.telemetry(f"abl-{bits}", obj=_build(tmp, bits)))
            except Exception as e:  # a kernel without the kfunc: say so, measure the rest
                notes.append(f"1c: variant without {part} did not load: {e}")
                continue
            ids |= _kept(t, part)
        ids |= _kept(stack.enter_context(probes.telemetry("abl-last")), LAST)
        port = stack.enter_context(workload.sockperf_server())
        rows: list[Ablated] = []
        load: dict[str, float] = {}
        for wl, run in (
            ("ping-pong", lambda: workload.ping_pong(port, seconds)),
            ("bulk", lambda: hooks.bulk(seconds)),
        ):
            after, _ = during(ids, run)
            load[wl] = os.getloadavg()[0]
            rows += [Ablated(h, p, wl, d.ns_per_event, d.run_cnt) for (h, p), d in after.items()]
            rows += [_shipped(rows, h, wl) for h in HOOKS]
    return AblationResult(rows, notes, load)


def _shipped(rows: list[Ablated], hook: str, load: str) -> Ablated:
    """The shipped build's figure: the mean of its copies before and after the variants."""
    two = [
        r
        for r in rows
        if r.hook == hook and r.workload == load and r.part in (FIRST, LAST) and r.ns is not None
    ]
    ns = sum(r.ns for r in two if r.ns is not None) / len(two) if two else None
    return Ablated(hook, "shipped", load, ns, max((r.runs for r in two), default=0))
