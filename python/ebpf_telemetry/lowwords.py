"""The low 32 bits of each peer's RTT histogram row as a NodeReader last read
it: what makes a window's histogram exact (the difference modulo 2^32) without
a second copy of the rows.

A peer's RTT spans a few octaves, not the 256 slots of a row (32 octaves of 8
sub-buckets): each row is kept as the WIDTH slots around its nonzero low
words (4 B x WIDTH a peer: 4 MiB at 16,384 peers, a quarter of whole rows), and
a row whose nonzero low words span more than WIDTH slots is kept whole in
`wide` (its start -1). A slot outside the kept ones is 0 modulo 2^32: exact
either way. advance(), once per moved row and interval, is one C pass
(_build_libbpf.py's ebt_advance_rows); get() and put() are numpy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import as_strided

from ebpf_telemetry.binding import ffi, lib
from ebpf_telemetry.histogram import MAX_SLOTS

WIDTH = lib.EBT_LOW_WIDTH  # 64, 8 octaves: the highest RTT up to 256x the lowest, kept narrow
Low = npt.NDArray[np.uint32]


def _windows(rows: Low) -> Low:
    """rows (k x MAX_SLOTS, C order) as every run of WIDTH slots of each row:
    [j, s] is row j's slots s..s+WIDTH-1, a view (writes go to rows). One
    window per row is indexed at a time (`[arange(k), starts]`, starts <=
    MAX_SLOTS - WIDTH), so a write never meets another through the overlap:
    6x faster than a flat index of every slot (k x WIDTH indices)."""
    if rows.ndim != 2 or rows.shape[1] != MAX_SLOTS:  # the view must stay inside rows
        raise ValueError(f"rows of {MAX_SLOTS} slots expected, not {rows.shape}")
    step = rows.strides[1]
    shape = (rows.shape[0], MAX_SLOTS - WIDTH + 1, WIDTH)
    out: Low = as_strided(rows, shape=shape, strides=(rows.strides[0], step, step))
    return out


def _ptr(ctype: str, a: npt.NDArray[Any]) -> Any:
    """a C pointer to a's data (C-contiguous: the caller's, checked here)."""
    if not a.flags.c_contiguous:
        raise ValueError("a C-contiguous array expected")
    return ffi.cast(ctype, ffi.from_buffer(a))


class LowWords:
    """node id -> the low words of its row (all 0 until put)."""

    def __init__(self, nodes: int) -> None:
        self.start = np.zeros(nodes, dtype=np.int64)  # the first slot kept; -1: in `wide`
        self.words = np.zeros((nodes, WIDTH), dtype=np.uint32)
        self.wide: dict[int, Low] = {}  # rows whose low words span more than WIDTH

    def get(self, ids: npt.NDArray[np.int64]) -> Low:
        """The rows of ids, MAX_SLOTS low words each."""
        out = np.zeros((len(ids), MAX_SLOTS), dtype=np.uint32)
        starts = np.maximum(self.start[ids], 0)  # -1 (kept whole): words are 0
        _windows(out)[np.arange(len(ids)), starts] = self.words[ids]
        if self.wide:
            for j in np.flatnonzero(np.isin(ids, list(self.wide))).tolist():
                out[j] = self.wide[int(ids[j])]
        return out

    def advance(
        self, ids: npt.NDArray[np.int64], rows: npt.NDArray[np.uint64], out: Low | None = None
    ) -> Low:
        """The low words of rows (u64, as read now, one per id, ids without
        repeats) less get(ids), modulo 2^32: what was added since (into out,
        C-contiguous, if given); then put(ids, rows). One pass in C
        (_libbpf's ebt_advance_rows) over the rows whose nonzero low words
        all still lie in the slots kept for them (a peer's RTT range rarely
        moves: the common case); put() for the others."""
        rows = np.ascontiguousarray(rows, dtype=np.uint64)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        inside = not len(ids) or (ids.min() >= 0 and ids.max() < len(self.start))
        if rows.shape != (len(ids), MAX_SLOTS) or not inside:
            raise ValueError(f"{len(ids)} rows of {MAX_SLOTS} slots of ids < {len(self.start)}")
        if out is None:
            out = np.empty((len(ids), MAX_SLOTS), dtype=np.uint32)
        elif out.shape != rows.shape or out.dtype != np.uint32:
            raise ValueError(f"out: {len(ids)} rows of {MAX_SLOTS} u32 expected")
        fits = np.empty(len(ids), dtype=np.uint8)
        lib.ebt_advance_rows(
            _ptr("__u64 *", rows),
            _ptr("__s64 *", ids),
            len(ids),
            _ptr("__s64 *", self.start),
            _ptr("__u32 *", self.words),
            _ptr("__u32 *", out),
            _ptr("__u8 *", fits),
        )
        moved = np.flatnonzero(fits == 0)
        if len(moved):  # out holds their low words now
            low = out[moved].copy()
            out[moved] = low - self.get(ids[moved])
            self.put(ids[moved], low)
        return out

    def put(self, ids: npt.NDArray[np.int64], rows: npt.NDArray[np.uint64] | Low) -> None:
        """Keep the low words of rows (one per id, ids without repeats)."""
        low: Low = rows.astype(np.uint32, copy=False)
        nz = low != 0
        first = np.argmax(nz, axis=1)
        last = MAX_SLOTS - 1 - np.argmax(nz[:, ::-1], axis=1)
        # the WIDTH slots around the nonzero words, the room left shared
        # below and above them: a range that moves a few slots either way
        # (a lower RTT than ever) still fits at the next advance()
        room = np.maximum(WIDTH - (last - first + 1), 0) // 2
        start = np.clip(first - room, 0, MAX_SLOTS - WIDTH)
        fits = (last - start < WIDTH) | ~nz.any(axis=1)
        k = np.flatnonzero(fits)
        self.start[ids[k]] = start[k]
        self.words[ids[k]] = _windows(low)[k, start[k]]
        if self.wide:
            for i in set(ids[k].tolist()) & self.wide.keys():
                del self.wide[i]
        for j in np.flatnonzero(~fits).tolist():
            self.start[ids[j]] = -1  # kept whole: ebt_advance_rows leaves it to put()
            self.words[ids[j]] = 0
            self.wide[int(ids[j])] = low[j].copy()

    def nbytes(self) -> int:
        return self.start.nbytes + self.words.nbytes + sum(w.nbytes for w in self.wide.values())
