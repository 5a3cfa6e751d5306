"""Benchmark for issue 5: `make bench` (bench/run.py --out bench-results/bench.json).

Measures, each in the same run as its comparison:
 1. per-event cost of each hook (bpf_stats) vs an empty program, bpftrace, runqlat,
    under ping-pong and bulk;
    1c. where tcp_probe's and sched_switch's cost goes: variants with one part
    removed each (ablation.py);
 2. loopback request/response latency with all collectors vs none;
 3. one userspace collection cycle at 1/64/255 peers for each rtt_buckets value
    (read / compute / format / write), the agent's RSS and CPU; PromQL's
    accuracy per rtt_buckets value; kernel map memory at 64 and 256 CPUs;
 4. the event rate the `events` CLI drains at sample_rate 1 without loss;
 5. a fleet of F synthetic nodes exported by the real collector to one real
    Prometheus (fleet.py; `make bench-fleet` runs it alone).
Prints a table, then the targets (issue 20's among them) as met / not met,
each with the 1-minute load average when its figure was taken, and writes
the same figures as JSON. Leaves nothing attached:
every pin dir is /sys/fs/bpf/ebt-bench-<pid>-<part> and is unloaded after use.

    bench/run.py [--out PATH] [--quick] [--only hooks|ablation|latency|userspace|events|fleet]
Needs root, the built object, sockperf, bpftrace, libbpf-tools (runqlat), clang,
prometheus.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass

import structlog

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ablation
import bigtable
import eventstream
import export
import fleet
import hooks
import latency
import layoutcost
import probes
import tablecheck
import userspace
from bpfstats import stats_sysctl
from report import Report, fmt, ratio

from ebpf_telemetry.binding import lib
from ebpf_telemetry.config import Config
from ebpf_telemetry.histogram import EDGE_SCHEMES
from ebpf_telemetry.maps import Pins


@dataclass(frozen=True)
class Plan:
    hook_seconds: float
    latency_pairs: int
    latency_seconds: float
    cycles: int
    agent_seconds: float
    agent_warmup: float
    stream_seconds: float
    stream_rates: tuple[int, ...]
    fleet_cases: tuple[fleet.Case, ...] = fleet.CASES


FULL = Plan(20, 8, 3, 50, 60, 8, 3, (2000, 5000, 10000, 20000, 50000, 100000))
QUICK = Plan(5, 2, 2, 10, 12, 3, 2, (2000, 20000), fleet.QUICK_CASES)
PEER_COUNTS = (1, 64, 255)
BIG_COUNTS = (1024, 4096, 16384)


def run_hooks(r: Report, plan: Plan) -> None:
    h = hooks.measure(plan.hook_seconds)
    r.add("hooks", h)
    r.notes.extend(h.notes)
    for wl in hooks.WORKLOADS:
        s = f"1. per-event cost (bpf_stats, {wl}, all attached at once; load {h.load[wl]:.2f})"
        for c in sorted((c for c in h.costs if c.workload == wl), key=lambda c: (c.hook, c.who)):
            r.row(s, f"{c.hook:<16} {c.who}", _hook_cost(c))
        for who in ("ours", "runqlat"):
            r.row(
                s,
                f"{'sched, total':<16} {who}",
                f"{fmt(h.sched_total(who, wl), '.0f', ' ns')} per context switch",
            )
        r.row(s, "", "(sched, total: run_time_ns of its programs on the three sched hooks")
        r.row(s, "", " summed, / sched_switch runs; ours has none on the wakeup hooks)")
    for sp in hooks.probe_split(plan.hook_seconds / 2):
        r.add(f"tcp_probe {sp.workload}", sp)
        r.row(
            "1b. tcp_probe per RTT measurement, not per segment",
            f"{sp.workload}",
            f"{fmt(sp.ns, '.0f', ' ns')}/run over {sp.runs} runs, {sp.samples} samples "
            f"({100 * sp.samples / max(sp.runs, 1):.0f}% of runs record)",
        )
    run_layout_cost(r, plan)
    hook_targets(r, h)


def _hook_cost(c: hooks.HookCost) -> str:
    if not c.attached:
        return "0 ns: nothing of ours attached here"
    return f"{fmt(c.ns, '.0f', ' ns')}  ({c.events} events)"


def hook_targets(r: Report, h: hooks.HookResult) -> None:
    """Issue 20's per-hook targets, for each workload of part 1."""
    for wl in hooks.WORKLOADS:
        load = h.load[wl]
        for hook in ("tcp_probe", "sched_switch"):
            ours, floor = h.ns(hook, "ours", wl), h.ns(hook, "empty", wl)
            r.target(f"{hook} / empty ({wl})", ratio(ours, floor), "x", 2.0, load)
        for hook in ("sched_wakeup", "sched_wakeup_new"):
            c = next(c for c in h.costs if (c.hook, c.who, c.workload) == (hook, "ours", wl))
            if c.attached:
                r.target(
                    f"{hook} / empty ({wl})", ratio(c.ns, h.ns(hook, "empty", wl)), "x", 2.0, load
                )
            else:
                r.target(f"{hook} / empty ({wl}): nothing attached", 0.0, "x", 2.0, load)
        bt = ratio(h.ns("tcp_probe", "ours", wl), h.ns("tcp_probe", "bpftrace", wl))
        r.target(f"tcp_probe / bpftrace hist ({wl})", bt, "x", 0.4, load)
        rq = ratio(h.sched_total("ours", wl), h.sched_total("runqlat", wl))
        r.target(f"sched total per switch / runqlat's ({wl})", rq, "x", 0.3, load)


