"""The "log2x4" bucket scheme and quantiles: the Python twin of bpf/bits.bpf.h.

Values are integer microseconds. Slot of v: v itself below 4, else with
e = floor(log2 v), slot = 4e - 8 + (v >> (e - 2)): every power of two is cut
into 4 equal sub-buckets (width <= 25% of the lower bound). MAX_SLOTS = 128
slots; slot 123 ends at 2^32 us (71 minutes); larger values share the last.

Slot s holds the integers [lower(s), upper(s)); since the kernel truncates
(srtt_us >> 3), a value in slot s means a true value in the same half-open
interval. Prometheus `le` bounds are taken at powers of two of microseconds,
which are slot boundaries, so the exported cumulative counts are exact.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ebpf_telemetry.binding import lib

MAX_SLOTS: int = lib.MAX_SLOTS
SUB_BITS: int = lib.SUB_BUCKET_BITS
SUB = 1 << SUB_BITS
SCHEME = "log2x4"

# Prometheus `le` for exported histograms: 2^0 .. 2^26 microseconds (1 us .. 67 s)
LE_EXPONENTS = range(27)


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
    e = (s >> SUB_BITS) + 1
    m = s & (SUB - 1)
    return (SUB + m) << (e - SUB_BITS)


def slot_upper(s: int) -> int:
    """One past the largest integer value of slot s (the last slot is open)."""
    return slot_lower(s + 1)


def cumulative_at_powers_of_two(slots: Sequence[int]) -> list[tuple[int, int]]:
    """[(2^k us, count of values < 2^k us)] for k in LE_EXPONENTS."""
    out: list[tuple[int, int]] = []
    acc = 0
    s = 0
    for k in LE_EXPONENTS:
        bound = 1 << k
        end = value_to_slot(bound)  # first slot starting at 2^k
        while s < end:
            acc += slots[s]
            s += 1
        out.append((bound, acc))
    return out


def quantile(slots: Sequence[int], q: float, mean: float | None = None) -> float | None:
    """The q-quantile (0..1) in microseconds; None when there is no sample.

    Linear inside the bucket that holds rank q. With `mean` (the exact mean
    of the same samples: the kernel keeps exact sums) the estimate is shifted
    by how far that mean lies from the mean uniform buckets would imply, and
    clamped to the bucket: it never leaves the bucket of the true quantile,
    and samples clustered in one part of a bucket are located where they are
    instead of mid-bucket (a 25% wide bucket would otherwise allow a 12% error).
    """
    total = sum(slots)
    if total <= 0:
        return None
    rank = q * total
    acc = 0
    k = max(i for i, c in enumerate(slots) if c)
    for s, c in enumerate(slots):
        if c and acc + c >= rank:
            k = s
            break
        acc += c
    lo, hi = slot_lower(k), slot_upper(k)
    est = lo + (hi - lo) * min(max(rank - acc, 0.0) / slots[k], 1.0)
    if mean is None:
        return est
    implied = sum(c * (slot_lower(s) + slot_upper(s) - 1) / 2 for s, c in enumerate(slots) if c)
    return min(max(est + mean - implied / total, float(lo)), float(hi))


def merge(rows: Iterable[Sequence[int]]) -> list[int]:
    """Sum per-CPU (or per-node) slot arrays."""
    out = [0] * MAX_SLOTS
    for row in rows:
        for i, c in enumerate(row):
            out[i] += c
    return out
