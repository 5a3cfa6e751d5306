"""The low 32 bits of each peer's RTT histogram row as a NodeReader last read
it: what makes a window's histogram exact (the difference modulo 2^32) without
a second copy of the rows.

A peer's RTT spans a few octaves, not the 256 slots of a row (32 octaves of 8
sub-buckets): each row is kept as the WIDTH slots from its first nonzero low
word (4 B x WIDTH a peer: 4 MiB at 16,384 peers, a quarter of whole rows), and
a row whose nonzero low words span more than WIDTH slots is kept whole in
`wide`. A slot outside the kept ones is 0 modulo 2^32: exact either way.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ebpf_telemetry.histogram import MAX_SLOTS

WIDTH = 64  # 8 octaves: the highest RTT up to 256x the lowest, in the narrow form
Low = npt.NDArray[np.uint32]


class LowWords:
    """node id -> the low words of its row (all 0 until put)."""

    def __init__(self, nodes: int) -> None:
        self.start = np.zeros(nodes, dtype=np.int64)  # the first slot kept
        self.words = np.zeros((nodes, WIDTH), dtype=np.uint32)
        self.wide: dict[int, Low] = {}  # rows whose low words span more than WIDTH

    def get(self, ids: npt.NDArray[np.int64]) -> Low:
        """The rows of ids, MAX_SLOTS low words each."""
        out = np.zeros((len(ids), MAX_SLOTS), dtype=np.uint32)
        flat = (np.arange(len(ids)) * MAX_SLOTS + self.start[ids])[:, None] + np.arange(WIDTH)
        out.reshape(-1)[flat] = self.words[ids]  # one flat scatter: 3x a 2-D one
        if self.wide:
            for j in np.flatnonzero(np.isin(ids, list(self.wide))).tolist():
                out[j] = self.wide[int(ids[j])]
        return out

    def advance(self, ids: npt.NDArray[np.int64], low: Low) -> Low:
        """low (the low words of the rows of ids now) less get(ids), modulo
        2^32: what was added since; then put(ids, low). In one pass over the
        rows whose nonzero low words are all still in the slots kept for
        them (a peer's RTT range rarely moves: the common case); put() for
        the others."""
        flat = (np.arange(len(ids)) * MAX_SLOTS + self.start[ids])[:, None] + np.arange(WIDTH)
        kept = low.reshape(-1)[flat]  # the kept slots' low words now
        out = low.copy()
        out.reshape(-1)[flat] = kept - self.words[ids]
        # all nonzero words among the kept slots: their sum is the row's
        fits = kept.sum(axis=1, dtype=np.uint64) == low.sum(axis=1, dtype=np.uint64)
        if self.wide:
            for j in np.flatnonzero(np.isin(ids, list(self.wide))).tolist():
                out[j] = low[j] - self.wide[int(ids[j])]
                fits[j] = False
        self.words[ids[fits]] = kept[fits]
        if not fits.all():
            self.put(ids[~fits], low[~fits])
        return out

    def put(self, ids: npt.NDArray[np.int64], rows: npt.NDArray[np.uint64] | Low) -> None:
        """Keep the low words of rows (one per id, ids without repeats)."""
        low = rows if rows.dtype == np.uint32 else rows.astype(np.uint32)
        nz = low != 0
        first = np.argmax(nz, axis=1)
        last = MAX_SLOTS - 1 - np.argmax(nz[:, ::-1], axis=1)
        start = np.minimum(first, MAX_SLOTS - WIDTH)
        fits = (last - start < WIDTH) | ~nz.any(axis=1)
        k = np.flatnonzero(fits)
        self.start[ids[k]] = start[k]
        flat = (k * MAX_SLOTS + start[k])[:, None] + np.arange(WIDTH)
        self.words[ids[k]] = low.reshape(-1)[flat]
        if self.wide:
            for i in set(ids[k].tolist()) & self.wide.keys():
                del self.wide[i]
        for j in np.flatnonzero(~fits).tolist():
            self.start[ids[j]] = 0
            self.words[ids[j]] = 0
            self.wide[int(ids[j])] = low[j].copy()

    def nbytes(self) -> int:
        return self.start.nbytes + self.words.nbytes + sum(w.nbytes for w in self.wide.values())
