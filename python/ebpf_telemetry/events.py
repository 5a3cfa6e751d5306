"""`events`: stream sampled events from the pinned ring buffer as JSON lines.

The kernel sends events only while a consumer holds a fresh lease (Lease):
with nobody reading, no event is sent and none is lost.

The ring buffer's consumer is one callback per event, so the per-event path
is kept short: struct unpacking, one f-string per line (ints, a fixed type
name and a timestamp: nothing to escape), output written per batch or poll,
not per line.

Fields of a line (docs: README.md, "Events"): `time` (RFC 3339, UTC, the
wall-clock time of the event: timestamp_ns plus the realtime - monotonic
offset read at each poll), `node_id`, `type`, `value`, `timestamp_ns`
(CLOCK_MONOTONIC ns, bpf_ktime_get_ns), `extra_data`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any, BinaryIO

from ebpf_telemetry import lock
from ebpf_telemetry.binding import BpfError, check_ptr, ffi, lib, obj_get
from ebpf_telemetry.maps import Pins
from ebpf_telemetry.nodes import HOST, peer_names
from ebpf_telemetry.pinned import PinnedMap
from ebpf_telemetry.values import EVENT_RECORD, EVENT_TYPES, TelemetryEvent

POLL_MS = 100  # the kernel wakes us only for large batches; poll on a timer too
BATCH = 4096  # JSON lines per write
LEASE_SECONDS = 3.0  # a consumer killed without giving its lease back stops events this soon
RENEW_SECONDS = 1.0
RENEW_EVERY = 1024  # events: a drain that long also renews (one clock read per this many)


class Lease:
    """The consumer's lease (events_lease_map): the kernel sends events only
    while it is fresh. Taken on creation, renewed by renew(), given back by
    release() unless another consumer has renewed it since."""

    def __init__(self, pin_dir: str, seconds: float = LEASE_SECONDS) -> None:
        self.map = PinnedMap(pin_dir, "events_lease_map")
        self.key = ffi.new("__u32 *", 0)
        self.ns = int(seconds * 1e9)
        self.until = self.renewed = 0
        self.renew()

    def renew(self) -> None:
        now = time.monotonic_ns()  # CLOCK_MONOTONIC: the kernel's bpf_ktime_get_ns()
        if now - self.renewed < RENEW_SECONDS * 1e9:
            return
        self.until, self.renewed = now + self.ns, now
        self.map.update(self.key, ffi.new("struct events_lease *", {"until": self.until}))

    def release(self) -> None:
        cur = self.map.lookup(self.key)
        if cur is not None and cur[0].until == self.until:
            self.map.update(self.key, ffi.new("struct events_lease *"))
        self.map.close()


@ffi.def_extern()  # type: ignore[untyped-decorator]
def ebt_ringbuf_cb(ctx: Any, data: Any, size: int) -> int:
    reader: EventReader = ffi.from_handle(ctx)
    reader.delivered += 1
    if not reader.delivered % RENEW_EVERY:
        # ring_buffer__consume() returns only once the ring is empty: a busy
        # ring would hold it past the lease, and the kernel would stop sending
        reader.lease.renew()
    return reader.deliver(bytes(ffi.buffer(data, size)))


class EventReader:
    """lease_seconds: how long the kernel keeps sending if this reader stops
    polling (killed, or starved of CPU): events sampled after that are not
    sent, nor counted anywhere."""

    def __init__(
        self,
        pin_dir: str,
        on_event: Callable[[TelemetryEvent], bool],
        lease_seconds: float = LEASE_SECONDS,
    ) -> None:
        PinnedMap(pin_dir, "events").close()  # checks it is our ring buffer
        # one consumer at a time: two would share one ring position, each
        # seeing part of the events
        self.lock_fd = lock.take(lock.events_dir(pin_dir), "an events consumer")
        try:
            self.fd = obj_get(os.path.join(pin_dir, "events"))
        except BaseException:
            os.close(self.lock_fd)
            raise
        self.on_event = on_event
        self.handle = ffi.new_handle(self)
        self.rb = check_ptr(
            lib.ring_buffer__new(self.fd, lib.ebt_ringbuf_sample, self.handle, ffi.NULL),
            "ring buffer",
        )
        self.lease = Lease(pin_dir, lease_seconds)
        self.delivered = 0
        self.done = False

    def deliver(self, raw: bytes) -> int:
        if not self.done:
            self.done = not self.on_event(TelemetryEvent.from_bytes(raw))
        return 0

    def poll(self) -> None:
        """Wait up to POLL_MS for a wake-up, then drain whatever is there."""
        self.lease.renew()
        for ret in (lib.ring_buffer__poll(self.rb, POLL_MS), lib.ring_buffer__consume(self.rb)):
            if ret < 0 and ret != -4:  # EINTR
                raise BpfError("ring buffer poll", ret)

    def close(self) -> None:
        self.lease.release()
        lib.ring_buffer__free(self.rb)
        os.close(self.fd)
        os.close(self.lock_fd)


def wall_offset_ns() -> int:
    """CLOCK_REALTIME minus CLOCK_MONOTONIC (the clock of the events'
    timestamp_ns) now: added to timestamp_ns, the event's wall-clock time."""
    return time.time_ns() - time.monotonic_ns()


