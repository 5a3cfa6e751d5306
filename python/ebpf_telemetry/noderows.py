"""Every node's counters and RTT histogram as arrays, read without a Python
loop over the peers (16,384 of them at most).

- node_metrics_map (one row per peer, shared by all CPUs, BPF_F_MMAPABLE) is
  read in place through mmap; the host's row (node 0) from host_metrics_map,
  summed over CPUs.
- rtt_hist_map rows (2 KiB each) are read only for the nodes whose RTT
  counters moved: every node with samples for a first reading (`first`), the
  nodes that moved since the reader's previous reading after that (the
  agent's cycle, NodeReader.take), a block at a time: one look-up per row
  where few moved, one batch look-up of the block where many did (read_rows).

A NodeReader keeps the low 32 bits of every histogram row it read
(lowwords.py: 4 MiB at 16,384 peers with samples): the window's histogram of
a node is the difference modulo 2^32 (exact below 2^32 samples in one slot in
one interval), and a node's row at the reader's last reading is its row now
less what was added since (the same difference), read for that node only.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from ebpf_telemetry.binding import BpfError, TelemetryError, ffi, lib
from ebpf_telemetry.histogram import MAX_SLOTS
from ebpf_telemetry.lowwords import LowWords
from ebpf_telemetry.nodes import PeerNames
from ebpf_telemetry.pinned import PinnedMap
from ebpf_telemetry.values import Hist, NodeMetrics

U64Array = npt.NDArray[np.uint64]
IdArray = npt.NDArray[np.int64]

WORDS = ffi.sizeof("struct node_metrics") // 8  # every field is one __u64 word
WORD: dict[str, int] = {
    name: ffi.offsetof("struct node_metrics", name) // 8
    for name, _ in ffi.typeof("struct node_metrics").fields
}
RTT_SUM, RTT_COUNT, RETRANS, DROPS = (
    WORD[n] for n in ("rtt_sum", "rtt_count", "retrans_count", "drop_count")
)
LATEST = tuple(WORD[n] for n in NodeMetrics.LATEST)  # not counters: as they stand
HIST_BYTES = ffi.sizeof("struct hist")


class SupersededError(TelemetryError):
    """A reading asked for a row that a later reading of its reader replaced."""


def metrics_of(row: Any) -> NodeMetrics:
    """One struct node_metrics row (an array of WORDS words) as NodeMetrics."""
    if not row.any():
        return NodeMetrics()
    return NodeMetrics(**{name: int(row[w]) for name, w in WORD.items()})


@dataclass(frozen=True, eq=False)
class MetricRows(Mapping[int, NodeMetrics]):
    """node id -> NodeMetrics, backed by one (nodes x WORDS) array (row 0: the host)."""

    array: U64Array

    def __getitem__(self, node: int) -> NodeMetrics:
        if not 0 <= node < len(self.array):
            raise KeyError(node)
        return metrics_of(self.array[node])

    def __iter__(self) -> Iterator[int]:
        return iter(range(len(self.array)))

    def __len__(self) -> int:
        return len(self.array)


@dataclass(frozen=True, eq=False)
class HistRows(Mapping[int, Hist]):
    """node id -> RTT histogram of one reading: the host's, the rows read
    (`ids`, sorted, and `rows`: a first reading's); for a reader's readings
    (no `rows`) every row comes from the reader (NodeReader.row_at), and
    `since` holds what was added to the rows read since the reader's
    previous reading (their low words less those of then, modulo 2^32)."""

    nodes: int
    host: Hist
    ids: IdArray
    rows: U64Array | None  # None: a reader's reading (its rows are row_at())
    seq: int = 0  # the reader's reading number; 0: not a reader's
    base: int = 0  # the reader's reading before this one; 0: none
    since: npt.NDArray[np.uint32] | None = None
    reader: NodeReader | None = field(default=None, repr=False)

    def position(self, node: int) -> int | None:
        """Where node's row is in `rows`, if it was read."""
        i = int(np.searchsorted(self.ids, node))
        return i if i < len(self.ids) and self.ids[i] == node else None

    def __getitem__(self, node: int) -> Hist:
        if not 0 <= node < self.nodes:
            raise KeyError(node)
        if node == 0:
            return self.host
        i = self.position(node)
        if i is not None and self.rows is not None:
            return _hist(self.rows[i])
        if self.reader is None:  # a first reading read every row with samples
            return Hist.empty()
        return _hist(self.reader.row_at(node, self.seq))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.nodes))

    def __len__(self) -> int:
        return self.nodes

    def follows(self, prev: Mapping[int, Hist]) -> bool:
        """Is this the reading right after prev, by the same reader?"""
        return (
            isinstance(prev, HistRows)
            and self.reader is not None
            and prev.reader is self.reader
            and self.base == prev.seq
            and self.since is not None
        )

    def added(self) -> npt.NDArray[np.uint32]:
        """Per row read, what was added since the previous reading (follows()):
        `since` itself, read-only (u32: a window adds fewer than 2^32 samples
        to a slot; no u64 copy of the rows, their users convert what they use)."""
        assert self.since is not None
        added = self.since.view()
        added.setflags(write=False)
        return added


