"""The node table: which node id is which peer, in the kernel and in labels.

Node 0 is this host. Named peers ([peers], a peers file, Kubernetes Nodes:
naming.py) get ids 1..N that stay the same across
reloads for a name that stays (its counters continue); an id handed to a new
name starts from zero. With no source of names the kernel hands out one id
per remote address (or subnet) itself, from a pool of free ids
(bpf/nodes.bpf.h); expire() takes back the ids of peers idle for
peer_idle_seconds. Id max_peers + 1 is `other`. Addresses are 16 bytes, IPv4
mapped as ::ffff:a.b.c.d.
"""

from __future__ import annotations

import ipaddress
import time
from typing import Any

from ebpf_telemetry.binding import ffi, lib
from ebpf_telemetry.config import RESERVED_PEER, Config, Network
from ebpf_telemetry.maps import Pins

HOST = lib.NODE_HOST
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def peer_key(net: Network) -> Any:
    """struct peer_key for a network (IPv4 mapped into ::ffff:0:0/96)."""
    key = ffi.new("struct peer_key *")
    if isinstance(net, ipaddress.IPv4Network):
        key.prefixlen = 96 + net.prefixlen
        raw = b"\0" * 10 + b"\xff\xff" + net.network_address.packed
    else:
        key.prefixlen = net.prefixlen
        raw = net.network_address.packed
    ffi.memmove(key.addr, raw, 16)
    return key


def prefix_mask(bits: int) -> bytes:
    """16 bytes with the first `bits` bits set (the kernel folds addresses with it)."""
    return ((1 << 128) - (1 << (128 - bits))).to_bytes(16, "big")


def addr_text(raw: bytes) -> str:
    a = ipaddress.IPv6Address(raw)
    return str(a.ipv4_mapped) if a.ipv4_mapped else str(a)


def auto_label(raw: bytes, prefix_v4: int, prefix_v6: int) -> str:
    """An automatic peer's label: its address, or its subnet when folded."""
    a = ipaddress.IPv6Address(raw)
    if a.ipv4_mapped:
        return str(a.ipv4_mapped) + (f"/{prefix_v4}" if prefix_v4 < 32 else "")
    return str(a) + (f"/{prefix_v6}" if prefix_v6 < 128 else "")


def peer_names(pins: Pins, s: Any = None) -> dict[int, str]:
    """node id -> peer label, for every id in use (retiring ids have none);
    s: the settings, if the caller has read them already."""
    s = s if s is not None else pins.settings()
    m = pins["peer_info_map"]
    n, vals = m.array_rows()
    names: dict[int, str] = {}
    for i in range(n):
        v = vals[i]
        if v.flags & lib.PEER_AUTO:
            raw = bytes(ffi.buffer(v.addr, 16))
            names[i] = auto_label(raw, s.auto_prefix_v4, s.auto_prefix_v6)
        elif v.flags & (lib.PEER_NAMED | lib.PEER_OTHER):
            names[i] = ffi.string(v.name).decode(errors="replace")
    return names


def _info(flags: int, name: str = "") -> Any:
    info = ffi.new("struct peer_info *")
    info.flags = flags
    info.name = name.encode()
    return info


def _named_ids(pins: Pins) -> dict[str, int]:
    m = pins["peer_info_map"]
    n, vals = m.array_rows()
    return {
        ffi.string(vals[i].name).decode(): i for i in range(n) if vals[i].flags & lib.PEER_NAMED
    }


def assign_ids(current: dict[str, int], wanted: list[str], max_peers: int) -> dict[str, int]:
    """Keep the id of every name that stays; give new names the lowest free ids."""
    kept = {n: i for n, i in current.items() if n in wanted and 1 <= i <= max_peers}
    free = (i for i in range(1, max_peers + 1) if i not in kept.values())
    return {n: kept[n] if n in kept else next(free) for n in wanted}


# how long a program that read the old table may still be running: BPF
# programs run for microseconds; this is a grace period, not a poll
GRACE_SECONDS = 0.02


def apply(pins: Pins, cfg: Config) -> None:
    """Write the configured peer table and settings, in two steps so that no
    count of one peer ever shows under another:
    1. ids that change hands lose their CIDRs (and auto-allocated addresses
       are forgotten when leaving auto mode), the generation is bumped: every
       socket cache is stale, their traffic counts under `other` meanwhile;
    2. after a grace period no program writes those ids any more: their
       counters are zeroed, the new names and CIDRs written, the generation
       bumped again."""
    old = pins.settings()
    info_map, cidr_map = pins["peer_info_map"], pins["peer_cidr_map"]
    auto = cfg.auto_peers
    current = _named_ids(pins)
    ids = assign_ids(current, list(cfg.peers), cfg.max_peers)
    wanted = {
        bytes(ffi.buffer(k)): (k, node_id)
        for name, node_id in ids.items()
        for k in (peer_key(net) for net in cfg.peers[name])
    }

    # 1. retire
    moving = {i for n, i in current.items() if ids.get(n) != i}
    moving |= {i for n, i in ids.items() if current.get(n) != i}
    if auto != bool(old.auto_peers) or not auto:
        moving |= _forget_addresses(pins)
    if auto and (not old.auto_peers or not old.generation):
        _fill_pool(pins, cfg.max_peers)
    for k in list(cidr_map.keys("struct peer_key")):
        have = int(cidr_map.lookup(k)[0])
        if bytes(ffi.buffer(k)) not in wanted or have in moving:
            cidr_map.delete(k)
    for node_id in moving:
        info_map.update(ffi.new("__u32 *", node_id), _info(0))
    generation = old.generation
    if moving and old.generation:
        generation += 1
        _write_settings(pins, cfg, auto and bool(old.auto_peers), generation)
        time.sleep(GRACE_SECONDS)

    # 2. hand over
    for node_id in moving:
        pins.zero_node(node_id)
    for name, node_id in ids.items():
        info_map.update(ffi.new("__u32 *", node_id), _info(lib.PEER_NAMED, name))
    for k, node_id in wanted.values():
        cidr_map.update(k, ffi.new("__u32 *", node_id))
    info_map.update(ffi.new("__u32 *", cfg.max_peers + 1), _info(lib.PEER_OTHER, RESERVED_PEER))
    _write_settings(pins, cfg, auto, generation + 1)