def rfc3339(wall_ns: int) -> str:
    """UTC, microseconds: 2026-11-30T10:22:16.123456Z."""
    sec, ns = divmod(wall_ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + f".{ns // 1000:06d}Z"


def json_line(
    node: int, typ: int, value: int, ts: int, extra: int, offset: int, peer: str = "null"
) -> str:
    """peer: the JSON of the node's peer name (PeerNames), null for the host."""
    name = EVENT_TYPES.get(typ, str(typ))
    return (
        f'{{"time": "{rfc3339(ts + offset)}", "node_id": {node}, "peer": {peer}, '
        f'"type": "{name}", "value": {value}, "timestamp_ns": {ts}, "extra_data": {extra}}}\n'
    )


def as_json(e: TelemetryEvent, offset: int | None = None, peer: str | None = None) -> str:
    off = wall_offset_ns() if offset is None else offset
    line = json_line(
        e.node_id, e.event_type, e.value, e.timestamp, e.extra_data, off, json.dumps(peer)
    )
    return line.rstrip("\n")


class PeerNames:
    """node id -> its peer name as JSON text, read again every RENEW_SECONDS
    (names change while events stream: a peers file, Kubernetes Nodes)."""

    def __init__(self, pin_dir: str) -> None:
        self.pins = Pins(pin_dir)
        self.read_at = 0.0
        self.json: dict[int, str] = {}

    def refresh(self) -> None:
        now = time.monotonic()
        if now - self.read_at < RENEW_SECONDS:
            return
        self.read_at = now
        names = peer_names(self.pins)
        self.json = {i: json.dumps(n) for i, n in names.items() if i != HOST}

    def close(self) -> None:
        self.pins.close()


class JsonStream(EventReader):
    """Events as JSON lines to a binary stream, optionally one type, at most count."""

    def __init__(
        self, pin_dir: str, out: BinaryIO, type_id: int | None = None, count: int | None = None
    ) -> None:
        super().__init__(pin_dir, lambda e: True)
        self.out, self.type_id, self.left = out, type_id, count
        self.lines: list[str] = []
        self.offset = wall_offset_ns()
        self.names = PeerNames(pin_dir)
        self.names.refresh()

    def deliver(self, raw: bytes) -> int:
        if self.done:
            return 0
        node, typ, value, ts, extra = EVENT_RECORD.unpack_from(raw)
        if self.type_id is not None and typ != self.type_id:
            return 0
        peer = self.names.json.get(node, "null")
        self.lines.append(json_line(node, typ, value, ts, extra, self.offset, peer))
        if self.left is not None:
            self.left -= 1
            self.done = self.left <= 0
        if len(self.lines) >= BATCH:
            self.flush()
        return 0

    def flush(self) -> None:
        if self.lines:
            self.out.write("".join(self.lines).encode())
            self.out.flush()
            self.lines.clear()

    def poll(self) -> None:
        self.offset = wall_offset_ns()  # follows clock steps (NTP) between batches
        super().poll()
        self.flush()
        self.names.refresh()

    def close(self) -> None:
        super().close()
        self.names.close()


def stream_json(pin_dir: str, out: BinaryIO, type_name: str | None, count: int | None) -> None:
    """Copy events to out until count of them (or forever)."""
    ids = {v: k for k, v in EVENT_TYPES.items()}
    stream = JsonStream(pin_dir, out, ids[type_name] if type_name else None, count)
    try:
        while not stream.done:
            stream.poll()
    finally:
        stream.flush()
        stream.close()
