"""4. The event stream: the highest rate the real `ebpf-telemetry events` CLI
drains at sample_rate 1 before the kernel counts lost events.

Load: `sockperf tp` paced at rising message rates on loopback (each small
segment is a tcp_probe RTT event; the switches that end its waits add
runqlat events); the offered rate is what the kernel submitted (stats_map
sampled_*), the CLI writes JSON lines to a pipe this process counts."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import probes
import workload

from ebpf_telemetry.events import Lease
from ebpf_telemetry.maps import Pins

GRACE = 1.0  # seconds for the consumer to catch up after a step
RING_EVENTS = (1 << 24) // 40  # 16 MiB of 32-byte records + 8-byte headers
IDLE_LINES = 5_000  # per 0.5 s: the ring is drained, only background flows
FILL = 250_000  # events pre-filled for the drain-capacity run (< RING_EVENTS)


@dataclass(frozen=True)
class Step:
    mps: int  # sockperf messages/s asked for
    offered: float  # events/s the kernel submitted
    drained: float  # JSON lines/s the CLI wrote (step + grace)
    lost: int  # ring buffer reservations that failed
    backlog: int  # submitted since the start, not yet written, GRACE s after the step

    @property
    def ok(self) -> bool:
        """No loss, and the CLI kept up: what is left after the grace period
        is under two poll periods (0.2 s) worth."""
        return self.lost == 0 and self.backlog <= 0.2 * self.offered


@dataclass
class StreamResult:
    steps: list[Step] = field(default_factory=list)
    capacity: dict[str, float | None] = field(default_factory=dict)  # consumer -> lines/s

    @property
    def best(self) -> Step | None:
        ok = [s for s in self.steps if s.ok]
        return max(ok, key=lambda s: s.offered) if ok else None

    @property
    def first_behind(self) -> Step | None:
        """The first step the CLI did not keep up with: losses follow once the
        ring buffer (16 MiB, ~420k events) has filled."""
        return next((s for s in self.steps if not s.ok), None)

    @property
    def first_loss(self) -> Step | None:
        return next((s for s in self.steps if s.lost), None)


class LineCounter:
    """Counts the lines a subprocess writes, in a thread; notes when the
    first arrived and when the count reached `mark`."""

    def __init__(self, proc: subprocess.Popen[bytes], mark: int = 0) -> None:
        self.lines = 0
        self.first: tuple[float, int] | None = None  # time, lines of the first chunk
        self.marked: float | None = None
        self.mark = mark
        self.proc = proc
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while chunk := os.read(fd, 1 << 20):
            self.lines += chunk.count(b"\n")
            if self.first is None:
                self.first = (time.monotonic(), self.lines)
            if self.mark and self.marked is None and self.lines >= self.mark:
                self.marked = time.monotonic()

    def rate(self) -> float | None:
        """Lines/s from the first chunk to the mark."""
        if self.first is None or self.marked is None or self.marked <= self.first[0]:
            return None
        return (self.mark - self.first[1]) / (self.marked - self.first[0])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.thread.join(5)


def _submitted(pins: Pins) -> tuple[int, int]:
    s = pins.stats()
    return sum(v for k, v in s.items() if k.startswith("sampled_")), s["events_lost"]


def _step(pins: Pins, counter: LineCounter, base: int, port: int, mps: int, seconds: float) -> Step:
    sub0, lost0 = _submitted(pins)
    lines0 = counter.lines
    t0 = time.monotonic()
    workload.paced(port, seconds, mps)
    run = time.monotonic() - t0
    sub1, _ = _submitted(pins)
    time.sleep(GRACE)
    sub2, lost2 = _submitted(pins)
    lines = counter.lines - lines0
    backlog = (sub2 - base) - counter.lines  # all submitted since start, not yet written
    return Step(mps, (sub1 - sub0) / run, lines / (run + GRACE), lost2 - lost0, backlog)


def _caught_up(pins: Pins, counter: LineCounter, base: int, timeout: float) -> None:
    """Wait until the CLI has written what was submitted since `base`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _submitted(pins)[0] - base - counter.lines < 1000:
            return
        time.sleep(0.2)


def cli_argv(pin_dir: str) -> list[str]:
    return [sys.executable, "-m", "ebpf_telemetry", "events", "--pin-dir", pin_dir]


def _ladder(
    pins: Pins, pin_dir: str, port: int, rates: tuple[int, ...], seconds: float
) -> list[Step]:
    steps: list[Step] = []
    base = _submitted(pins)[0]
    counter = LineCounter(
        subprocess.Popen(cli_argv(pin_dir), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    )
    try:
        _caught_up(pins, counter, base, 10)
        for mps in rates:
            steps.append(_step(pins, counter, base, port, mps, seconds))
            if steps[-1].lost:
                break
    finally:
        counter.stop()
    return steps


def _capacity(pins: Pins, argv: list[str], port: int) -> float | None:
    """Fill the ring with FILL events while nothing reads it, then time the
    consumer through them: its drain rate with the load generator stopped."""
    base = _submitted(pins)[0]
    deadline = time.monotonic() + 30
    lease = Lease(pins.pin_dir, seconds=60)  # a consumer that does not read yet
    while _submitted(pins)[0] - base < FILL and time.monotonic() < deadline:
        workload.paced(port, 1, 200_000)
    lease.release()
    counter = LineCounter(
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL), FILL
    )
    try:
        deadline = time.monotonic() + 30
        while counter.marked is None and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        counter.stop()
    return counter.rate()


def measure(rates: tuple[int, ...], seconds: float) -> StreamResult:
    """RTT events only: the sched collector is detached (its pinned links
    removed) so that the machine's own scheduling does not set the rate."""
    result = StreamResult()
    with (
        probes.telemetry("events", sample_rate=1) as t,
        Pins(t.pins) as pins,
        workload.sockperf_server() as port,
    ):
        t.detach("sched")
        result.steps = _ladder(pins, t.pins, port, rates, seconds)
        argv = cli_argv(t.pins)
        _drain_ring(argv)
        result.capacity["cli"] = _capacity(pins, argv, port)
    return result


def _drain_ring(argv: list[str]) -> None:
    """Empty what the last consumer left in the ring (a ring has one reader):
    read until a 0.5 s period brings less than IDLE_LINES lines."""
    counter = LineCounter(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL))
    try:
        time.sleep(1.0)  # start-up
        deadline = time.monotonic() + 20
        last = -IDLE_LINES
        while counter.lines - last >= IDLE_LINES and time.monotonic() < deadline:
            last = counter.lines
            time.sleep(0.5)
    finally:
        counter.stop()
