"""The README's `inspect` sample: a real reading of the pinned maps, kept in
tests/data/inspect_sample.json and rendered by report.as_text, so the README
shows what the code prints (tests/test_docs.py keeps them equal).

Record a new reading (root; loads BPF into its own pin dir, request/response
traffic between two namespaces):

    .venv/bin/python tests/docsample.py
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ebpf_telemetry import btf
from ebpf_telemetry.snapshot import Snapshot
from ebpf_telemetry.values import CpuTime, Hist, NodeMetrics

SAMPLE = Path(__file__).parent / "data" / "inspect_sample.json"
MAX_SLOTS = len(Hist.empty().slots)


def _hist(slots: dict[str, int]) -> Hist:
    out = [0] * MAX_SLOTS
    for s, c in slots.items():
        out[int(s)] = c
    return Hist(tuple(out))


def to_json(snap: Snapshot) -> dict[str, Any]:
    def sparse(h: Hist) -> dict[str, int]:
        return {str(i): c for i, c in enumerate(h.slots) if c}

    return {
        "monotonic": snap.monotonic,
        "wall": snap.wall,
        "hists": {str(n): sparse(h) for n, h in snap.hists.items() if h.count},
        "metrics": {str(n): asdict(m) for n, m in snap.metrics.items() if any(asdict(m).values())},
        "stats": snap.stats,
        "peers": {str(n): p for n, p in snap.peers.items()},
        "runqlat": sparse(snap.runqlat),
        "drops_by_name": btf.drops_by_name(snap.drops),  # names differ between kernels
        "cpu": asdict(snap.cpu),
        "misses": snap.misses,
        "seen": {str(n): t for n, t in snap.seen.items()},
        "max_peers": snap.max_peers,
    }


def from_json(d: dict[str, Any]) -> tuple[Snapshot, dict[str, int]]:
    """The snapshot, and the drop counts by name (as_text reads names from
    this kernel's BTF: the test stands the recorded names in for them)."""
    snap = Snapshot(
        monotonic=d["monotonic"],
        wall=d["wall"],
        hists={int(n): _hist(s) for n, s in d["hists"].items()},
        metrics={int(n): NodeMetrics(**m) for n, m in d["metrics"].items()},
        stats=d["stats"],
        peers={int(n): p for n, p in d["peers"].items()},
        runqlat=_hist(d["runqlat"]),
        drops={},
        cpu=CpuTime(**d["cpu"]),
        misses=d["misses"],
        seen={int(n): t for n, t in d["seen"].items()},
        max_peers=d["max_peers"],
    )
    return snap, d["drops_by_name"]


def record() -> None:
    from conftest import require_kernel  # noqa: F401 (tests/ on the path)
    from ebpf_telemetry import config, loader
    from ebpf_telemetry.maps import Pins
    from ebpf_telemetry.snapshot import take
    from netlab import Netns, TcpEchoServer, TcpPingPong, veth_pair

    pin_dir = "/sys/fs/bpf/ebt-test-docsample"
    try:
        with Netns("a") as a, Netns("b") as b:
            veth = veth_pair(a, b, v6=None)
            cfg = config.from_mapping(
                {"pin_dir": pin_dir, "textfile": "/dev/null", "node_name": "node-a",
                 "peers": {"node-b": [f"{veth.v4_b}/32"], "node-c": [f"{veth.v4_a}/32"]}},
                "docsample",
            )  # fmt: skip
            loader.attach(cfg)
            with (
                TcpEchoServer(b, veth.v4_b) as srv,
                TcpPingPong(a, [(veth.v4_b, srv.port)]) as pp,
            ):
                pp.run(600)
            with Pins(pin_dir) as pins:
                snap = take(pins)
    finally:
        loader.unload(pin_dir)
    SAMPLE.write_text(json.dumps(to_json(snap), indent=1) + "\n")
    print(f"wrote {SAMPLE}", file=sys.stderr)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    record()
