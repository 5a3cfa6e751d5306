"""The log2x8 scheme: properties in Python, and the kernel's slots equal Python's."""

from __future__ import annotations

import json
import os
import struct
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ebpf_telemetry import histogram as h
from ebpf_telemetry.histogram import EDGE_SCHEMES, MAX_SLOTS, le_seconds, slot_lower

# every value the slots resolve, up to the last slot's upper bound: derived
# from the layout (a fixed 2^33 stopped at slot 247 once slots became 256)
TOP = h.slot_upper(h.MAX_SLOTS - 1)
VALUES = st.integers(min_value=0, max_value=TOP - 1)


def test_the_values_drawn_reach_the_last_slot() -> None:
    assert h.value_to_slot(TOP - 1) == h.MAX_SLOTS - 1
    assert h.value_to_slot(h.slot_lower(h.MAX_SLOTS - 1) - 1) == h.MAX_SLOTS - 2


@given(VALUES)
def test_value_lies_in_its_slot(v: int) -> None:
    s = h.value_to_slot(v)
    assert 0 <= s < h.MAX_SLOTS
    assert h.slot_lower(s) <= v < h.slot_upper(s)


@given(st.integers(min_value=4, max_value=h.MAX_SLOTS - 1))
def test_bucket_width_at_most_a_quarter(s: int) -> None:
    lo, hi = h.slot_lower(s), h.slot_upper(s)
    assert hi > lo
    assert (hi - lo) / lo <= 0.25


def test_scheme_covers_more_than_an_hour_in_microseconds() -> None:
    assert h.value_to_slot(3600 * 10**6) < h.MAX_SLOTS - 1
    assert h.slot_upper(h.MAX_SLOTS - 2) > 3600 * 10**6
    assert h.value_to_slot(1 << 40) == h.MAX_SLOTS - 1  # clamps, never out of range


def test_slots_are_monotonic_and_contiguous() -> None:
    for s in range(h.MAX_SLOTS - 1):
        assert h.slot_upper(s) == h.slot_lower(s + 1)
        assert h.value_to_slot(h.slot_lower(s)) == s


def test_powers_of_two_are_slot_boundaries() -> None:
    slots = [0] * h.MAX_SLOTS
    for v in (1, 3, 5, 1000, 1023, 1024, 70_000):
        slots[h.value_to_slot(v)] += 1
    cuts = h.edge_slots("pow2", 0, 1e9)
    cum = dict(zip((h.slot_lower(s) for s in cuts), h.cumulative(slots, cuts), strict=True))
    assert cum[1] == 0 and cum[2] == 1 and cum[4] == 2 and cum[8] == 3
    assert cum[1024] == 5 and cum[2048] == 6 and cum[1 << 17] == 7


@pytest.mark.parametrize(
    ("scheme", "mantissas"),
    [("pow2", {1.0}), ("pow2x2", {1.0, 1.5}), ("all", {1 + i / 8 for i in range(8)})],
)
def test_edge_schemes_are_their_mantissas_times_powers_of_two(
    scheme: str, mantissas: set[float]
) -> None:
    """Every edge is a slot boundary (so counts are exact) of the scheme's form,
    and none of that form in the range is missing."""
    cuts = h.edge_slots(scheme, 8e-6, 1.0)
    edges = [h.slot_lower(s) for s in cuts]
    want = sorted(
        int(m * (1 << k)) for k in range(3, 21) for m in mantissas if 8 <= m * (1 << k) <= 1e6
    )
    assert edges == want
    assert all(h.value_to_slot(e) == s for e, s in zip(edges, cuts, strict=True))
    assert len(cuts) == len(mantissas) * 17  # 8 us .. 2^19 us (0.52 s): 17 powers of two


@given(st.lists(VALUES, max_size=100), st.sampled_from(h.EDGE_SCHEMES))
def test_cumulative_counts_are_exact_at_every_edge(values: list[int], scheme: str) -> None:
    slots = [0] * h.MAX_SLOTS
    for v in values:
        slots[h.value_to_slot(v)] += 1
    cuts = h.edge_slots(scheme, 0, 1e9)
    for s, c in zip(cuts, h.cumulative(slots, cuts), strict=True):
        assert c == sum(v < h.slot_lower(s) for v in values)


