"""1b. What the peer rows' layout costs per event: tcp_probe of this build
(peer counters in rows all CPUs share: three atomic adds per sample) beside
tcp_probe of the build before the change (per-CPU counter rows: plain adds),
both attached at once under one ping-pong, so both see the same events. Run
twice, the attach order swapped: the second program on a hook runs with the
first one's cache lines warm."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import probes
import workload
from bpfstats import during

from ebpf_telemetry import facts

CHANGE = "host_metrics_map"  # the change: the first commit whose maps.bpf.h names it


@dataclass(frozen=True)
class LayoutCost:
    layout: str  # "shared rows" (this build) or "per-CPU rows" (before)
    order: int  # 1: attached first, 2: second
    ns: float | None
    events: int


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", probes.ROOT, *args], capture_output=True, text=True, check=True
    ).stdout.strip()


@contextmanager
def previous_object() -> Iterator[str]:
    """The BPF object of the commit before the layout change, compiled now."""
    first = _git("log", "--format=%H", "--reverse", "-S", CHANGE, "--", "bpf/maps.bpf.h")
    rev = first.splitlines()[0] + "^"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "bpf")
        os.mkdir(src)
        for name in _git("ls-tree", "--name-only", rev, "bpf/").splitlines():
            text = _git("show", f"{rev}:{name}") + "\n"
            with open(os.path.join(tmp, name), "w") as f:
                f.write(_mmapable(text) if name == "bpf/maps.bpf.h" else text)
        yield probes.compile_bpf(
            os.path.join(src, "telemetry.bpf.c"), os.path.join(tmp, "previous.bpf.o")
        )


def _mmapable(maps_h: str) -> str:
    """The maps this build's Python reads in place, mmap-able in the old
    build too (a flag: no change to what the programs do)."""
    for name in ("peer_info_map", "peer_seen_map"):
        end = maps_h.index(f"}} {name} SEC")
        pin = maps_h.rindex("__uint(pinning", 0, end)
        maps_h = maps_h[:pin] + "__uint(map_flags, BPF_F_MMAPABLE);\n\t" + maps_h[pin:]
    return maps_h


def measure(seconds: float) -> list[LayoutCost]:
    out: list[LayoutCost] = []
    # both builds cast the socket the same way (the old one has only the helper)
    helper = facts.read().without("kfunc:bpf_rdonly_cast")
    with previous_object() as old, workload.sockperf_server() as port:
        for order in (("shared rows", "per-CPU rows"), ("per-CPU rows", "shared rows")):
            with ExitStack() as stack:
                ids = {}
                for i, layout in enumerate(order):
                    obj = old if layout == "per-CPU rows" else None
                    t = stack.enter_context(probes.telemetry(f"layout{i}", 100, obj, helper))
                    ids[layout] = t.prog_ids()["tcp_probe"]
                after, _ = during(ids, lambda: workload.ping_pong(port, seconds))
            for i, layout in enumerate(order):
                out.append(
                    LayoutCost(layout, i + 1, after[layout].ns_per_event, after[layout].run_cnt)
                )
    return out
