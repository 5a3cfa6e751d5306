"""What a pin dir already holds, against this build: the maps `run` reuses
as they are, and those of another layout or size (`run` and `doctor`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ebpf_telemetry.binding import TelemetryError
from ebpf_telemetry.layout import MAPS, NODE_MAPS
from ebpf_telemetry.pinned import PinnedMap


@dataclass(frozen=True)
class PinSurvey:
    pin_dir: str
    present: tuple[str, ...] = ()  # our maps' names found pinned
    other_layout: dict[str, str] = field(default_factory=dict)  # name -> what differs
    pinned_peers: int | None = None  # max_peers the pinned peer maps were made for

    @property
    def reusable(self) -> tuple[str, ...]:
        return tuple(n for n in self.present if n not in self.other_layout)

    def resized(self, max_peers: int) -> bool:
        return self.pinned_peers is not None and self.pinned_peers != max_peers


def survey(pin_dir: str) -> PinSurvey:
    """Open every map of ours pinned under pin_dir and check its layout.
    PermissionError (not root) goes to the caller."""
    present: list[str] = []
    other: dict[str, str] = {}
    peers: int | None = None
    for name in MAPS:
        if not os.path.lexists(os.path.join(pin_dir, name)):
            continue
        present.append(name)
        try:
            m = PinnedMap(pin_dir, name)
        except PermissionError:
            raise
        except TelemetryError as e:
            other[name] = str(e)
            continue
        if name in NODE_MAPS and peers is None:
            peers = m.max_entries - 2
        m.close()
    return PinSurvey(pin_dir, tuple(present), other, peers)
