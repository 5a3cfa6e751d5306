"""Helpers for kernel tests: attach into a test pin dir, find peers, drain
events, run the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from types import TracebackType
from typing import Any, Self

from ebpf_telemetry import loader
from ebpf_telemetry.events import EventReader
from ebpf_telemetry.facts import KernelFacts
from ebpf_telemetry.maps import Pins
from ebpf_telemetry.snapshot import Snapshot
from ebpf_telemetry.values import TelemetryEvent

# set by the kernel matrix in a guest whose CPUs are emulated (TCG): every
# instruction takes 10-50x longer, unevenly, and how much depends on the host
# CPU. Tests there assert counts, exact relations and wide ratios; a bound on
# wall-clock time (or a latency) holds on the host and under KVM only.
EMULATED = os.environ.get("EBPF_TELEMETRY_EMULATED") == "1"
DRAIN_LEASE_SECONDS = 3600.0  # EventDrain's: no test window lasts that long
# collectors the kernel under test cannot run (kernel_matrix.py sets it from
# the series' expectations, e.g. rtt on 5.10): skipped there, not a failure
EXPECT_SKIPPED = frozenset(
    filter(None, os.environ.get("EBPF_TELEMETRY_EXPECT_SKIPPED", "").split(","))
)


def attach(cfg: Any, kernel: KernelFacts | None = None) -> Pins:
    """Attach every collector (planned with `kernel`, default this kernel's facts)."""
    state = loader.attach(cfg, kernel)
    assert all(r.up != (r.collector in EXPECT_SKIPPED) for r in state), state
    return Pins(cfg.pin_dir)


def cli(
    *args: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """`ebpf-telemetry ARGS` as a user runs it: its own process, output captured."""
    return subprocess.run(
        [*prefix, sys.executable, "-m", "ebpf_telemetry", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def peer_id(snap: Snapshot, label: str) -> int:
    ids = [i for i, name in snap.peers.items() if name == label]
    assert ids, f"no peer {label!r} in {sorted(snap.peers.values())}"
    return ids[0]


class EventDrain:
    """Collect every event of the pinned ring buffer in a thread, until closed.
    Its lease lasts until then: the tests count events against the kernel's
    own counts, and a drain thread starved of CPU (emulated, 2 x CPUs
    spinners) once let a 3 s lease lapse, the kernel sending nothing meanwhile."""

    def __init__(self, pin_dir: str) -> None:
        self.events: list[TelemetryEvent] = []
        self.reader = EventReader(pin_dir, self._on_event, lease_seconds=DRAIN_LEASE_SECONDS)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _on_event(self, e: TelemetryEvent) -> bool:
        self.events.append(e)
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            self.reader.poll()

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
        self.reader.close()