def _hist(row: Any) -> Hist:
    return Hist(tuple(row.tolist())) if row.any() else Hist.empty()


def lookup_rows(m: PinnedMap, ids: IdArray, into: U64Array | None = None) -> U64Array:
    """The rows of ids of a (non-per-CPU) array of struct hist: one C loop of
    look-ups (into `into`, C-contiguous, len(ids) rows, if given)."""
    out = np.zeros((len(ids), MAX_SLOTS), dtype=np.uint64) if into is None else into
    _check_rows(out, len(ids))
    if len(ids):
        keys = np.ascontiguousarray(ids, dtype=np.uint32)
        err = lib.ebt_lookup_rows(
            m.fd,
            ffi.cast("__u32 *", ffi.from_buffer(keys)),
            len(keys),
            ffi.from_buffer(out),
            HIST_BYTES,
        )
        if err < 0:
            raise BpfError(f"look-up in {m.path}", err)
    return out


def _check_rows(rows: U64Array, n: int) -> None:
    """rows must hold n rows where C writes them: u64, C-contiguous, n x MAX_SLOTS."""
    if rows.dtype != np.uint64 or not rows.flags.c_contiguous or rows.shape != (n, MAX_SLOTS):
        raise ValueError(f"{n} C-contiguous rows of {MAX_SLOTS} u64 expected, not {rows.shape}")


BLOCK = 512  # ids a batch read covers (1 MiB of rows)
DENSE = 2  # a block where more than BLOCK // DENSE rows moved is read in one batch
ENOTSUPP = 524  # the kernel's: no batch look-up for this map


