"""What a pin dir already holds, against this build: the maps `run` reuses
as they are, and those of another layout or size (`run` and `doctor`); and
the replacement of those of another layout (`run`, unless strict_pins).

Replacing a map restarts its counters (Prometheus' rate() takes the reset);
maps whose layout did not change keep theirs. The maps indexed by peer id and
the peer table go together: a new peer table with old per-id counters would
show one peer's counts under another's name."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import structlog

from ebpf_telemetry.binding import TelemetryError
from ebpf_telemetry.layout import MAPS, NODE_MAPS, LayoutError
from ebpf_telemetry.pinned import PinnedMap

log = structlog.get_logger("pins")

# replaced together: ids mean the same peer in all of them, or in none
PEER_GROUP = (*NODE_MAPS, "peer_cidr_map")


@dataclass(frozen=True)
class PinSurvey:
    pin_dir: str
    present: tuple[str, ...] = ()  # our maps' names found pinned
    other_layout: dict[str, str] = field(default_factory=dict)  # name -> what differs
    pinned_peers: int | None = None  # max_peers the pinned peer maps were made for

    @property
    def reusable(self) -> tuple[str, ...]:
        return tuple(n for n in self.present if n not in self.other_layout)

    def to_replace(self) -> tuple[str, ...]:
        """The maps of another layout, with the rest of the peer group if one
        of it is among them: what `run` unpins."""
        names = set(self.other_layout)
        if names & set(PEER_GROUP):
            names |= set(PEER_GROUP)
        return tuple(n for n in self.present if n in names)

    def resized(self, max_peers: int) -> bool:
        return self.pinned_peers is not None and self.pinned_peers != max_peers


def survey(pin_dir: str) -> PinSurvey:
    """Open every map of ours pinned under pin_dir and check its layout. A
    map that cannot be opened or read (no privileges) is a BpfError."""
    present: list[str] = []
    other: dict[str, str] = {}
    peers: int | None = None
    for name in MAPS:
        if not os.path.lexists(os.path.join(pin_dir, name)):
            continue
        present.append(name)
        try:
            m = PinnedMap(pin_dir, name)
        except LayoutError as e:  # other errors (no privileges): the caller's
            other[name] = str(e)
            continue
        if name in NODE_MAPS and peers is None:
            peers = m.max_entries - 2
        m.close()
    return PinSurvey(pin_dir, tuple(present), other, peers)


def replace_other_layouts(pin_dir: str, strict: bool) -> tuple[str, ...]:
    """Unpin our maps of another layout (and their group) so that the load
    pins new ones; what was unpinned. With strict, refuse instead (one line
    naming `unload`), as releases before this one did."""
    found = survey(pin_dir)
    if not found.other_layout:
        return ()
    if strict:
        raise TelemetryError(next(iter(found.other_layout.values())) + " (strict_pins = true)")
    names = found.to_replace()
    for name in names:
        os.unlink(os.path.join(pin_dir, name))
    log.warning(
        "pinned maps of another layout replaced; their counters restart",
        maps=list(names),
        pin_dir=pin_dir,
    )
    return names
