"""`run`: attach (or reuse the pins), then every interval read, compute, write.

Signals only set flags: SIGTERM/SIGINT let the write in progress finish and
exit 0 with the pins left in place; SIGHUP reloads the config (an invalid one
is logged and the old one kept).
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import structlog
from prometheus_client import CollectorRegistry

from ebpf_telemetry import config as config_mod
from ebpf_telemetry import exporter, host, loader, nodes
from ebpf_telemetry.binding import TelemetryError
from ebpf_telemetry.config import Config
from ebpf_telemetry.maps import Pins
from ebpf_telemetry.metrics import TelemetryCollector
from ebpf_telemetry.snapshot import Snapshot, Window, take

log = structlog.get_logger("agent")


@dataclass
class Signals:
    wake: threading.Event = field(default_factory=threading.Event)
    stop: bool = False
    reload: bool = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGHUP, self._reload)

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        self.stop = True
        self.wake.set()

    def _reload(self, signum: int, frame: FrameType | None) -> None:
        self.reload = True
        self.wake.set()


class Agent:
    def __init__(self, cfg: Config, config_path: str | None, overrides: dict[str, Any]) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.overrides = overrides
        self.signals = Signals()
        self.collector = TelemetryCollector(cfg.node_name)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        self.pins = Pins(cfg.pin_dir)
        self.writes = 0
        self.failed_writes = 0
        self.write_error: str | None = None  # the error of the failing streak, logged once

    def start(self) -> list[loader.Running]:
        host.preflight()
        exporter.preflight(self.cfg.textfile)
        state = loader.attach(self.cfg)
        self.collector.collectors = state
        log.info("collectors", **{r.collector: r.variant or "skipped" for r in state})
        if self.cfg.listen_addr:
            addr, port = self.cfg.listen_addr
            exporter.serve(self.registry, addr, port)
            log.info("listening", address=f"{addr}:{port}")
        return state

    def run(self, once: bool = False) -> int:
        self.signals.install()
        self.start()
        prev = take(self.pins)
        deadline = prev.monotonic + self.cfg.interval_seconds
        while True:
            self.signals.wake.wait(max(0.0, deadline - time.monotonic()))
            self.signals.wake.clear()
            if self.signals.stop:
                break
            if self.signals.reload:
                self.signals.reload = False
                self.reload()
            if time.monotonic() < deadline:
                continue
            prev, ok = self.cycle(prev)
            if once and not ok:
                self.pins.close()
                return 1
            deadline += self.cfg.interval_seconds
            if deadline < time.monotonic():  # fell behind: skip, don't burst
                deadline = time.monotonic() + self.cfg.interval_seconds
            if once or self.signals.stop:
                break
        self.pins.close()
        log.info(
            "stopped", writes=self.writes, failed_writes=self.failed_writes, pins=self.cfg.pin_dir
        )
        return 0

    def cycle(self, prev: Snapshot) -> tuple[Snapshot, bool]:
        t0 = time.perf_counter()
        cur = take(self.pins)
        self.collector.update(Window(prev, cur), time.perf_counter() - t0)
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

    def reload(self) -> None:
        try:
            new = config_mod.load(self.config_path, self.overrides)
            if new.pin_dir != self.cfg.pin_dir or new.max_peers != self.cfg.max_peers:
                raise TelemetryError("pin_dir and max_peers need a restart (and unload)")
            if new.listen != self.cfg.listen:
                raise TelemetryError("listen needs a restart")
            if new.textfile != self.cfg.textfile:
                exporter.preflight(new.textfile)
            nodes.apply(self.pins, new)
        except TelemetryError as e:
            log.error("config not reloaded; keeping the old one", error=str(e))
            return
        self.cfg = new
        self.collector.node_name = new.node_name
        log.info("config reloaded", peers=len(new.peers))
