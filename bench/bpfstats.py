"""Per-program run_time_ns / run_cnt through libbpf (ctypes on libbpf.so.1).

The product's cffi binding declares only what the product needs; the calls
the benchmark adds (bpf_enable_stats, bpf_prog_get_fd_by_id, link info) go
through ctypes here so that the binding stays untouched.
"""

from __future__ import annotations

import ctypes
import os
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

K = TypeVar("K")
T = TypeVar("T")

_lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
BPF_STATS_RUN_TIME = 0
SYSCTL = "/proc/sys/kernel/bpf_stats_enabled"


class ProgInfo(ctypes.Structure):
    """struct bpf_prog_info (uapi linux/bpf.h) up to run_cnt."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
        ("ifindex", ctypes.c_uint32),
        ("gpl_compatible", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64),
        ("nr_jited_ksyms", ctypes.c_uint32),
        ("nr_jited_func_lens", ctypes.c_uint32),
        ("jited_ksyms", ctypes.c_uint64),
        ("jited_func_lens", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32),
        ("func_info", ctypes.c_uint64),
        ("nr_func_info", ctypes.c_uint32),
        ("nr_line_info", ctypes.c_uint32),
        ("line_info", ctypes.c_uint64),
        ("jited_line_info", ctypes.c_uint64),
        ("nr_jited_line_info", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32),
        ("jited_line_info_rec_size", ctypes.c_uint32),
        ("nr_prog_tags", ctypes.c_uint32),
        ("prog_tags", ctypes.c_uint64),
        ("run_time_ns", ctypes.c_uint64),
        ("run_cnt", ctypes.c_uint64),
    ]


class LinkInfo(ctypes.Structure):
    """struct bpf_link_info: the common head, padded for the union."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("prog_id", ctypes.c_uint32),
        ("pad", ctypes.c_uint8 * 100),
    ]


@dataclass(frozen=True)
class ProgStats:
    prog_id: int
    name: str
    run_time_ns: int
    run_cnt: int

    def since(self, prev: ProgStats) -> ProgStats:
        return ProgStats(
            self.prog_id,
            self.name,
            self.run_time_ns - prev.run_time_ns,
            self.run_cnt - prev.run_cnt,
        )

    @property
    def ns_per_event(self) -> float | None:
        return self.run_time_ns / self.run_cnt if self.run_cnt else None


def _fail(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


def _info(fd: int, info: ctypes.Structure) -> None:
    size = ctypes.c_uint32(ctypes.sizeof(info))
    if _lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)) < 0:
        raise _fail("bpf_obj_get_info_by_fd")


def link_prog_id(link_pin: str) -> int:
    """The id of the program behind a pinned link."""
    fd = _lib.bpf_obj_get(link_pin.encode())
    if fd < 0:
        raise _fail(f"bpf_obj_get {link_pin}")
    try:
        info = LinkInfo()
        _info(fd, info)
        return int(info.prog_id)
    finally:
        os.close(fd)


def prog_stats(prog_id: int) -> ProgStats:
    fd = _lib.bpf_prog_get_fd_by_id(ctypes.c_uint32(prog_id))
    if fd < 0:
        raise _fail(f"bpf_prog_get_fd_by_id {prog_id}")
    try:
        info = ProgInfo()
        _info(fd, info)
        return ProgStats(prog_id, info.name.decode(), int(info.run_time_ns), int(info.run_cnt))
    finally:
        os.close(fd)


def prog_ids_of_pid(pid: int) -> list[int]:
    """Programs a process holds open (bpftrace, runqlat: fdinfo prog_id)."""
    ids: list[int] = []
    base = f"/proc/{pid}/fdinfo"
    for fd in os.listdir(base):
        try:
            with open(os.path.join(base, fd)) as f:
                m = re.search(r"^prog_id:\s+(\d+)", f.read(), re.M)
        except OSError:
            continue
        if m and int(m.group(1)) not in ids:
            ids.append(int(m.group(1)))
    return ids


@contextmanager
def stats_enabled() -> Iterator[None]:
    """bpf stats on for the block: kernel.bpf_stats_enabled reads 1 meanwhile.

    BPF_ENABLE_STATS holds a reference on the same switch as the sysctl and
    drops it when its fd closes, so the previous state comes back by itself,
    even if the benchmark is killed, and a concurrent user of the sysctl is
    neither overridden nor underflowed (writing 0 to the sysctl would drop
    someone else's reference)."""
    fd = _lib.bpf_enable_stats(BPF_STATS_RUN_TIME)
    if fd < 0:
        raise _fail("bpf_enable_stats")
    try:
        yield
    finally:
        os.close(fd)


def stats_sysctl() -> str:
    with open(SYSCTL) as f:
        return f.read().strip()


def during(ids: Mapping[K, int], run: Callable[[], T]) -> tuple[dict[K, ProgStats], T]:
    """Each program's runs and run time while run() ran (bpf stats on
    meanwhile), and what run() returned."""
    with stats_enabled():
        before = {k: prog_stats(i) for k, i in ids.items()}
        out = run()
        return {k: prog_stats(i).since(before[k]) for k, i in ids.items()}, out