def test_quantile_interpolates_inside_the_bucket() -> None:
    slots = [0] * h.MAX_SLOTS
    s = h.value_to_slot(1000)  # [960, 1024)
    assert (h.slot_lower(s), h.slot_upper(s)) == (960, 1024)
    slots[s] = 100
    assert h.quantile(slots, 0.5) == pytest.approx(992)
    assert h.quantile(slots, 0.5, mean=1010.0) == pytest.approx(1010, abs=1)  # one bucket: the mean
    assert h.quantile([0] * h.MAX_SLOTS, 0.5) is None
    slots[h.value_to_slot(2000)] = 100  # a mean that cannot be: clamped to the bucket
    assert h.quantile(slots, 0.25, mean=1.0) == h.slot_lower(s)


@given(st.lists(VALUES, min_size=1, max_size=200), st.floats(min_value=0.01, max_value=1.0))
def test_quantile_within_bucket_of_true_quantile(values: list[int], q: float) -> None:
    slots = [0] * h.MAX_SLOTS
    for v in values:
        slots[h.value_to_slot(v)] += 1
    true = sorted(values)[max(0, -(-int(q * len(values) * 1e9) // int(1e9)) - 1)]
    s = h.value_to_slot(true)
    for mean in (None, sum(values) / len(values)):
        est = h.quantile(slots, q, mean)
        assert est is not None
        assert h.slot_lower(s) <= est <= h.slot_upper(s)


# -- the kernel's value_to_slot, run with BPF_PROG_TEST_RUN on a syscall program

N = 64
TEST_OBJ = os.path.join(os.path.dirname(__file__), "..", "build", "slot_test.bpf.o")


@pytest.fixture(scope="module")
def kernel_slots():  # type: ignore[no-untyped-def]
    from ebpf_telemetry.binding import check, check_ptr, ffi, lib

    if os.geteuid() != 0:
        pytest.skip("needs root to load BPF")
    if not os.path.exists(TEST_OBJ):
        pytest.skip(f"{TEST_OBJ} not built (make build)")
    obj = check_ptr(lib.bpf_object__open_file(TEST_OBJ.encode(), ffi.NULL), "open")
    check(lib.bpf_object__load(obj), "load slot_test")
    prog = lib.bpf_object__find_program_by_name(obj, b"slot_of")
    fd = lib.bpf_program__fd(prog)

    buf = bytearray(16)  # struct slot_args { __u64 value; __u32 slot; }
    opts = ffi.new("struct bpf_test_run_opts *")
    opts.sz = ffi.sizeof("struct bpf_test_run_opts")
    opts.ctx_in = ffi.from_buffer(buf)
    opts.ctx_size_in = len(buf)

    def run(values: list[int]) -> list[int]:
        out = []
        for v in values:
            struct.pack_into("<QI", buf, 0, v, 0)
            check(lib.bpf_prog_test_run_opts(fd, opts), "test run")
            out.append(struct.unpack_from("<I", buf, 8)[0])
        return out

    yield run
    lib.bpf_object__close(obj)


EDGES = sorted(
    {0, 1, 2, 3, 4, 5, 7, 8, 15, 16, 1023, 1024, 1025}
    | {(1 << e) + d for e in range(2, 64) for d in (-1, 0)}
    | {(1 << 64) - 1}
)


def test_kernel_slots_equal_python_on_edges(kernel_slots) -> None:  # type: ignore[no-untyped-def]
    for i in range(0, len(EDGES), N):
        chunk = EDGES[i : i + N]
        assert kernel_slots(chunk) == [h.value_to_slot(v) for v in chunk]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=(1 << 64) - 1), min_size=1, max_size=N))
