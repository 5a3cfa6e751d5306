"""`run`: attach (or reuse the pins), then every interval read, compute, write.

Signals reach the main loop through a pipe (nothing runs in a handler):
SIGTERM/SIGINT let the write in progress finish and exit 0 with the pins left
in place; SIGHUP reloads the config (an invalid one is logged and the old one
kept).
"""

from __future__ import annotations

import contextlib
import gc
import os
import select
import signal
import time
from dataclasses import replace
from types import FrameType
from typing import Any

import structlog
from prometheus_client import CollectorRegistry

from ebpf_telemetry import config as config_mod
from ebpf_telemetry import exporter, host, loader, lock, naming, peertable, pincheck
from ebpf_telemetry.binding import TelemetryError
from ebpf_telemetry.config import Config
from ebpf_telemetry.maps import Pins
from ebpf_telemetry.metrics import ReloadState, TelemetryCollector
from ebpf_telemetry.naming import PeerTable
from ebpf_telemetry.noderows import NodeReader
from ebpf_telemetry.snapshot import Snapshot, Window, take

log = structlog.get_logger("agent")


class Signals:
    """SIGTERM/SIGINT (stop) and SIGHUP (reload), delivered through a pipe.

    The handlers do nothing in Python: the interpreter's C-level handler
    writes the signal number to the pipe (signal.set_wakeup_fd), which is
    async-signal-safe; the main loop waits on the pipe with a deadline."""

    WATCHED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.stop = False
        self.reload = False

    def install(self) -> None:
        signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)
        for sig in self.WATCHED:
            signal.signal(sig, _ignore)

    def wait(self, seconds: float) -> None:
        """Until a signal comes or seconds pass; sets stop/reload from what came."""
        ready, _, _ = select.select([self.read_fd], [], [], max(0.0, seconds))
        if not ready:
            return
        with contextlib.suppress(BlockingIOError):
            for signum in os.read(self.read_fd, 64):
                if signum == signal.SIGHUP:
                    self.reload = True
                else:
                    self.stop = True


def _ignore(signum: int, frame: FrameType | None) -> None:
    """The Python-level handler: nothing to do, the wake-up pipe carries it."""