def _forget_addresses(pins: Pins) -> set[int]:
    """Drop every kernel-allocated address and the free pool; the ids they held."""
    addr_map = pins["peer_addr_map"]
    ids = set()
    for k in list(addr_map.keys("struct peer_key")):
        ids.add(int(addr_map.lookup(k)[0]))
        addr_map.delete(k)
    pins["peer_free_map"].drain()
    return ids


def _fill_pool(pins: Pins, max_peers: int) -> None:
    """Every id free for the kernel to hand out (entering auto mode)."""
    pool = pins["peer_free_map"]
    pool.drain()
    for i in range(1, max_peers + 1):
        pool.push(i)


def _write_settings(pins: Pins, cfg: Config, auto: bool, generation: int) -> None:
    s = ffi.new("struct settings *")
    s.sample_rate = cfg.sample_rate
    s.debug = int(cfg.debug_trace)
    s.auto_peers = int(auto)
    s.max_peers = cfg.max_peers
    s.other_node = cfg.max_peers + 1
    s.generation = generation
    s.auto_prefix_v4 = cfg.auto_peer_prefix_v4
    s.auto_prefix_v6 = cfg.auto_peer_prefix_v6
    ffi.memmove(s.auto_mask_v4, prefix_mask(96 + cfg.auto_peer_prefix_v4), 16)
    ffi.memmove(s.auto_mask_v6, prefix_mask(cfg.auto_peer_prefix_v6), 16)
    pins["settings_map"].update(ffi.new("__u32 *", 0), s)


# -- automatic peers that come and go ---------------------------------------------------


def expire(pins: Pins, cfg: Config, active: set[int], seen: dict[int, int], now_ns: int) -> int:
    """One step of the automatic peers' life, each agent cycle; `active`:
    the ids whose counters moved in the last interval, `seen`: peer_seen_map
    as the cycle's snapshot read it. Returns ids retired.

    - an id in use notes its last activity (peer_seen_map);
    - an id idle for peer_idle_seconds is retired: its address leaves the
      table and the generation is bumped (no socket cache can count it any
      more), its label goes (its series leave the textfile);
    - a retired id, once nothing can still write it (GRACE_SECONDS later, at
      the next cycle at the earliest), is zeroed and given back to the pool:
      its next owner starts from 0 under its own label."""
    if not cfg.auto_peers:
        return 0
    info_map, seen_map = pins["peer_info_map"], pins["peer_seen_map"]
    _, infos = info_map.array_rows()
    idle_ns, grace_ns = int(cfg.peer_idle_seconds * 1e9), int(GRACE_SECONDS * 1e9)
    retire, free = [], []
    for i in range(1, cfg.max_peers + 1):
        flags, last = infos[i].flags, seen.get(i, 0)
        if flags & lib.PEER_AUTO and (i in active or not last):
            seen_map.update(ffi.new("__u32 *", i), ffi.new("__u64 *", now_ns))
        elif flags & lib.PEER_AUTO and now_ns - last >= idle_ns:
            retire.append(i)
        elif flags & lib.PEER_RETIRING and now_ns - last >= grace_ns:
            free.append(i)
    if retire:
        _retire(pins, cfg, retire, now_ns)
    for i in free:
        pins.zero_node(i)
        info_map.update(ffi.new("__u32 *", i), _info(0))
        pins["peer_free_map"].push(i)
    if free:
        pins.add_expired(len(free))
    return len(retire)


def _retire(pins: Pins, cfg: Config, ids: list[int], now_ns: int) -> None:
    addr_map, info_map = pins["peer_addr_map"], pins["peer_info_map"]
    gone = set(ids)
    for k in list(addr_map.keys("struct peer_key")):
        v = addr_map.lookup(k)
        if v is not None and int(v[0]) in gone:
            addr_map.delete(k)
    for i in ids:
        info_map.update(ffi.new("__u32 *", i), _info(lib.PEER_RETIRING))
        pins["peer_seen_map"].update(ffi.new("__u32 *", i), ffi.new("__u64 *", now_ns))
    _write_settings(pins, cfg, True, pins.settings().generation + 1)
