"""Where peers get their names and zones: `[peers]` in the config, a peers
file (peersfile.py) or the cluster's Node objects (kubenodes.py).

A source hands the agent a PeerTable when its table changes; the agent writes
it to the kernel through peertable.apply, the path a reload takes, so a renamed
peer never shows another's counts. The kernel's peer_info holds a name only:
zones stay here, in userspace (Zones), and are looked up when labelling.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol

from ebpf_telemetry.config import Config, Network


@dataclass(frozen=True)
class PeerTable:
    """Peer name -> its CIDRs, name -> zone, and this node's zone if the source knows it."""

    peers: dict[str, tuple[Network, ...]]
    zones: dict[str, str] = field(default_factory=dict)
    own_zone: str | None = None


@dataclass(frozen=True)
class Zones:
    """This node's zone and each peer's (by name), as the labels show them ("" unknown)."""

    own: str = ""
    peers: dict[str, str] = field(default_factory=dict)

    def of(self, name: str) -> str:
        return self.peers.get(name, "")

    def by_id(self, names: dict[int, str]) -> dict[int, str]:
        """node id -> zone, for the ids of a snapshot (node id -> peer name)."""
        return {i: self.peers.get(name, "") for i, name in names.items()}


class Source(Protocol):
    name: str  # the `source` label of ebpf_peer_source_last_sync_timestamp_seconds

    def poll(self) -> PeerTable | None:
        """The table, if it changed since the last poll (never blocks)."""

    def last_sync(self) -> float | None:
        """Unix time the source was last known to be whole and current."""

    def close(self) -> None: ...


def open_source(cfg: Config) -> Source | None:
    """The source of cfg's peer names, or None ([peers] or automatic peers)."""
    if cfg.peers_file:
        from ebpf_telemetry.peersfile import PeersFile

        return PeersFile(cfg.peers_file)
    if cfg.kubernetes.enabled:
        from ebpf_telemetry.kubenodes import KubeNodes

        return KubeNodes(cfg.node_name, cfg.kubernetes)
    return None


def same_source(a: Config, b: Config) -> bool:
    return (a.peers_file, a.kubernetes, a.node_name) == (b.peers_file, b.kubernetes, b.node_name)


def fit(table: PeerTable, max_peers: int) -> PeerTable:
    """At most max_peers names (by name order); the rest count under `other`."""
    if len(table.peers) <= max_peers:
        return table
    kept = sorted(table.peers)[:max_peers]
    return replace(table, peers={n: table.peers[n] for n in kept})


def left_out(cfg: Config, table: PeerTable | None) -> int:
    """How many of the source's names max_peers leaves out."""
    return max(0, len(table.peers) - cfg.max_peers) if table is not None else 0


def effective(cfg: Config, table: PeerTable | None) -> Config:
    """cfg with the source's peers in place of [peers] (what peertable.apply writes)."""
    if table is None:
        return cfg
    return replace(cfg, peers=fit(table, cfg.max_peers).peers)


def zones(cfg: Config, table: PeerTable | None) -> Zones:
    if table is None:
        return Zones(cfg.zone)
    own = table.own_zone if table.own_zone is not None else cfg.zone
    return Zones(own, table.zones)
