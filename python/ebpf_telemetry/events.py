"""`events`: stream sampled events from the pinned ring buffer as JSON lines."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from ebpf_telemetry.binding import BpfError, check_ptr, ffi, lib, obj_get
from ebpf_telemetry.maps import EVENT_TYPES, PinnedMap, TelemetryEvent

POLL_MS = 100  # the kernel wakes us only for large batches; poll on a timer too


@ffi.def_extern()  # type: ignore[untyped-decorator]
def ebt_ringbuf_cb(ctx: Any, data: Any, size: int) -> int:
    reader: EventReader = ffi.from_handle(ctx)
    return reader.deliver(bytes(ffi.buffer(data, size)))


class EventReader:
    def __init__(self, pin_dir: str, on_event: Callable[[TelemetryEvent], bool]) -> None:
        PinnedMap(pin_dir, "events").close()  # checks it is our ring buffer
        self.fd = obj_get(os.path.join(pin_dir, "events"))
        self.on_event = on_event
        self.handle = ffi.new_handle(self)
        self.rb = check_ptr(
            lib.ring_buffer__new(self.fd, lib.ebt_ringbuf_sample, self.handle, ffi.NULL),
            "ring buffer",
        )
        self.done = False

    def deliver(self, raw: bytes) -> int:
        if not self.done:
            self.done = not self.on_event(TelemetryEvent.from_bytes(raw))
        return 0

    def poll(self) -> None:
        """Wait up to POLL_MS for a wake-up, then drain whatever is there."""
        for ret in (lib.ring_buffer__poll(self.rb, POLL_MS), lib.ring_buffer__consume(self.rb)):
            if ret < 0 and ret != -4:  # EINTR
                raise BpfError("ring buffer poll", ret)

    def close(self) -> None:
        lib.ring_buffer__free(self.rb)
        os.close(self.fd)


def as_json(e: TelemetryEvent) -> str:
    return json.dumps(
        {
            "node_id": e.node_id,
            "type": EVENT_TYPES.get(e.event_type, str(e.event_type)),
            "value": e.value,
            "timestamp_ns": e.timestamp,
            "extra_data": e.extra_data,
        }
    )
