"""The "log2x8" bucket scheme and quantiles: the Python twin of bpf/bits.bpf.h.

Values are integer microseconds. Slot of v: v itself below 8, else with
e = floor(log2 v), slot = 8e - 24 + (v >> (e - 3)): every power of two is cut
into 8 equal sub-buckets (width <= 12.5% of the lower bound). MAX_SLOTS = 256
slots; slot 239 ends at 2^32 us (71 minutes); larger values share the last.

Slot s holds the integers [lower(s), upper(s)); since the kernel truncates
(srtt_us >> 3), a value in slot s means a true value in the same half-open
interval. Every exported Prometheus `le` is a slot's lower bound, so each
cumulative count is exact (the samples below that bound) and `le` a true
upper bound of what it counts. Which boundaries are exported is a named edge
scheme (`edge_slots`):

- `pow2`:   2^k us                  (1 per power of two; le 1, 2, 4, 8, ...)
- `pow2x2`: {1, 1.5} x 2^k us       (2 per power of two; 1, 1.5, 2, 3, 4, 6, 8, ...)
- `all`:    (1 + i/8) x 2^k us, every slot boundary (8 per power of two)

each limited to a range [low, high] of seconds; the counts below the lowest
edge and above the highest stay exact in the first bucket and in +Inf.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from itertools import compress
from typing import Any

import numpy as np

from ebpf_telemetry.binding import lib

MAX_SLOTS: int = lib.MAX_SLOTS
SUB_BITS: int = lib.SUB_BUCKET_BITS
SUB = 1 << SUB_BITS
SCHEME = "log2x8"

EDGE_SCHEMES = ("pow2", "pow2x2", "all")


def value_to_slot(v: int) -> int:
    if v < SUB:
        return v
    e = v.bit_length() - 1
    slot = ((e - SUB_BITS) << SUB_BITS) + (v >> (e - SUB_BITS))
    return min(slot, MAX_SLOTS - 1)


def slot_lower(s: int) -> int:
    """Smallest integer value that lands in slot s."""
    if s < SUB:
        return s
    e = (s >> SUB_BITS) + SUB_BITS - 1  # slot = (e - SUB_BITS + 1) * SUB + mantissa
    m = s & (SUB - 1)
    return (SUB + m) << (e - SUB_BITS)


def slot_upper(s: int) -> int:
    """One past the largest integer value of slot s (the last slot is open)."""
    return slot_lower(s + 1)


def _scheme_edge(s: int, scheme: str) -> bool:
    """Is slot s's lower bound an edge of the scheme? (Below 8 us every slot is
    one integer: 1, 2, 3, 4, 6 are the edges of pow2x2; 1, 2, 4 of pow2.)"""
    lo = slot_lower(s)
    top = 1 << (lo.bit_length() - 1)  # the power of two at or below lo
    if lo == top:
        return True
    return scheme == "all" or (scheme == "pow2x2" and 2 * lo == 3 * top)


def edge_slots(scheme: str, low_seconds: float, high_seconds: float) -> tuple[int, ...]:
    """The slots whose lower bounds, in [low, high] seconds, are the scheme's edges.

    The last slot is open-ended (its lower bound is no edge of anything)."""
    if scheme not in EDGE_SCHEMES:
        raise ValueError(f"unknown edge scheme {scheme!r}; one of {', '.join(EDGE_SCHEMES)}")
    # in microseconds, with room for the decimal rounding of seconds (1e-05 * 1e6)
    lo, hi = low_seconds * 1e6 * (1 - 1e-9), high_seconds * 1e6 * (1 + 1e-9)
    return tuple(
        s for s in range(1, MAX_SLOTS - 1) if lo <= slot_lower(s) <= hi and _scheme_edge(s, scheme)
    )


def le_seconds(us: int) -> str:
    """The canonical `le` label of an edge of `us` microseconds: the shortest
    decimal that reads back as the float nearest to us / 10^6 (Python's repr,
    as prometheus_client writes floats below 10^6: 6e-05, 0.00012, 1.0, 1.5).

    The edge is exact in integers and converted from its decimal string, never
    multiplied in floating point (1e-6 * 60 is 5.9999999999999995e-05), so the
    same edge has the same label in every release and `sum by (le)` holds
    across a fleet of mixed versions."""
    return repr(float(f"{us}e-6"))


def cumulative(slots: Sequence[int], cuts: Sequence[int]) -> list[int]:
    """For each cut slot s: how many values are below slot_lower(s)."""
    out, below, prev = [], 0, 0
    for s in cuts:  # slices summed in C: a few dozen cuts, not MAX_SLOTS adds
        below += sum(slots[prev:s])
        out.append(below)
        prev = s
    return out


def quantile(slots: Sequence[int], q: float, mean: float | None = None) -> float | None:
    """The q-quantile (0..1) in microseconds; None when there is no sample.

    Linear inside the bucket that holds rank q. With `mean` (the exact mean
    of the same samples: the kernel keeps exact sums) the estimate is shifted
    by how far that mean lies from the mean uniform buckets would imply, and
    clamped to the bucket: it never leaves the bucket of the true quantile,
    and samples clustered in one part of a bucket are located where they are
    instead of mid-bucket (a 12.5% wide bucket would otherwise allow a 6% error).
    """
    return quantiles(slots, (q,), mean)[0]


def quantiles(
    slots: Sequence[int], qs: Sequence[float], mean: float | None = None
) -> list[float | None]:
    """quantile() for several q at once: one pass over the slots."""
    used = [(s, slots[s]) for s in compress(range(len(slots)), slots)]  # non-empty slots
    total = sum(c for _, c in used)
    if total <= 0:
        return [None] * len(qs)
    shift = 0.0
    if mean is not None:
        implied = sum(c * (slot_lower(s) + slot_upper(s) - 1) for s, c in used) / (2 * total)
        shift = mean - implied
    out: list[float | None] = []
    for q in qs:
        rank, acc = q * total, 0
        k, c = used[-1]
        for s, n in used:
            if acc + n >= rank:
                k, c = s, n
                break
            acc += n
        lo, hi = slot_lower(k), slot_upper(k)
        est = lo + (hi - lo) * min(max(rank - acc, 0.0) / c, 1.0)
        out.append(min(max(est + shift, float(lo)), float(hi)) if mean is not None else est)
    return out


def merge(rows: Iterable[Sequence[int]]) -> list[int]:
    """Sum per-CPU (or per-node) slot arrays."""
    out = [0] * MAX_SLOTS
    for row in rows:
        for i, c in enumerate(row):
            out[i] += c
    return out


ROWS_AT_ONCE = 1024  # quantiles_rows' float temporaries: 8 B x used slots x this, a few


def quantiles_rows(rows: Any, qs: Sequence[float], means: Any = None) -> Any:
    """quantiles() of many histograms at once: rows (k x MAX_SLOTS counts),
    means (k, NaN: none); a (k x len(qs)) float array, NaN where a row is
    empty. The same estimate as quantiles(), in floating point throughout,
    ROWS_AT_ONCE rows at a time (16,384 rows of 256 slots: 32 MiB a
    temporary if at once)."""
    rows = np.asarray(rows)
    if len(rows) <= ROWS_AT_ONCE:
        return _quantiles_rows(rows, qs, means)
    out = np.empty((len(rows), len(qs)))
    for a in range(0, len(rows), ROWS_AT_ONCE):
        part = None if means is None else np.asarray(means)[a : a + ROWS_AT_ONCE]
        out[a : a + ROWS_AT_ONCE] = _quantiles_rows(rows[a : a + ROWS_AT_ONCE], qs, part)
    return out


def _quantiles_rows(rows: Any, qs: Sequence[float], means: Any) -> Any:
    k = len(rows)
    out = np.full((k, len(qs)), np.nan)
    cols = np.flatnonzero(np.bitwise_or.reduce(rows, axis=0)) if k else rows[:0]
    if len(cols) == 0:
        return out
    lo_col, hi_col = int(cols[0]), int(cols[-1]) + 1  # the slots any row uses
    counts = rows[:, lo_col:hi_col].astype(np.float64)
    lower, upper = (b[lo_col:hi_col] for b in _bounds(rows.shape[1]))
    cum = counts.cumsum(axis=1)
    total = cum[:, -1]
    used = counts > 0
    first = np.argmax(used, axis=1)
    last = counts.shape[1] - 1 - np.argmax(used[:, ::-1], axis=1)
    shift = np.zeros(k)
    if means is not None:
        implied = (counts @ (lower + upper - 1)) / np.where(total > 0, 2 * total, 1)
        shift = np.where(np.isnan(means), 0.0, np.asarray(means, dtype=np.float64) - implied)
    idx = np.arange(k)
    for j, q in enumerate(qs):
        rank = q * total
        # the first used slot whose cumulative count reaches the rank: cum does
        # not decrease, so that is the number of slots below the rank (a slot
        # reached first is a used one when rank > 0; rank 0: the first used)
        slot = np.clip((cum < rank[:, None]).sum(axis=1), first, last)
        c = counts[idx, slot]
        acc = cum[idx, slot] - c
        lo, hi = lower[slot], upper[slot]
        est = lo + (hi - lo) * np.clip((rank - acc) / np.where(c > 0, c, 1), 0.0, 1.0)
        if means is not None:
            est = np.where(np.isnan(means), est, np.clip(est + shift, lo, hi))
        out[:, j] = est
    out[total == 0] = np.nan
    return out


@functools.cache
def _bounds(slots: int) -> Any:
    lower = np.array([slot_lower(s) for s in range(slots)], dtype=np.float64)
    upper = np.array([slot_upper(s) for s in range(slots)], dtype=np.float64)
    return lower, upper