def test_kernel_slots_equal_python(kernel_slots, values: list[int]) -> None:  # type: ignore[no-untyped-def]
    assert kernel_slots(values) == [h.value_to_slot(v) for v in values]


def test_window_after_a_reset_is_the_new_reading() -> None:
    from ebpf_telemetry.values import Hist, NodeMetrics

    old = Hist(tuple([5] * h.MAX_SLOTS))
    new = Hist(tuple([1] + [0] * (h.MAX_SLOTS - 1)))
    assert new.since(old) == new
    assert Hist(tuple([6] * h.MAX_SLOTS)).since(old).count == h.MAX_SLOTS
    assert NodeMetrics(rtt_count=3, rtt_sum=30).since(NodeMetrics(rtt_count=9, rtt_sum=90)) == (
        NodeMetrics(rtt_count=3, rtt_sum=30)
    )


def test_event_json_lines_are_json() -> None:
    import io
    import json
    import struct as st

    from ebpf_telemetry.events import as_json, json_line
    from ebpf_telemetry.values import EVENT_RECORD, TelemetryEvent

    raw = st.pack("=IIQQI4x", 7, 4, 123, 10**18, 4242)
    e = TelemetryEvent.from_bytes(raw)
    assert (e.node_id, e.type_name, e.value, e.timestamp, e.extra_data) == (
        7,
        "runqlat",
        123,
        10**18,
        4242,
    )
    offset = 764_000_000 * 10**9 + 123_456_789  # realtime - monotonic
    assert json.loads(as_json(e, offset, 'b"\\')) == {
        "time": "2025-11-24T16:00:00.123456Z",  # (10**18 + offset) ns since the epoch
        "node_id": 7,
        "peer": 'b"\\',
        "type": "runqlat",
        "value": 123,
        "timestamp_ns": 10**18,
        "extra_data": 4242,
    }
    line = json_line(*EVENT_RECORD.unpack_from(raw), offset)
    assert json.loads(line) == json.loads(as_json(e, offset))
    assert json.loads(as_json(e, offset))["peer"] is None
    assert io.StringIO(json_line(1, 99, 0, 0, 0, 0)).read().endswith("}\n")


# -- canonical `le` labels ----------------------------------------------------------

LE_EDGES = Path(__file__).parent / "data" / "le_edges.json"


def exported_les() -> dict[str, list[str]]:
    """Every `le` list we export: per rtt_buckets scheme and the host histogram
    at the default range, every kernel edge (any range), the run-queue histogram."""
    from ebpf_telemetry.config import Config
    from ebpf_telemetry.metrics import RUNQ_BUCKETS, Buckets

    lo, hi = Config().rtt_bucket_range_seconds
    out = {f"ebpf_tcp_rtt_seconds rtt_buckets={s}": list(Buckets.of(s, lo, hi).les)
           for s in EDGE_SCHEMES}  # fmt: skip
    out["ebpf_node_tcp_rtt_seconds"] = list(Buckets.of("all", lo, hi).les)
    out["every kernel edge (rtt_buckets=all, any range)"] = list(Buckets.of("all", 0, 1e9).les)
    out["ebpf_runqueue_latency_seconds"] = list(RUNQ_BUCKETS.les)
    return out


def test_le_labels_are_pinned() -> None:
    """A changed `le` renames a bucket across a mixed fleet (sum by (le) breaks):
    the full lists are kept in tests/data/le_edges.json, reviewed by eye."""
    assert exported_les() == json.loads(LE_EDGES.read_text())


def test_le_labels_are_the_exact_edges() -> None:
    """Each `le` is the edge itself in decimal (no float noise such as
    5.9999999999999995e-05), and reads back as the float nearest to it."""
    for s in range(1, MAX_SLOTS - 1):
        us = slot_lower(s)
        le = le_seconds(us)
        assert Decimal(le) * 10**6 == us, (s, le)
        assert float(le) == us / 10**6, (s, le)
        assert le == repr(float(le))  # shortest form
    assert le_seconds(60) == "6e-05" and le_seconds(120) == "0.00012"
