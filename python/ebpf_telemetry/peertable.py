"""The peer table's one owner in userspace: every change to which id is which
peer goes through here (the kernel's only part is handing out pool ids to
new addresses, bpf/nodes.bpf.h).

An id's life (automatic peers):
    free (in peer_free_map) --kernel: new address--> live (PEER_AUTO, one
    address in peer_addr_map) --expire(): idle--> retiring (PEER_RETIRING, no
    address; the generation is bumped so no socket cache can still count it)
    --expire(): GRACE later--> zeroed and free again (generation bumped, so
    that sockets that overflowed to `other` look again).
Configured peers (PEER_NAMED) are written by apply(), in two steps (retire,
then hand over) so that no count of one peer ever shows under another.

Invariants, checked every cycle by check() and repaired where broken (each
repair counted by kind, ebpf_peer_table_repairs_total). peer_addr_map (a
hash: one batch read, 10-15 ms at 16,384 peers) is read again only when
peer_info_map (mmap-able: compared in place, well under 1 ms) changed since
the last read, and at least every FULL_READ_SECONDS: every change to the
hash that this release makes writes peer_info_map too (the kernel describes
each id it hands out, userspace marks, blanks or describes every id whose
address it adds or removes), so only a hand from outside (a tool, an older
release run at once) can change one without the other:
  I1 every value of peer_addr_map is an id 1..max_peers, and no id is the
     value of two addresses ("shared": two peers counted in one row);
  I2 an id marked PEER_AUTO is the value of exactly its own address
     ("ghost" when no address maps to it);
  I3 an id that an address maps to is marked PEER_AUTO ("undescribed": the
     kernel claims the address first and describes the id right after, so
     this is also seen, harmlessly, mid-allocation);
  I4 pool, live and retiring ids are disjoint, no id is twice in the pool,
     and together they are every id 1..max_peers (checked when the pool is
     read: at start, after a repair, and when the mode changes);
  I5 no label twice: follows from I1 and I2 for automatic peers, from
     config validation for named ones.
A "shared" id's counts are mixed: its label is withheld from that cycle's
export (so no mixed count reaches the textfile) and it is retired.
Times (idle, grace) are CLOCK_BOOTTIME: a wall-clock step neither retires
every peer nor starves the pool, and suspend counts as idle.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from ebpf_telemetry.binding import TelemetryError, ffi, lib
from ebpf_telemetry.config import RESERVED_PEER, Config
from ebpf_telemetry.maps import Pins, SeenTimes
from ebpf_telemetry.nodes import peer_key, prefix_mask

# how long a program that read the old table may still be running: BPF
# programs run for microseconds; this is a grace period, not a poll
GRACE_SECONDS = 0.02
# peer_addr_map is read whole at least this often, peer_info_map unchanged or not
FULL_READ_SECONDS = 300.0
REPAIR_KINDS = ("shared", "ghost", "undescribed", "pool_duplicate", "pool_in_use", "pool_missing")


def now_ns() -> int:
    """The clock of idleness and grace periods (peer_seen_map)."""
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


def _info(flags: int, name: str = "", addr: bytes = b"") -> Any:
    info = ffi.new("struct peer_info *")
    info.flags = flags
    info.name = name.encode()
    if addr:
        ffi.memmove(info.addr, addr, len(addr))
    return info


def _key(i: int) -> Any:
    return ffi.new("__u32 *", i)


# -- configured peers ---------------------------------------------------------------------


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


def validate(pins: Pins, cfg: Config) -> None:
    """What the maps cannot hold is refused before anything is written, so a
    reload is applied whole or not at all."""
    cidrs = sum(len(nets) for nets in cfg.peers.values())
    room = pins["peer_cidr_map"].max_entries
    if cidrs > room:
        raise TelemetryError(f"{cidrs} peer CIDRs configured; the pinned table holds {room}")
    have = pins["peer_info_map"].max_entries - 2
    if cfg.max_peers != have:
        raise TelemetryError(f"max_peers {cfg.max_peers}, the pinned table holds {have}")


def apply(pins: Pins, cfg: Config) -> None:
    """Write the configured peer table and settings, in two steps so that no
    count of one peer ever shows under another:
    1. ids that change hands lose their CIDRs (every id not kept by a named
       peer when the mode is or becomes named; every id when automatic peers
       start afresh), the generation is bumped: every socket cache is stale,
       their traffic counts under `other` meanwhile;
    2. after a grace period no program writes those ids any more: their
       counters are zeroed, the new names and CIDRs written, the generation
       bumped again. Entering automatic peers, the pool is filled with every
       id, each one blank."""
    validate(pins, cfg)
    old = pins.settings()
    info_map, cidr_map = pins["peer_info_map"], pins["peer_cidr_map"]
    auto, was_auto = cfg.auto_peers, bool(old.auto_peers) and bool(old.generation)
    current = _named_ids(pins)
    ids = assign_ids(current, list(cfg.peers), cfg.max_peers)
    wanted = {
        bytes(ffi.buffer(k)): (k, node_id)
        for name, node_id in ids.items()
        for k in (peer_key(net) for net in cfg.peers[name])
    }

    # 1. retire
    moving: set[int] = set()
    if not (auto and was_auto):  # automatic peers that stay automatic keep their ids
        _, infos = info_map.array_rows()
        keep = {i for n, i in ids.items() if current.get(n) == i}
        moving = {i for i in range(1, cfg.max_peers + 1) if infos[i].flags and i not in keep}
        moving |= {i for i in ids.values() if i not in keep}
        moving |= _forget_addresses(pins)
    for k in list(cidr_map.keys("struct peer_key")):
        have = int(cidr_map.lookup(k)[0])
        if bytes(ffi.buffer(k)) not in wanted or have in moving:
            cidr_map.delete(k)
    for node_id in moving:
        info_map.update(_key(node_id), _info(0))
    generation = old.generation
    if moving and old.generation:
        generation += 1
        write_settings(pins, cfg, auto and was_auto, generation)
        time.sleep(GRACE_SECONDS)

    # 2. hand over
    for node_id in moving:
        _blank(pins, node_id)
    for name, node_id in ids.items():
        info_map.update(_key(node_id), _info(lib.PEER_NAMED, name))
    for k, node_id in wanted.values():
        cidr_map.update(k, _key(node_id))
    info_map.update(_key(cfg.max_peers + 1), _info(lib.PEER_OTHER, RESERVED_PEER))
    if auto and not was_auto:
        _fill_pool(pins, range(1, cfg.max_peers + 1))
    write_settings(pins, cfg, auto, generation + 1)


def _forget_addresses(pins: Pins) -> set[int]:
    """Drop every kernel-allocated address and the free pool; the ids they held."""
    addr_map = pins["peer_addr_map"]
    ids = set()
    for key, node_id in _addresses(pins):
        ids.add(node_id)
        addr_map.delete(key)
    pins["peer_free_map"].drain()
    return ids


def _fill_pool(pins: Pins, ids: Iterable[int]) -> None:
    pool = pins["peer_free_map"]
    for i in ids:
        pool.push(i)


def _blank(pins: Pins, node_id: int) -> None:
    """An id with no owner: counters, description and last activity zeroed."""
    pins.zero_node(node_id)
    pins["peer_info_map"].update(_key(node_id), _info(0))
    pins["peer_seen_map"].update(_key(node_id), ffi.new("__u64 *", 0))


def write_settings(pins: Pins, cfg: Config, auto: bool, generation: int) -> None:
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
    pins["settings_map"].update(_key(0), s)


def _bump_generation(pins: Pins, cfg: Config) -> None:
    write_settings(pins, cfg, True, pins.settings().generation + 1)


# -- automatic peers that come and go ---------------------------------------------------


def expire(
    pins: Pins,
    cfg: Config,
    active: npt.NDArray[np.int64] | Collection[int],
    seen: Mapping[int, int],
    now: int,
) -> int:
    """One step of the automatic peers' life, each agent cycle; `active`:
    the ids whose counters moved in the last interval, `seen`: peer_seen_map
    as the cycle's snapshot read it, `now`: now_ns(). Returns ids retired.

    - an id in use notes its last activity (peer_seen_map); a time from the
      future (a release that used CLOCK_REALTIME) starts its idle clock anew;
    - an id idle for peer_idle_seconds is retired: its address leaves the
      table and the generation is bumped (no socket cache can count it any
      more), its label goes (its series leave the textfile);
    - a retired id, once nothing can still write it (GRACE_SECONDS later, at
      the next cycle at the earliest), is blanked and given back to the
      pool, and the generation bumped: its next owner starts from 0 under
      its own label, and sockets that overflowed to `other` look again."""
    if not cfg.auto_peers:
        return 0
    seen_map = pins["peer_seen_map"]
    idle_ns, grace_ns = int(cfg.peer_idle_seconds * 1e9), int(GRACE_SECONDS * 1e9)
    flags = flags_of(pins)[: cfg.max_peers + 1]
    last = np.zeros(len(flags), dtype=np.int64)
    if isinstance(seen, SeenTimes):
        last[:] = seen.array[: len(last)].astype(np.int64)
    elif seen:
        known = np.fromiter(seen.keys(), dtype=np.int64, count=len(seen))
        inside = known < len(last)
        last[known[inside]] = np.fromiter(seen.values(), dtype=np.int64, count=len(seen))[inside]
    moved = np.zeros(len(flags), dtype=np.bool_)
    if isinstance(active, np.ndarray):
        act = active.astype(np.int64, copy=False)
    else:
        act = np.fromiter(active, dtype=np.int64, count=len(active))
    moved[act[(act >= 0) & (act < len(flags))]] = True
    auto, retiring = (flags & lib.PEER_AUTO) != 0, (flags & lib.PEER_RETIRING) != 0
    auto[0] = retiring[0] = False  # node 0 is the host
    touch = auto & (moved | (last == 0) | (last > now))
    retire = np.flatnonzero(auto & ~touch & (now - last >= idle_ns)).tolist()
    free = np.flatnonzero(~auto & retiring & ((last > now) | (now - last >= grace_ns))).tolist()
    seen_map.mapped().view(np.uint64)[: len(touch)][touch] = now  # in place: no call per id
    if retire:
        _retire(pins, cfg, retire, now)
    for i in free:
        _blank(pins, i)
    if free:
        _fill_pool(pins, free)
        pins.add_expired(len(free))
        _bump_generation(pins, cfg)
    return len(retire)


def _retire(pins: Pins, cfg: Config, ids: Iterable[int], now: int) -> None:
    """Every address of these ids leaves the table; each id (1..max_peers)
    is held back as retiring, and no socket cache may count it any more."""
    addr_map, info_map = pins["peer_addr_map"], pins["peer_info_map"]
    gone = set(ids)
    for key, node_id in _addresses(pins):
        if node_id in gone:
            addr_map.delete(key)
    for i in sorted(gone):
        if 1 <= i <= cfg.max_peers:
            info_map.update(_key(i), _info(lib.PEER_RETIRING))
            pins["peer_seen_map"].update(_key(i), ffi.new("__u64 *", now))
    _bump_generation(pins, cfg)


def _addresses(pins: Pins) -> list[tuple[Any, int]]:
    """(struct peer_key *, id) of every entry of peer_addr_map: one batch read."""
    n, keys, vals = pins["peer_addr_map"].hash_rows("struct peer_key")
    return [(ffi.new("struct peer_key *", keys[i]), int(vals[i])) for i in range(n)]


def flags_of(pins: Pins) -> npt.NDArray[np.uint32]:
    """peer_info_map's flags, one per id (read in place, no loop over the ids)."""
    m = pins["peer_info_map"]
    size, off = ffi.sizeof("struct peer_info"), ffi.offsetof("struct peer_info", "flags")
    if size % 4 or off % 4:
        raise ValueError(f"struct peer_info: flags at {off} of {size} bytes, not 4-aligned")
    words = m.mapped().view(np.uint32).reshape(m.max_entries, size // 4)
    return words[:, off // 4].copy()  # one strided column of words, not 4 of bytes


def owner_counts(pins: Pins, nodes: int) -> tuple[npt.NDArray[np.int64], set[int]]:
    """How many addresses peer_addr_map maps to each id below nodes, and the
    ids at or beyond nodes it maps to (one batch read, no loop over the ids)."""
    n, _, vals = pins["peer_addr_map"].hash_rows("struct peer_key")
    ids = np.frombuffer(ffi.buffer(vals), dtype=np.uint32, count=n).astype(np.int64)
    inside = ids < nodes
    return np.bincount(ids[inside], minlength=nodes), set(ids[~inside].tolist())


def first_address(pins: Pins, node_id: int) -> bytes:
    """One address peer_addr_map maps to node_id (for a repair: rare)."""
    return owners(pins)[node_id][0]


def owners(pins: Pins) -> dict[int, list[bytes]]:
    """id -> the addresses peer_addr_map maps to it."""
    out: dict[int, list[bytes]] = {}
    for key, node_id in _addresses(pins):
        out.setdefault(node_id, []).append(bytes(ffi.buffer(key.addr, 16)))
    return out


# -- invariants ----------------------------------------------------------------------------


@dataclass
class Checker:
    """check() every cycle; repairs counted by kind since the agent started."""

    repairs: Counter[str] = field(default_factory=Counter)
    pool_checked: bool = False  # I4 needs the pool drained: at start and after a repair
    full_read_ns: int = int(FULL_READ_SECONDS * 1e9)
    table_reads: int = 0  # batch reads of peer_addr_map by check()
    _owners: tuple[npt.NDArray[np.int64], set[int]] | None = field(default=None, repr=False)
    _info: npt.NDArray[np.uint64] | None = field(default=None, repr=False)
    _read_at: int = 0

    def check(self, pins: Pins, cfg: Config) -> set[int]:
        """Check and repair the automatic table; the ids whose counts are
        mixed this cycle (withhold their labels from the export). Arrays over
        the ids (numpy): 16,384 of them cost no Python loop."""
        if not cfg.auto_peers:
            return set()
        max_peers, info_map = cfg.max_peers, pins["peer_info_map"]
        flags = flags_of(pins)
        counts, beyond = self._owner_counts(pins, len(flags))
        ids = np.arange(len(flags))
        live = (ids >= 1) & (ids <= max_peers)
        mapped = counts > 0
        auto, retiring = (flags & lib.PEER_AUTO) != 0, (flags & lib.PEER_RETIRING) != 0
        shared_mask = mapped & ((counts > 1) | ~live)
        came_back = live & mapped & ~shared_mask & ~auto & retiring
        ghosts = np.flatnonzero(live & auto & ~mapped).tolist()
        undescribed = np.flatnonzero(live & mapped & ~shared_mask & ~auto & ~retiring).tolist()
        shared = set(np.flatnonzero(shared_mask | came_back).tolist()) | beyond
        for i in undescribed:  # as the kernel is about to write it
            info_map.update(_key(i), _info(lib.PEER_AUTO, addr=first_address(pins, i)))
        for i in ghosts:
            info_map.update(_key(i), _info(0))
        if shared:  # mixed counts: retired now, blanked and freed after the grace
            _retire(pins, cfg, shared, now_ns())
        self._count("shared", len(shared))
        self._count("ghost", len(ghosts))
        self._count("undescribed", len(undescribed))
        if shared or ghosts or not self.pool_checked:
            self.check_pool(pins, cfg)
        return shared

    def _owner_counts(self, pins: Pins, nodes: int) -> tuple[npt.NDArray[np.int64], set[int]]:
        """owner_counts(), from the last batch read while peer_info_map is as
        it was then (and for FULL_READ_SECONDS at most). Its copy is taken
        before the read: an id described between the two is read again at
        the next cycle, and one whose address the kernel has claimed but not
        yet described is no finding either way (mapped, not PEER_AUTO: I3
        repairs it as the kernel is about to)."""
        info = pins["peer_info_map"].mapped().view(np.uint64)
        now = now_ns()
        if (
            self._owners is not None
            and self._info is not None
            and len(self._owners[0]) == nodes
            and now - self._read_at < self.full_read_ns
            and np.array_equal(info, self._info)
        ):
            return self._owners
        self._info, self._read_at = info.copy(), now
        self._owners = owner_counts(pins, nodes)
        self.table_reads += 1
        return self._owners

    def check_pool(self, pins: Pins, cfg: Config) -> None:
        """I4: drain the pool, wait out the grace (an id the kernel popped
        just before is claimed by then), then give back each free id once.
        Meanwhile (GRACE_SECONDS) a new address counts under `other`."""
        pool = pins["peer_free_map"]
        drained = pool.drain()
        time.sleep(GRACE_SECONDS)
        flags = flags_of(pins)
        addrs, beyond = owner_counts(pins, len(flags))
        used = set(np.flatnonzero((flags != 0) | (addrs > 0)).tolist()) | beyond
        counts = Counter(drained)
        keep = [i for i in dict.fromkeys(drained) if 1 <= i <= cfg.max_peers and i not in used]
        missing = [i for i in range(1, cfg.max_peers + 1) if i not in used and i not in counts]
        _fill_pool(pins, keep + missing)
        self._count("pool_duplicate", sum(c - 1 for c in counts.values()))
        self._count(
            "pool_in_use", sum(1 for i in counts if i in used or not 1 <= i <= cfg.max_peers)
        )
        self._count("pool_missing", len(missing))
        self.pool_checked = True

    def _count(self, kind: str, n: int) -> None:
        if n:
            self.repairs[kind] += n
