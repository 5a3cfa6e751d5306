"""Where the RTT hook's time goes: rtt_variants.bpf.c's stages (the product
cut cumulatively) and lean rewrites, each attached alone beside the empty
floor under the same sockperf ping-pong; bpf_stats per-event cost."""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
from dataclasses import dataclass, replace

import probes
import workload
from bpfstats import prog_stats, stats_enabled

from ebpf_telemetry import loader, nodes
from ebpf_telemetry.config import Config
from ebpf_telemetry.maps import Pins

HERE = os.path.dirname(os.path.abspath(__file__))
EXPLAIN = {
    "s1_settings": "settings lookup + bpf_skc_to_tcp_sock",
    "s2_peer": "+ node id from socket storage",
    "s3_hist": "+ 2 histogram adds (node 0, peer)",
    "s4_metrics": "+ 2 node_metrics adds + bpf_ktime_get_ns",
    "s5_product": "+ overflow/debug checks + 1-in-100 event = product",
    "l1_no_host": "product without the node-0 adds",
    "l1b_no_ktime": "l1 without bpf_ktime_get_ns (no metrics timestamp)",
    "l2_one_value": "l1 + hist and sums in one map value, no ktime",
    "l3_sock_sample": "l2 + sampling counter in socket storage",
    "l4_hash_peer": "l2 with node from the address hash (no socket storage)",
}


@dataclass(frozen=True)
class StageCost:
    stage: str
    what: str
    ns: float | None
    floor_ns: float | None
    events: int


def measure(seconds: float, rounds: int) -> list[StageCost]:
    """All stages attached together (same events, same moment), the empty
    floor first; each round rotates the order the stages run in (attach
    order), so that no stage always finds the caches warmed by another."""
    root = probes.pin_dir("profile")
    with tempfile.TemporaryDirectory() as tmp:
        variants = probes.compile_bpf(
            os.path.join(HERE, "rtt_variants.bpf.c"), os.path.join(tmp, "v.o")
        )
        empty = probes.compile_bpf(os.path.join(HERE, "empty.bpf.c"), os.path.join(tmp, "e.o"))
        os.makedirs(root, mode=0o700, exist_ok=True)
        try:
            with (
                probes.held_object(variants, root, attach=False) as h,
                probes.held_object(empty) as floor,
                workload.sockperf_server() as port,
            ):
                with Pins(root) as pins:  # settings: the programs count nothing before
                    nodes.apply(pins, replace(Config(), pin_dir=root))
                stages = [n for n in h.ids if n in EXPLAIN]  # not the headers' own programs
                runs: dict[str, list[StageCost]] = {n: [] for n in stages}
                floor_id = floor.ids["empty_tcp_probe"]
                for k in range(rounds):
                    order = stages[k % len(stages) :] + stages[: k % len(stages)]
                    for c in _round(h, order, floor_id, port, seconds):
                        runs[c.stage].append(c)
                return [_median(runs[n]) for n in stages]
        finally:
            with contextlib.suppress(Exception):
                loader.unload(root)


def _median(runs: list[StageCost]) -> StageCost:
    ns = [r.ns for r in runs if r.ns is not None]
    fl = [r.floor_ns for r in runs if r.floor_ns is not None]
    return StageCost(
        runs[0].stage,
        runs[0].what,
        statistics.median(ns) if ns else None,
        statistics.median(fl) if fl else None,
        sum(r.events for r in runs),
    )


def _round(
    h: probes.Held, order: list[str], floor_id: int, port: int, seconds: float
) -> list[StageCost]:
    for name in order:
        h.attach(name)
    try:
        with stats_enabled():
            ids = [h.ids[n] for n in order]
            b, fb = [prog_stats(i) for i in ids], prog_stats(floor_id)
            workload.ping_pong(port, seconds)
            a, fa = [prog_stats(i) for i in ids], prog_stats(floor_id)
    finally:
        for name in order:
            h.detach(name)
    floor_ns = fa.since(fb).ns_per_event
    out = []
    for name, x, y in zip(order, b, a, strict=True):
        d = y.since(x)
        out.append(StageCost(name, EXPLAIN[name], d.ns_per_event, floor_ns, d.run_cnt))
    return out
