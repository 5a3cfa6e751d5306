"""This build's tcp_probe and sched_switch beside those of another git
revision, attached together (two copies of each, in alternating order, after
a warm-up copy of this build) with the empty program, under one ping-pong and
one bulk transfer: what a change to the kernel side bought, on the same
events. Needs root; loads BPF (run it under the kernel lock on a shared host).

    bench/versus.py REV [--seconds S]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable

import structlog

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hooks
import probes
import workload
from bpfstats import during

HOOKS = ("tcp_probe", "sched_switch")
THIS = os.path.join(probes.ROOT, "build", "telemetry.bpf.o")


def build_rev(rev: str, tmp: str) -> str:
    """The BPF object of revision rev, compiled now from its bpf/ tree."""
    names = subprocess.run(
        ["git", "-C", probes.ROOT, "ls-tree", "--name-only", rev, "bpf/"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    os.makedirs(os.path.join(tmp, "bpf"))
    for name in names:
        text = subprocess.run(
            ["git", "-C", probes.ROOT, "show", f"{rev}:{name}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        with open(os.path.join(tmp, name), "w") as f:
            f.write(text)
    src = os.path.join(tmp, "bpf", "telemetry.bpf.c")
    return probes.compile_bpf(src, os.path.join(tmp, "rev.bpf.o"))


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("rev")
    p.add_argument("--seconds", type=float, default=5.0)
    a = p.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as st:
        old = build_rev(a.rev, tmp)
        empty_obj = probes.compile_bpf(hooks.EMPTY_SRC, os.path.join(tmp, "e.bpf.o"))
        empty = st.enter_context(probes.held_object(empty_obj))
        ids = {(h, "empty"): empty.ids[f"empty_{h}"] for h in HOOKS}
        for tag, obj in (
            ("warm", THIS),
            ("rev1", old),
            ("this1", THIS),
            ("rev2", old),
            ("this2", THIS),
        ):
            t = st.enter_context(probes.telemetry(f"vs-{tag}", obj=obj))
            ids |= {(h, tag): i for h, i in t.prog_ids().items() if h in HOOKS}
        port = st.enter_context(workload.sockperf_server())
        runs: dict[str, Callable[[], object]] = {
            "ping-pong": lambda: workload.ping_pong(port, a.seconds),
            "bulk": lambda: hooks.bulk(a.seconds),
        }
        for wl, run in runs.items():
            d, _ = during(ids, run)
            load = os.getloadavg()[0]
            for h in HOOKS:
                ns = {tag: d[(hh, tag)].ns_per_event or 0.0 for hh, tag in d if hh == h}
                rev, this = (ns["rev1"] + ns["rev2"]) / 2, (ns["this1"] + ns["this2"]) / 2
                floor = ns["empty"]
                print(
                    f"{wl:<9} {h:<12} empty {floor:.0f} ns, {a.rev} {rev:.0f} "
                    f"({rev / floor:.2f}x), this build {this:.0f} ({this / floor:.2f}x); "
                    f"{d[(h, 'empty')].run_cnt} runs, load {load:.2f}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
