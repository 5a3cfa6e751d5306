"""1c. Where tcp_probe's nanoseconds go, by ablation.

Variants of the object are built with -DEBT_ABLATE=<bit> (bpf/ablate.bpf.h),
each with one part of the hot path removed, and attached together with the
shipped build and the empty program, so every program sees the same events
in one run (bpf_stats: run_time_ns / run_cnt per program). A part's cost is
the shipped build's ns/event minus the variant's; a part whose removal saves
nothing within the noise costs nothing worth cutting. Variants run the rtt
collector only (the others are detached) and count wrongly on purpose: their
figures are costs, never counts. Two workloads: sockperf ping-pong (every
tcp_probe run records a sample) and a one-way bulk transfer (most runs stop
at the ack check).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass

import hooks
import probes
import workload
from bpfstats import prog_stats, stats_enabled

from ebpf_telemetry import plan

SRC = os.path.join(probes.ROOT, "bpf", "telemetry.bpf.c")
# (part, bit in bpf/ablate.bpf.h): one variant per part
PARTS: tuple[tuple[str, int], ...] = (
    ("settings look-up (a .data global instead)", 1 << 0),
    ("socket cast (bpf_rdonly_cast kfunc instead)", 1 << 1),
    ("peer caches (tables every event)", 1 << 2),
    ("peer classification (all)", 1 << 3),
    ("slot computation", 1 << 4),
    ("host histogram", 1 << 5),
    ("per-peer row (atomic)", 1 << 6),
    ("node metrics (host + peer)", 1 << 7),
    ("event sampling + lease check", 1 << 8),
    ("ack check", 1 << 9),
)
ALL_BUT_FLOOR = sum(bit for _, bit in PARTS)
WARM = "shipped (warm-up copy, first)"
FIRST, LAST = "shipped (before variants)", "shipped (after variants)"


@dataclass(frozen=True)
class Ablated:
    part: str  # "shipped", "empty", "everything removed", or a part of PARTS
    workload: str
    ns: float | None
    runs: int


@dataclass
class AblationResult:
    rows: list[Ablated]
    notes: list[str]

    def ns(self, part: str, load: str) -> float | None:
        return next((r.ns for r in self.rows if r.part == part and r.workload == load), None)


def _build(tmp: str, bits: int) -> str:
    return probes.compile_bpf(SRC, os.path.join(tmp, f"abl-{bits}.bpf.o"), [f"-DEBT_ABLATE={bits}"])


def _rtt_only(t: probes.Telemetry) -> int:
    for c in plan.COLLECTORS:
        if c.name != "rtt":
            with contextlib.suppress(FileNotFoundError):
                t.detach(c.name)
    return t.prog_ids()["tcp_probe"]


def measure(seconds: float) -> AblationResult:
    notes: list[str] = []
    variants = [*PARTS, ("everything removed", ALL_BUT_FLOOR)]
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        empty = stack.enter_context(
            probes.held_object(probes.compile_bpf(hooks.EMPTY_SRC, os.path.join(tmp, "e.bpf.o")))
        )
        ids = {"empty": empty.ids["empty_tcp_probe"]}
        # programs on one hook run in attach order and the first of ours
        # meets the socket's lines cold: a shipped copy goes first to take
        # that, and the shipped build is measured before and after the variants
        ids[WARM] = _rtt_only(stack.enter_context(probes.telemetry("abl-warm")))
        ids[FIRST] = _rtt_only(stack.enter_context(probes.telemetry("abl-0")))
        for part, bits in variants:
            try:
                t = stack.enter_context(probes.telemetry(f"abl-{bits}", obj=_build(tmp, bits)))
            except Exception as e:  # a kernel without the kfunc: say so, measure the rest
                notes.append(f"1c: variant without {part} did not load: {e}")
                continue
            ids[part] = _rtt_only(t)
        ids[LAST] = _rtt_only(stack.enter_context(probes.telemetry("abl-last")))
        port = stack.enter_context(workload.sockperf_server())
        rows: list[Ablated] = []
        for load, run in (
            ("ping-pong", lambda: workload.ping_pong(port, seconds)),
            ("bulk", lambda: hooks.bulk(seconds)),
        ):
            with stats_enabled():
                before = {k: prog_stats(i) for k, i in ids.items()}
                run()
                after = {k: prog_stats(i).since(before[k]) for k, i in ids.items()}
            rows += [Ablated(k, load, d.ns_per_event, d.run_cnt) for k, d in after.items()]
            rows.append(_shipped(rows, load))
    return AblationResult(rows, notes)


def _shipped(rows: list[Ablated], load: str) -> Ablated:
    """The shipped build's figure: the mean of its copies before and after the variants."""
    two = [r for r in rows if r.workload == load and r.part in (FIRST, LAST) and r.ns is not None]
    ns = sum(r.ns for r in two if r.ns is not None) / len(two) if two else None
    return Ablated("shipped", load, ns, max((r.runs for r in two), default=0))