class Agent:
    def __init__(self, cfg: Config, config_path: str | None, overrides: dict[str, Any]) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.overrides = overrides
        self.signals = Signals()
        self.source = naming.open_source(cfg)  # peers_file, [kubernetes] or None
        self.table: PeerTable | None = None  # the source's table in force
        self.collector = TelemetryCollector(cfg)
        self.collector.source = self.source
        self.checker = peertable.Checker()
        self.collector.repairs = self.checker.repairs
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        self.pins = Pins(cfg.pin_dir)
        self.reader: NodeReader | None = None  # the node rows' readings, from start()
        self.lock_fd = -1
        self.pins_ino: int | None = None
        self.writes = 0
        self.failed_writes = 0
        self.write_error: str | None = None  # the error of the failing streak, logged once

    def start(self) -> list[loader.Running]:
        host.preflight()
        exporter.preflight(self.cfg.textfile)
        host.ensure_bpffs(self.cfg.pin_dir)
        # one agent per pin dir, for the agent's lifetime: taken before any
        # pin is read or written (a second agent would switch the table's mode,
        # refill the pool beside this one's)
        created = host.make_dir(self.cfg.pin_dir)
        try:
            self.lock_fd = lock.take(self.cfg.pin_dir, "an agent")
            if self.cfg.listen_addr:  # a busy port fails here, before the kernel is touched
                addr, port = self.cfg.listen_addr
                exporter.serve(self.registry, addr, port)
                log.info("listening", address=f"{addr}:{port}")
        except TelemetryError:
            if created:
                os.rmdir(self.cfg.pin_dir)
            raise
        if self.source is not None:
            self.table = self.source.poll()  # a peers file is there at once; Nodes come later
            self.collector.configure(self.cfg, naming.zones(self.cfg, self.table))
            self.note_left_out(self.cfg, self.table)
        replaced = pincheck.replace_other_layouts(self.cfg.pin_dir, self.cfg.strict_pins)
        state = loader.attach(naming.effective(self.cfg, self.table), renew=bool(replaced))
        self.pins_ino = self._pins_ino()
        self.reader = NodeReader(self.pins)
        self.collector.collectors = state
        self.collector.pins_replaced += len(replaced)
        log.info("collectors", **{r.collector: r.variant or "skipped" for r in state})
        return state

    def run(self, once: bool = False) -> int:
        self.signals.install()
        try:
            return self._loop(once)
        finally:
            self.close()

    def close(self) -> None:
        """The map fds, the source of names, the pin dir's lock (another agent may start)."""
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        self.pins.close()
        if self.source is not None:
            self.source.close()
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1

    def _loop(self, once: bool) -> int:
        self.start()
        prev = take(self.pins, self.reader)
        # what start made (modules, BPF objects, tables) lives as long as the
        # agent: out of the cyclic collector's reach, a full collection scans
        # only what cycles make (at 16,384 peers one took 30-100 ms here)
        gc.freeze()
        deadline = prev.monotonic + self.cfg.interval_seconds
        while True:
            self.signals.wait(deadline - time.monotonic())
            if self.signals.stop:
                break
            if self.signals.reload:
                self.signals.reload = False
                self.reload()
            if time.monotonic() < deadline:
                continue
            prev, ok = self.cycle(prev)
            if once and not ok:
                return 1
            deadline += self.cfg.interval_seconds
            if deadline < time.monotonic():  # fell behind: skip, don't burst
                deadline = time.monotonic() + self.cfg.interval_seconds
            if once or self.signals.stop:
                break
        log.info(
            "stopped", writes=self.writes, failed_writes=self.failed_writes, pins=self.cfg.pin_dir
        )
        return 0

    def _pins_ino(self) -> int | None:
        try:
            return os.stat(os.path.join(self.cfg.pin_dir, "settings_map")).st_ino
        except FileNotFoundError:
            return None

    def cycle(self, prev: Snapshot) -> tuple[Snapshot, bool]:
        if self._pins_ino() != self.pins_ino:  # `unload --force`, or a hand
            # our map fds would go on reading counters nothing writes any more
            raise TelemetryError(
                f"the pins under {self.cfg.pin_dir} were removed or replaced while running; "
                "exiting rather than exporting frozen counters"
            )
        t0 = time.perf_counter()
        self.follow_source()
        cur = take(self.pins, self.reader)
        effective = naming.effective(self.cfg, self.table)
        mixed = self.checker.check(self.pins, effective)
        if mixed:  # counts of two peers in one row: not exported, the ids retired
            log.error("peer ids shared by two addresses; retired", ids=sorted(mixed))
            cur = replace(cur, peers={i: p for i, p in cur.peers.items() if i not in mixed})
        window = Window(prev, cur)
        self.collector.update(window, time.perf_counter() - t0)
        peertable.expire(self.pins, effective, window.active(), cur.seen, peertable.now_ns())
        try:
            exporter.write_textfile(self.cfg.textfile, self.registry)
            self.writes += 1
        except TelemetryError as e:
            self.failed_writes += 1
            if str(e) != self.write_error:  # once per streak, not every interval
                log.error("textfile not written; previous one kept", error=str(e))
            self.write_error = str(e)
            return cur, False
        if self.write_error is not None:
            log.info("textfile written again", failed_writes=self.failed_writes)
            self.write_error = None
        return cur, True

    def follow_source(self) -> None:
        """A new table from the peers file or the Node watch, applied as a reload is."""
        table = self.source.poll() if self.source is not None else None
        if table is None or table == self.table:
            return
        try:
            self.install(self.cfg, table)
        except TelemetryError as e:
            log.error("peer names not updated; keeping the old ones", error=str(e))
            return
        log.info("peer names updated", peers=len(table.peers))

    def install(self, cfg: Config, table: PeerTable | None) -> None:
        """cfg, with the source's table, to the kernel (peertable.apply: no count
        of one peer under another's name) and to the labels."""
        self.collector.check(cfg)  # max_series: before the kernel
        peertable.apply(self.pins, naming.effective(cfg, table))
        self.note_left_out(cfg, table, naming.left_out(self.cfg, self.table))
        self.cfg, self.table = cfg, table
        self.collector.configure(cfg, naming.zones(cfg, table))

    def note_left_out(self, cfg: Config, table: PeerTable | None, before: int = 0) -> None:
        """One warning when max_peers leaves names out (again when their number changes)."""
        left = naming.left_out(cfg, table)
        if left and left != before:
            log.warning(
                "more peers than max_peers: the last names (by name) count under peer=other",
                left_out=left,
                max_peers=cfg.max_peers,
            )

    def reload(self) -> None:
        source = self.source
        try:
            new = config_mod.load(self.config_path, self.overrides)
            if new.pin_dir != self.cfg.pin_dir or new.max_peers != self.cfg.max_peers:
                raise TelemetryError("pin_dir and max_peers need a restart (and unload)")
            if new.listen != self.cfg.listen:
                raise TelemetryError("listen needs a restart")
            if new.textfile != self.cfg.textfile:
                exporter.preflight(new.textfile)
            table = self.table
            if not naming.same_source(new, self.cfg):
                source = naming.open_source(new)
                table = source.poll() if source is not None else None
            self.install(new, table)
        except TelemetryError as e:
            if source is not None and source is not self.source:
                source.close()
            log.error("config not reloaded; keeping the old one", error=str(e))
            self.collector.reload = ReloadState(False, self.collector.reload.success_at)
            return
        if source is not self.source:
            if self.source is not None:
                self.source.close()
            self.source = self.collector.source = source
        self.collector.reload = ReloadState(True, time.time())
        log.info("config reloaded", peers=len(naming.effective(new, table).peers))
