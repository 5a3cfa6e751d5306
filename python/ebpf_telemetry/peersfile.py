"""The peers file (`peers_file`): one peer CIDR per line, like /etc/hosts.

    # CIDR          NAME     [ZONE]
    10.1.0.0/24     rack-a   zone-1
    10.1.1.7/32     rack-a   zone-1
    fd00:1::/64     db

Several lines may share a NAME (its CIDRs add up). A bad line is one warning
naming file:line and is skipped; the rest apply. The file is checked every
agent cycle (stat: inode, size, mtime, ctime) and re-read when it changed; a
missing or unreadable file is one warning and the last good table is kept.
"""

from __future__ import annotations

import ipaddress
import os
import time

import structlog

from ebpf_telemetry.config import Network, peer_name_problem
from ebpf_telemetry.naming import PeerTable

log = structlog.get_logger("peersfile")


class _Builder:
    """The table being read, line by line; each bad line is one warning."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.peers: dict[str, list[Network]] = {}
        self.zones: dict[str, str] = {}
        self.owner: dict[Network, tuple[str, int]] = {}

    def bad(self, lineno: int, why: str) -> None:
        log.warning("peers file: line skipped", line=f"{self.path}:{lineno}", error=why)

    def add(self, lineno: int, fields: list[str]) -> None:
        if len(fields) not in (2, 3):
            return self.bad(lineno, f"want CIDR NAME [ZONE], got {len(fields)} fields")
        cidr, name, zone = fields[0], fields[1], fields[2] if len(fields) == 3 else ""
        try:
            net = ipaddress.ip_network(cidr, strict=True)
        except ValueError as e:
            return self.bad(lineno, f"bad CIDR {cidr!r}: {e}")
        problem = peer_name_problem(name)
        if problem:
            return self.bad(lineno, problem)
        if net in self.owner:
            other, at = self.owner[net]
            return self.bad(lineno, f"CIDR {net} already listed for {other!r} at line {at}")
        if zone and self.zones.get(name, zone) != zone:
            return self.bad(lineno, f"{name!r} is in zone {self.zones[name]!r} on an earlier line")
        self.owner[net] = (name, lineno)
        self.peers.setdefault(name, []).append(net)
        if zone:
            self.zones[name] = zone
        return None

    def table(self) -> PeerTable:
        return PeerTable({n: tuple(nets) for n, nets in self.peers.items()}, dict(self.zones))


def parse(text: str, path: str) -> PeerTable:
    """The table of a peers file's text; bad lines are logged (path:line) and skipped."""
    b = _Builder(path)
    for lineno, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if fields:
            b.add(lineno, fields)
    return b.table()


def _stamp(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class PeersFile:
    """A naming.Source: the file's table whenever its stat changes."""

    name = "file"

    def __init__(self, path: str) -> None:
        self.path = path
        self.stamp: tuple[int, ...] | None = None
        self.synced: float | None = None
        self.error: str | None = None  # of the failing streak, logged once

    def poll(self) -> PeerTable | None:
        try:
            stamp = _stamp(os.stat(self.path))
            if stamp == self.stamp:
                self.synced = time.time()
                return None
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            self._failed(e)
            return None
        if self.error is not None:
            log.info("peers file readable again", path=self.path)
        self.stamp, self.synced, self.error = stamp, time.time(), None
        table = parse(text, self.path)
        log.info("peers file read", path=self.path, peers=len(table.peers))
        return table

    def _failed(self, e: OSError | UnicodeDecodeError) -> None:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        if why != self.error:
            log.warning(
                "peers file not read; the last good table is kept", path=self.path, error=why
            )
        self.error = why
        self.stamp = None  # read it whole when it is back, whatever its stat

    def last_sync(self) -> float | None:
        return self.synced

    def close(self) -> None:
        pass