def run_ablation(r: Report, plan: Plan) -> None:
    a = ablation.measure(plan.hook_seconds / 2)
    r.add("ablation", a)
    r.notes.extend(a.notes)
    for hook in ablation.HOOKS:
        s = f"1c. {hook} by ablation: one part removed per variant, all in one run"
        for load in ("ping-pong", "bulk"):
            full, floor = a.ns("shipped", load, hook), a.ns("empty", load, hook)
            for row in (x for x in a.rows if x.workload == load and x.hook == hook):
                label = row.part if hook == "tcp_probe" else ablation.sched_label(row.part)
                if label is None:
                    continue  # a part sched_switch does not have
                saved = ratio_diff(full, row.ns) if row.part in PART_NAMES else None
                alone = ratio(row.ns, floor) if row.part in ALONE_NAMES else None
                r.row(
                    s,
                    f"{load:<9} {label}",
                    f"{fmt(row.ns, '.0f', ' ns')}"
                    + (f"  saves {fmt(saved, '.0f', ' ns')}" if saved is not None else "")
                    + (f"  {fmt(alone, '.2f', 'x')} the empty program" if alone is not None else "")
                    + f"  ({row.runs} runs; load {a.load[load]:.2f})",
                )
            r.target(f"{hook} / empty (1c, {load})", ratio(full, floor), "x", 2.0, a.load[load])


PART_NAMES = {p for p, _ in ablation.PARTS} | {"everything removed"}
ALONE_NAMES = {p for p, _ in ablation.ALONE}


