"""What the peer table's invariant check (peertable.Checker.check) costs per
agent cycle, with every id live: each id an automatic peer with an address
written as the kernel writes them, on a pinned table of that size."""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass

import probes

from ebpf_telemetry import loader, peertable
from ebpf_telemetry.binding import ffi, lib
from ebpf_telemetry.config import Config
from ebpf_telemetry.maps import Pins
from ebpf_telemetry.nodes import peer_key


@dataclass(frozen=True)
class CheckCost:
    peers: int
    median_ms: float
    p95_ms: float
    pool_check_ms: float  # the full pool check (at start, after a repair)


def _fill(pins: Pins, n: int) -> None:
    """Every id live: an address in peer_addr_map, described PEER_AUTO."""
    pins["peer_free_map"].drain()
    for i in range(1, n + 1):
        net = ipaddress.ip_network(f"{ipaddress.IPv4Address(0x0A800000 + i)}/32")
        key = peer_key(net)
        pins["peer_addr_map"].update(key, ffi.new("__u32 *", i))
        info = peertable._info(lib.PEER_AUTO, addr=bytes(ffi.buffer(key.addr, 16)))
        pins["peer_info_map"].update(ffi.new("__u32 *", i), info)


def measure(counts: tuple[int, ...], cycles: int) -> list[CheckCost]:
    out = []
    for n in counts:
        tag = f"check{n}"
        cfg = Config(pin_dir=probes.pin_dir(tag), textfile="/dev/null", max_peers=n)
        loader.attach(cfg)
        try:
            with Pins(cfg.pin_dir) as pins:
                _fill(pins, n)
                table = peertable.Checker()
                t = time.perf_counter()
                table.check(pins, cfg)  # the first check reads the pool too
                pool_ms = (time.perf_counter() - t) * 1e3
                times = []
                for _ in range(cycles):
                    t = time.perf_counter()
                    table.check(pins, cfg)
                    times.append((time.perf_counter() - t) * 1e3)
                assert not table.repairs, table.repairs
        finally:
            loader.unload(cfg.pin_dir)
        times.sort()
        out.append(CheckCost(n, times[len(times) // 2], times[int(len(times) * 0.95)], pool_ms))
    return out
