"""Drop reasons within max_series.

`ebpf_packet_drops_total{node,reason}` has one series per reason the kernel
has counted: up to the ~120 names of enum skb_drop_reason and the
subsystems' (btf.drops_by_name). Reasons appear while the agent runs, so the
minimum max_series only reserves room for some (metrics.RUNTIME_RESERVE).
When max_series leaves no room for a new reason, it is counted in
reason="other" (lowercase, as "unknown": no kernel name is lowercase):

- the family's sum is still every drop the kernel counted;
- a reason that has had a series of its own keeps it (sticky), so each
  series, "other" included, only goes up: a count never moves from one
  series to another while the room stays the same. Less room (a reload with
  a smaller max_series) shows the smallest of them within "other".
"""

from __future__ import annotations

import structlog

__all__ = ["FOLDED", "DropReasons"]

FOLDED = "other"

log = structlog.get_logger("dropreasons")


class DropReasons:
    """The reasons shown apart, kept from one interval to the next."""

    def __init__(self) -> None:
        self.shown: set[str] = set()
        self.folding = False

    def choose(self, counts: dict[str, int], room: int) -> list[tuple[str, int]]:
        """(reason, count) to export, at most max(room, 1) of them: every
        reason when they fit, else the reasons shown before (the largest
        first when fewer fit), the newcomers with the most drops in what is
        left, and FOLDED with the count of the rest."""
        if len(counts) <= room:
            self.shown = set(counts)
            self._note(0, room)
            return list(counts.items())
        cap = max(room - 1, 0)  # one sample for FOLDED

        def largest_first(names: set[str]) -> list[str]:
            return sorted(names, key=lambda r: (-counts[r], r))

        keep = largest_first(self.shown & counts.keys())[:cap]
        keep += largest_first(counts.keys() - self.shown)[: cap - len(keep)]  # newcomers
        self.shown = set(keep)
        rest = sum(n for r, n in counts.items() if r not in self.shown)
        self._note(len(counts) - len(keep), room)
        return [(r, counts[r]) for r in counts if r in self.shown] + [(FOLDED, rest)]

    def _note(self, folded: int, room: int) -> None:
        if folded and not self.folding:
            log.warning(
                "more drop reasons than max_series fits: newer ones counted in reason=other",
                folded=folded,
                room=room,
            )
        elif self.folding and not folded:
            log.info("every drop reason fits in max_series again")
        self.folding = bool(folded)