def ratio_diff(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def run_layout_cost(r: Report, plan: Plan) -> None:
    costs = layoutcost.measure(plan.hook_seconds / 2)
    r.add("layout_cost", costs)
    for c in costs:
        r.row(
            "1d. tcp_probe: peer counters in shared rows vs per-CPU rows (same events)",
            f"{c.layout:<13} attached {'first' if c.order == 1 else 'second'}",
            f"{fmt(c.ns, '.0f', ' ns')}/run over {c.events} runs",
        )


def run_latency(r: Report, plan: Plan) -> None:
    lat = latency.measure(plan.latency_pairs, plan.latency_seconds)
    r.add(
        "latency",
        {
            "with_us": lat.with_us,
            "without_us": lat.without_us,
            "median_with_us": lat.median_with,
            "median_without_us": lat.median_without,
            "ratio": lat.ratio,
        },
    )
    s = "2. request/response latency (sockperf pp median, RTT/2)"
    r.row(s, "no collectors", f"{lat.median_without:.3f} us  runs {lat.without_us}")
    r.row(s, "all collectors", f"{lat.median_with:.3f} us  runs {lat.with_us}")
    r.row(s, "overhead (median of paired ratios)", f"{100 * (lat.ratio - 1):+.1f} %")
    r.target("request/response latency overhead", 100 * (lat.ratio - 1), "%", 1.0)
    run_inline(r, plan)


def run_inline(r: Report, plan: Plan) -> None:
    c = latency.inline(plan.latency_seconds)
    r.add("latency_inline", asdict(c))
    s = "2b. the programs' run time per round trip (one ping-pong run, bpf stats on)"
    for name, who in (("ours", c.ours), ("empty programs, same hooks", c.empty)):
        hooks = ", ".join(
            f"{h} {c.runs_per_round_trip(who, h):.2f} x {ns / n:.0f} ns"
            for h, (n, ns) in sorted(who.items())
            if n
        )
        r.row(
            s,
            name,
            f"{c.ns_per_round_trip(who):.0f} ns = {c.share(who):.2f} % of the "
            f"{c.rtt_us:.1f} us round trip ({c.round_trips} round trips; {hooks})",
        )
    above = c.ns_per_round_trip(c.ours) - c.ns_per_round_trip(c.empty)
    share = c.share(c.ours) - c.share(c.empty)
    r.row(s, "ours less the empty programs", f"{above:.0f} ns = {share:.2f} % of the round trip")


def run_userspace(r: Report, plan: Plan) -> None:
    s = "3. userspace"
    cyc = userspace.cycles(PEER_COUNTS, plan.cycles, EDGE_SCHEMES)
    r.add("cycles", cyc)
    for c in cyc:
        r.row(
            s,
            f"cycle {c.rtt_buckets:<6} {c.peers:>3} peers",
            f"median {c.median_ms:5.1f} ms, p95 {c.p95_ms:5.1f} ms = read {c.read_ms:.1f} "
            f"+ compute {c.compute_ms:.1f} + format {c.format_ms:.1f} + write {c.write_ms:.1f}; "
            f"{c.lines_per_peer} lines/peer, {c.textfile_bytes:,} B",
        )
    default = Config.rtt_buckets
    at_255 = next(c for c in cyc if c.rtt_buckets == default and c.peers == PEER_COUNTS[-1])
    r.target(f"cycle p95 at 255 peers ({default})", at_255.p95_ms, "ms", 20.0)
    ag = userspace.agent(PEER_COUNTS[-1], plan.agent_seconds, plan.agent_warmup)
    r.add("agent", ag)
    r.row(s, "agent RSS (max)", f"{ag.rss_mb:.1f} MB")
    r.row(
        s,
        "agent CPU",
        f"{ag.cpu_pct:.2f} % of one core over {ag.seconds:.0f} s "
        f"(interval 5 s, {ag.peers_in_textfile} peers in textfile, rtt_buckets {default})",
    )
    r.target("agent RSS", ag.rss_mb, "MB", 60.0)
    r.target("agent CPU", ag.cpu_pct, "%", 1.0)
    run_export(r)
    run_tablecheck(r, plan)
    run_bigtable(r, plan)


def run_bigtable(r: Report, plan: Plan) -> None:
    s = "3d. the cycle at thousands of peers (1/16 moving; the default export, max_series 1,000)"
    big = bigtable.measure(BIG_COUNTS, plan.cycles)
    r.add("bigtable", big)
    r.row(s, "interpreter", bigtable.interpreter())  # it sets the text format's cost
    for b in big:
        parts = " + ".join(f"{k} {v:.1f}" for k, v in b.parts_ms.items())
        r.row(
            s,
            f"{b.peers:>6} peers ({b.moving} moving)",
            f"median {b.median_ms:.1f} ms, p95 {b.p95_ms:.1f} ms = {parts}; "
            f"CPU {b.cpu_pct:.2f} % at 5 s; RSS {b.rss_mb:.0f} MB peak, {b.rss_end_mb:.0f} MB "
            f"at the end ({b.rss_base_mb:.0f} MB before the table); {b.textfile_bytes:,} B, "
            f"{b.samples:,} samples (exposition "
            f"{1e3 * b.parts_ms['exposition'] / max(b.samples, 1):.1f} us a sample)",
        )
    top = big[-1]
    r.target(f"cycle p95 at {top.peers} peers", top.p95_ms, "ms", 20.0)
    r.target(f"CPU at {top.peers} peers, 5 s interval", top.cpu_pct, "%", 0.5)
    r.target(f"RSS (peak) at {top.peers} peers", top.rss_mb, "MB", 80.0)
    busy = bigtable.measure((BIG_COUNTS[-1],), max(plan.cycles // 4, 3), every=1)[0]
    r.add("bigtable_busy", [busy])
    r.row(
        s,
        f"{busy.peers:>6} peers, every one moving (a busy node; no target)",
        f"median {busy.median_ms:.1f} ms, p95 {busy.p95_ms:.1f} ms = "
        + " + ".join(f"{k} {v:.1f}" for k, v in busy.parts_ms.items())
        + f"; CPU {busy.cpu_pct:.2f} % at 5 s; RSS {busy.rss_mb:.0f} MB peak",
    )


def run_tablecheck(r: Report, plan: Plan) -> None:
    s = "3c. the peer table's invariant check, every id live"
    costs = tablecheck.measure((255, 4094, 16384), plan.cycles)
    r.add("table_check", costs)
    for c in costs:
        r.row(
            s,
            f"{c.peers} peers",
            f"median {c.median_ms:.1f} ms, p95 {c.p95_ms:.1f} ms per cycle "
            f"(peer_info_map unchanged); reading peer_addr_map whole "
            f"{c.read_median_ms:.1f} / {c.read_p95_ms:.1f} ms; "
            f"first check with the pool {c.pool_check_ms:.1f} ms",
        )


def run_export(r: Report) -> None:
    s = "3b. PromQL accuracy (p50/p90/p99 of 3 RTT shapes) and kernel memory"
    acc = export.accuracy()
    r.add("accuracy", acc)
    low, high = Config.rtt_bucket_range_seconds
    for a in acc:
        r.row(
            s,
            f"histogram_quantile {a.buckets}",
            f"{a.edges} edges in [{low:g}, {high:g}] s: error mean {a.mean_err_pct:.1f}%, "
            f"max {a.max_err_pct:.1f}%",
        )
    with probes.telemetry("memory") as t, Pins(t.pins) as pins:
        mem = export.memory(pins, os.cpu_count() or 1)
    r.add("memory", mem)
    mib = 1 << 20
    for m in sorted(mem, key=lambda m: -m.bytes_256)[:6]:
        r.row(
            s,
            f"map {m.name}",
            f"{m.bytes_here / mib:.2f} MiB here, {m.bytes_64 / mib:.2f} at 64 CPUs, "
            f"{m.bytes_256 / mib:.2f} at 256{' (per-CPU)' if m.per_cpu else ''}",
        )
    total = {k: sum(getattr(m, k) for m in mem) / mib for k in ("bytes_64", "bytes_256")}
    r.row(
        s,
        "kernel maps, all",
        f"{total['bytes_64']:.1f} MiB at 64 CPUs, {total['bytes_256']:.1f} MiB at 256",
    )
    r.target("kernel memory at 256 CPUs", total["bytes_256"], "MiB", 64.0)
    big = export.memory_at(mem, lib.MAX_PEERS_LIMIT)
    r.add("memory_max_peers", big)
    top = {k: sum(getattr(m, k) for m in big) / mib for k in ("bytes_64", "bytes_256")}
    for m in sorted(big, key=lambda m: -m.bytes_256)[:4]:
        r.row(
            s,
            f"map {m.name} at {lib.MAX_PEERS_LIMIT:,} peers",
            f"{m.bytes_64 / mib:.2f} MiB at 64 CPUs, {m.bytes_256 / mib:.2f} at 256"
            f"{' (per-CPU)' if m.per_cpu else ''}",
        )
    r.row(
        s,
        f"kernel maps, all, at {lib.MAX_PEERS_LIMIT:,} peers",
        f"{top['bytes_64']:.1f} MiB at 64 CPUs, {top['bytes_256']:.1f} MiB at 256",
    )
    r.target(
        f"kernel memory at {lib.MAX_PEERS_LIMIT:,} peers, 256 CPUs", top["bytes_256"], "MiB", 64.0
    )


def run_stream(r: Report, plan: Plan) -> None:
    st = eventstream.measure(plan.stream_rates, plan.stream_seconds)
    r.add(
        "events",
        {
            "steps": st.steps,
            "best": st.best,
            "first_behind": st.first_behind,
            "first_loss": st.first_loss,
        },
    )
    s = "4. event stream (`events` CLI to a pipe, sample_rate 1)"
    for p in st.steps:
        r.row(
            s,
            f"sockperf tp {p.mps} msg/s",
            f"offered {p.offered:,.0f} ev/s, drained "
            f"{p.drained:,.0f} lines/s, backlog {p.backlog:,}, lost {p.lost:,}",
        )
    best, behind, loss = st.best, st.first_behind, st.first_loss
    for label, step in (
        ("highest rate drained, no loss", best),
        ("first rate not kept up with", behind),
        ("first rate with loss", loss),
    ):
        r.row(s, label, fmt(step.offered if step else None, ",.0f", " ev/s"))
    for name, cap in st.capacity.items():
        r.row(s, f"drain capacity: {name}", fmt(cap, ",.0f", " ev/s (pre-filled ring)"))
    cli = st.capacity.get("cli")
    r.target_min("event stream (CLI drain)", cli / 1000 if cli else None, "k/s", 200.0)


def run_fleet(r: Report, plan: Plan) -> None:
    # pure userspace, last: niced from here on (Prometheus inherits it)
    os.nice(10)
    fleet.quiet_logs()
    fleet.run(r, plan.fleet_cases)


PARTS = {
    "hooks": run_hooks,
    "ablation": run_ablation,
    "latency": run_latency,
    "userspace": run_userspace,
    "events": run_stream,
    "fleet": run_fleet,
}


def run_parts(r: Report, plan: Plan, only: list[str] | None) -> float:
    """Each part in turn; seconds taken."""
    t0 = time.monotonic()
    for name, fn in PARTS.items():
        if only and name not in only:
            continue
        t = time.monotonic()
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        fn(r, plan)
        print(f"bench: {name} done in {time.monotonic() - t:.0f} s", file=sys.stderr, flush=True)
    return time.monotonic() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--out", default="bench-results/bench.json")
    p.add_argument("--quick", action="store_true", help="short runs (development)")
    p.add_argument("--only", action="append", choices=sorted(PARTS), help="some parts only")
    a = p.parse_args()
    if os.geteuid() != 0:
        print("bench: must run as root", file=sys.stderr)
        return 1
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )
    plan = QUICK if a.quick else FULL
    r = Report()
    stats_before, load0 = stats_sysctl(), os.getloadavg()[0]
    elapsed = run_parts(r, plan, a.only)
    if stats_sysctl() != stats_before:
        r.notes.append(f"kernel.bpf_stats_enabled was {stats_before}, is {stats_sysctl()}")
    load1 = os.getloadavg()[0]
    r.notes.append(
        f"load average {load0:.2f} at start, {load1:.2f} at end: other work on "
        "this machine shows up as noise in every figure"
    )
    print(r.table())
    print(f"\nbench: {elapsed:.0f} s; JSON: {a.out}")
    meta = {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "seconds": elapsed,
        "loadavg_start": load0,
        "loadavg_end": load1,
        "plan": asdict(plan),
        "quick": a.quick,
    }
    r.write_json(a.out, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
