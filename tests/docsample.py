"""The README's `inspect` and textfile samples: a real reading of the pinned
maps, kept in tests/data/inspect_sample.json and rendered by report.as_text
and by the metrics collector (as the first interval after a start), so the
README shows what the code prints (tests/test_docs.py keeps them equal).

Print the README's textfile block: `.venv/bin/python tests/docsample.py textfile`.

Record a new reading (root; loads BPF into its own pin dir, request/response
traffic between two namespaces):

    .venv/bin/python tests/docsample.py
"""

from __future__ import annotations

import contextlib
import json
import platform
import sys
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ebpf_telemetry import btf
from ebpf_telemetry.cputime import CpuTime
from ebpf_telemetry.snapshot import Snapshot
from ebpf_telemetry.values import Hist, NodeMetrics

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
        "boottime_ns": snap.boottime_ns,
        "max_peers": snap.max_peers,
        "kernel": platform.release(),
        "collectors": {},  # fill in: collector -> variant, as `doctor` says
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
        boottime_ns=d.get("boottime_ns", 0),
        max_peers=d["max_peers"],
    )
    return snap, d["drops_by_name"]


@contextlib.contextmanager
def recorded_kernel(d: dict[str, Any]) -> Iterator[None]:
    """What the code reads from the running kernel, as it was when recorded:
    drop reason names (BTF) and the release (build_info)."""
    from unittest import mock

    from ebpf_telemetry import agentfamilies, metrics, report

    names = d["drops_by_name"]
    with (
        mock.patch.object(report.btf, "drops_by_name", lambda _: names),
        mock.patch.object(metrics.btf, "drops_by_name", lambda _: names),
        mock.patch.object(agentfamilies.platform, "release", lambda: d["kernel"]),
    ):
        yield


def textfile(d: dict[str, Any]) -> str:
    """The whole textfile of the first interval after a start on this reading."""
    from prometheus_client import CollectorRegistry, generate_latest

    from ebpf_telemetry.config import Config
    from ebpf_telemetry.loader import Running
    from ebpf_telemetry.metrics import ReloadState, TelemetryCollector
    from ebpf_telemetry.snapshot import Window

    snap, _ = from_json(d)
    zero = Snapshot(snap.monotonic - 5, snap.wall - 5, {}, {}, dict.fromkeys(snap.stats, 0),
                    snap.peers, Hist.empty(), {}, CpuTime(), {}, {}, 0, snap.max_peers)  # fmt: skip
    collector = TelemetryCollector(Config(node_name="node-a"))
    with recorded_kernel(d):  # drop reasons are named in update()
        collector.update(Window(zero, snap), 0.0023)
        collector.reload = ReloadState(True, zero.wall)  # started one interval before
        collector.collectors = [Running(c, v, "attached") for c, v in d["collectors"].items()]
        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)
        return generate_latest(registry).decode()


def abridged(text: str) -> str:
    """The README's cut: HELP of the first family only, per series the first
    two buckets and +Inf, every other sample."""
    out: list[str] = []
    buckets: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("# HELP") and out:
            continue
        if "_bucket{" in line and 'le="+Inf"' not in line:
            series = line.split("{")[0] + line.split("}")[0].split('",', 1)[-1]
            buckets[series] = buckets.get(series, 0) + 1
            if buckets[series] > 2:
                continue
        out.append(line)
    return "\n".join(out)


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
    if sys.argv[1:] == ["textfile"]:
        print(abridged(textfile(json.loads(SAMPLE.read_text()))))
    else:
        record()
