"""The node table: which node id is which peer, in the kernel and in labels.

Node 0 is this host. Named peers ([peers], a peers file, Kubernetes Nodes:
naming.py) get ids 1..N that stay the same across
reloads for a name that stays (its counters continue); an id handed to a new
name starts from zero. With no source of names the kernel hands out one id
per remote address (or subnet) itself, from a pool of free ids
(bpf/nodes.bpf.h); expire() takes back the ids of peers idle for
peer_idle_seconds. Id max_peers + 1 is `other`. Addresses are 16 bytes, IPv4
mapped as ::ffff:a.b.c.d.

This module names what the table holds; peertable.py alone changes it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from ebpf_telemetry.binding import ffi, lib
from ebpf_telemetry.config import Network
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


def peer_names(pins: Pins, s: Any = None, cache: PeerNames | None = None) -> dict[int, str]:
    """node id -> peer label, for every id in use (retiring ids have none);
    s: the settings, if the caller has read them already; cache: the
    labels of the previous reading, so that only changed rows are decoded."""
    s = s if s is not None else pins.settings()
    return (cache or PeerNames()).read(pins, s)


def _label(row: bytes, s: Any) -> str | None:
    """One struct peer_info's label (its bytes), None for an id not in use."""
    flags = int.from_bytes(row[_FLAGS : _FLAGS + 4], "little")
    if flags & lib.PEER_AUTO:
        return auto_label(row[_ADDR : _ADDR + 16], s.auto_prefix_v4, s.auto_prefix_v6)
    if flags & (lib.PEER_NAMED | lib.PEER_OTHER):
        return row[_NAME : _NAME + lib.PEER_NAME_LEN].split(b"\0", 1)[0].decode(errors="replace")
    return None


_FLAGS, _ADDR, _NAME = (ffi.offsetof("struct peer_info", f) for f in ("flags", "addr", "name"))


class PeerNames:
    """peer_info_map as labels, decoding only the rows that changed since
    this cache's previous reading (16,384 rows: an array compare, no loop)."""

    def __init__(self) -> None:
        self.raw: npt.NDArray[np.uint8] | None = None
        self.prefixes: tuple[int, int] = (-1, -1)
        self.names: dict[int, str] = {}

    def read(self, pins: Pins, s: Any) -> dict[int, str]:
        m = pins["peer_info_map"]
        n, size = m.max_entries, ffi.sizeof("struct peer_info")
        mapped = m.mapped().reshape(n, size)
        prefixes = (int(s.auto_prefix_v4), int(s.auto_prefix_v6))
        changed: Sequence[int]
        if self.raw is None or self.raw.shape != mapped.shape or prefixes != self.prefixes:
            raw, names, changed = mapped.copy(), {}, range(n)
        elif np.array_equal(mapped.view(np.uint64), self.raw.view(np.uint64)):
            return self.names  # the common case: compared in place, 16,384 rows not copied
        else:
            words = mapped.view(np.uint64) != self.raw.view(np.uint64)  # 80-byte rows: 10 words
            changed = np.flatnonzero(words.any(axis=1)).tolist()
            raw, names = self.raw.copy(), dict(self.names)
            raw[changed] = mapped[changed]  # as decoded: a later change shows next time
        for i in changed:
            label = _label(raw[i].tobytes(), s)
            if label is None:
                names.pop(i, None)
            else:
                names[i] = label
        # kept only once decoded (an error above leaves the last reading whole)
        self.raw, self.prefixes, self.names = raw, prefixes, dict(sorted(names.items()))
        return self.names
