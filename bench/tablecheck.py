"""What the peer table's invariant check (peertable.Checker.check) costs per
agent cycle, with every id live: each id an automatic peer with an address
written as the kernel writes them, on a pinned table of that size. Two
figures: a cycle where peer_info_map did not change (the hash is not read
again: most cycles), and one that reads peer_addr_map whole (after any
allocation or repair, and every FULL_READ_SECONDS)."""

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
    read_median_ms: float  # a check that reads peer_addr_map whole
    read_p95_ms: float


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
                times = _times(pins, cfg, table, cycles)
                table.full_read_ns = 0  # every check reads the hash
                reads = _times(pins, cfg, table, cycles)
                assert not table.repairs, table.repairs
        finally:
            loader.unload(cfg.pin_dir)
        out.append(CheckCost(n, *_mid_p95(times), pool_ms, *_mid_p95(reads)))
    return out


def _times(pins: Pins, cfg: Config, table: peertable.Checker, cycles: int) -> list[float]:
    out = []
    for _ in range(cycles):
        t = time.perf_counter()
        table.check(pins, cfg)
        out.append((time.perf_counter() - t) * 1e3)
    return sorted(out)


def _mid_p95(times: list[float]) -> tuple[float, float]:
    return times[len(times) // 2], times[int(len(times) * 0.95)]