def read_rows(m: PinnedMap, ids: IdArray, out: U64Array | None = None) -> U64Array:
    """lookup_rows(m, ids) (ids sorted, no repeats), the same rows read the
    cheaper way per block of BLOCK ids: one look-up per row where few moved
    (~2 us each here), one batch look-up from the block's first moved id to
    its last where more than BLOCK // DENSE did (~1 us a row, moved or not):
    a busy node whose every peer moves reads its rows 2x faster. Into
    out[:len(ids)] if given (a buffer kept across readings)."""
    rows = np.empty((len(ids), MAX_SLOTS), dtype=np.uint64) if out is None else out[: len(ids)]
    _check_rows(rows, len(ids))
    dense = [(a, b) for a, b in _blocks(ids) if b - a > BLOCK // DENSE]
    if not dense:
        return lookup_rows(m, ids, rows)
    sparse = np.ones(len(ids), dtype=np.bool_)
    span: U64Array | None = None
    for a, b in dense:  # from the block's first moved id to its last
        first, last = int(ids[a]), int(ids[b - 1])
        n = last - first + 1
        whole = b - a == n  # every row between moved: read into place
        if whole:
            into = rows[a:b]
        else:
            span = np.empty((BLOCK, MAX_SLOTS), dtype=np.uint64) if span is None else span
            into = span[:n]
        if not _batch(m, first, into):  # no batch look-up: one by one
            return lookup_rows(m, ids, rows)
        if not whole:
            rows[a:b] = into[ids[a:b] - first]
        sparse[a:b] = False
    if sparse.any():
        rows[sparse] = lookup_rows(m, ids[sparse])
    return rows


def _blocks(ids: IdArray) -> list[tuple[int, int]]:
    """ids (sorted) as runs [a, b), one per block of BLOCK ids they fall in."""
    edge = (np.flatnonzero(np.diff(ids // BLOCK)) + 1).tolist()
    return list(zip([0, *edge], [*edge, len(ids)], strict=True)) if len(ids) else []


def chunks(ids: IdArray, size: int) -> Iterator[tuple[int, int]]:
    """ids (sorted) cut into runs [a, b) of at most size ids (size >= BLOCK),
    whole blocks each: a block read in one batch is never split between two
    runs (the moved rows of 16,384 peers: 16 runs of about 1,024; of a
    sixteenth of them: one run)."""
    a = 0
    for start, end in _blocks(ids):
        if end - a > size and start > a:  # this block starts the next run
            yield a, start
            a = start
    if a < len(ids):
        yield a, len(ids)


def _batch(m: PinnedMap, first: int, out: U64Array) -> bool:
    """The rows first .. first + len(out) - 1 of an array into out, by batch
    look-ups (BPF_MAP_LOOKUP_BATCH on arrays: 5.6); False: not supported."""
    n = len(out)
    keys = ffi.new("__u32[]", n)
    prev, nxt = ffi.new("__u32 *", max(first - 1, 0)), ffi.new("__u32 *")
    opts = ffi.new("struct bpf_map_batch_opts *", {"sz": ffi.sizeof("struct bpf_map_batch_opts")})
    got = 0
    while got < n:  # in_batch: the key before the first wanted (NULL: from key 0)
        cnt = ffi.new("__u32 *", n - got)
        vals = ffi.from_buffer(out[got:])
        start = prev if first + got > 0 else ffi.NULL
        err = 0
        if lib.bpf_map_lookup_batch(m.fd, start, nxt, keys, vals, cnt, opts) < 0:
            err = ffi.errno
            if err in (ENOTSUPP, 22) and got == 0:  # EINVAL: no batch op either
                return False
        if (err and err != 2) or cnt[0] == 0 or keys[0] != first + got:  # ENOENT: the end
            raise BpfError(f"batch look-up of {first + got} in {m.path}", err or 5)
        got += int(cnt[0])
        prev[0] = nxt[0]
    return True


class MetricsView:
    """node_metrics_map in place (mmap, read-only) and the host's per-CPU row."""

    TRIES = 5  # readings of the host's row around the copy, until no sample fell between

    def __init__(self, shared: PinnedMap, host: PinnedMap) -> None:
        self.nodes, self.host = shared.max_entries, host
        size = self.nodes * WORDS * 8
        try:
            self.mm = mmap.mmap(
                shared.fd, -(-size // mmap.PAGESIZE) * mmap.PAGESIZE, prot=mmap.PROT_READ
            )
        except OSError as e:
            raise BpfError(f"mmap of {shared.path}", e.errno or 22) from None
        self.words = np.frombuffer(self.mm, dtype=np.uint64, count=self.nodes * WORDS)
        self.key = ffi.new("__u32 *", 0)
        self.cpus = np.zeros((host.ncpu, WORDS), dtype=np.uint64)
        self.cpus_ptr = ffi.from_buffer(self.cpus)

    def _host_cpus(self) -> U64Array:
        if lib.bpf_map_lookup_elem(self.host.fd, self.key, self.cpus_ptr) < 0:
            raise BpfError(f"look-up in {self.host.path}", ffi.errno)
        return self.cpus.copy()

    def read(self) -> U64Array:
        """A copy of every row; row 0: the host's, summed over CPUs. The
        host's row is read just before the copy and again after it: a sample
        between the two would be in a peer's row and not in the host's, so
        then again (host = the sum of its peers, on a busy host too)."""
        for _ in range(self.TRIES):
            cpus = self._host_cpus()
            out = self.words.reshape(self.nodes, WORDS).copy()
            again = self._host_cpus()
            if (again[:, [RTT_COUNT, RETRANS]] == cpus[:, [RTT_COUNT, RETRANS]]).all():
                break
        host = cpus.sum(axis=0, dtype=np.uint64)
        host[WORD["timestamp"]] = cpus[:, WORD["timestamp"]].max()
        host[WORD["cpu_util"]] //= max(self.host.ncpu, 1)
        out[0] = host
        return out

    def close(self) -> None:
        del self.words
        self.mm.close()


def host_hist(m: PinnedMap) -> Hist:
    _, vals = m.array_rows(1)
    return Hist.from_percpu(vals, 0, m.ncpu)


def moved(metrics: U64Array, last: U64Array | None) -> IdArray:
    """Peers (not node 0) whose RTT counters differ from last (None: that have any)."""
    if last is None:
        mask = metrics[:, RTT_COUNT] != 0
    else:
        mask = (metrics[:, RTT_COUNT] != last[:, RTT_COUNT]) | (
            metrics[:, RTT_SUM] != last[:, RTT_SUM]
        )
    mask[0] = False
    return np.flatnonzero(mask).astype(np.int64)


def first(pins: Any) -> tuple[MetricRows, HistRows]:
    """One reading that owes nothing to another: every node's counters, the
    histogram rows of every node with RTT samples."""
    hists = pins["rtt_hist_map"]  # opened (its layout checked) first, as ever
    view = MetricsView(pins["node_metrics_map"], pins["host_metrics_map"])
    try:
        metrics = view.read()
    finally:
        view.close()
    ids = moved(metrics, None)
    rows = read_rows(hists, ids)
    host = host_hist(pins["rtt_host_hist_map"])
    return MetricRows(metrics), HistRows(len(metrics), host, ids, rows)


class NodeReader:
    """Readings of one pin dir's node rows, each reading only the histogram
    rows that moved since the one before (the agent keeps one for its life)."""

    def __init__(self, pins: Any) -> None:
        self.pins = pins
        pins["rtt_hist_map"]  # opened (its layout checked) first
        self.view = MetricsView(pins["node_metrics_map"], pins["host_metrics_map"])
        n = self.view.nodes
        self.seq = 0
        self.last: U64Array | None = None
        self.low = LowWords(n)
        self.read_at = np.zeros(n, dtype=np.int64)  # node -> the reading that last read it
        self.names = PeerNames()  # peer_info_map's labels, decoded when a row changes
        self.buf = np.zeros((self.CHUNK, MAX_SLOTS), dtype=np.uint64)  # rows being read
        self.broken = False  # a reading failed halfway (its low words part advanced)

    CHUNK = 1024  # rows read and converted at a time: 2 MiB of u64, whatever moved

    def take(self) -> tuple[MetricRows, HistRows]:
        if self.broken:
            raise TelemetryError("a reading of this NodeReader failed halfway: make a new one")
        metrics = self.view.read()
        ids = moved(metrics, self.last)
        base, self.seq = self.seq, self.seq + 1
        since: npt.NDArray[np.uint32] | None = None
        try:  # the low words advance a chunk at a time: a failure leaves them part new
            if base:
                since = self._advance(ids)
            else:  # keep the low words only: no copy of every row
                for a, b in chunks(ids, self.CHUNK):
                    self.low.put(ids[a:b], read_rows(self.pins["rtt_hist_map"], ids[a:b], self.buf))
                ids = ids[:0]
        except BaseException:
            self.broken = True
            raise
        self.read_at[ids] = self.seq
        self.last = metrics
        host = host_hist(self.pins["rtt_host_hist_map"])
        return MetricRows(metrics), HistRows(
            len(metrics), host, ids, None, self.seq, base, since, self
        )

    def _advance(self, ids: IdArray) -> npt.NDArray[np.uint32]:
        """What was added to the rows of ids since the last reading (u32),
        read CHUNK rows at a time: the u64 rows are not kept (a row of this
        reading is row_at()), so a reading where all 16,384 peers moved
        holds 16 MiB of what was added, not 48 MiB more of rows."""
        hm, buf = self.pins["rtt_hist_map"], self.buf
        if len(ids) <= self.CHUNK:
            return self.low.advance(ids, read_rows(hm, ids, buf))
        since = np.empty((len(ids), MAX_SLOTS), dtype=np.uint32)
        for a, b in chunks(ids, self.CHUNK):
            self.low.advance(ids[a:b], read_rows(hm, ids[a:b], buf), since[a:b])
        return since

    def row_at(self, node: int, seq: int) -> U64Array:
        """node's row as it was at reading seq (the last to read it, or one
        after that): now, less what was added since (whose low words differ
        from ours)."""
        if self.read_at[node] > seq:
            raise SupersededError(
                f"node {node}: its row was read again after reading {seq}; "
                "keep the readings of one NodeReader in order"
            )
        now = lookup_rows(self.pins["rtt_hist_map"], np.array([node], dtype=np.int64))[0]
        low = self.low.get(np.array([node], dtype=np.int64))[0]
        since = (now.astype(np.uint32) - low).astype(np.uint64)
        out: U64Array = now - since
        return out

    def close(self) -> None:
        self.view.close()
