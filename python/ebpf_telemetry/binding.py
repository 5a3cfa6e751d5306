"""The libbpf binding: the compiled cffi module, errors and logging.

Everything that touches libbpf goes through ``ffi``/``lib`` from here. libbpf's
own log lines (verifier output included) are routed into structlog.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import structlog

from ebpf_telemetry._libbpf import ffi, lib

__all__ = [
    "BpfError",
    "TelemetryError",
    "captured",
    "check",
    "check_ptr",
    "ffi",
    "lib",
    "num_cpus",
    "obj_get",
]

log = structlog.get_logger("libbpf")

_LEVELS = {0: "warning", 1: "info", 2: "debug"}


class TelemetryError(Exception):
    """An error the CLI reports as one line and a non-zero exit."""


class BpfError(TelemetryError):
    def __init__(self, what: str, err: int) -> None:
        self.errno = abs(err)
        super().__init__(f"{what}: {os.strerror(self.errno)} (errno {self.errno})")


# libbpf's warnings while a captured() block runs (innermost block last)
_captures: list[list[str]] = []


@ffi.def_extern()  # type: ignore[untyped-decorator]
def ebt_log_cb(level: int, msg: Any) -> None:
    text = ffi.string(msg).decode(errors="replace").rstrip()
    if not text:
        return
    getattr(log, _LEVELS.get(level, "debug"))(text)
    if _captures and level == 0:
        _captures[-1].append(text)


@contextmanager
def captured() -> Iterator[list[str]]:
    """libbpf's warning messages (a verifier log among them) while the block runs."""
    lines: list[str] = []
    _captures.append(lines)
    try:
        yield lines
    finally:
        _captures.pop()


lib.ebt_install_log()


def check(ret: int, what: str) -> int:
    """libbpf 1.x returns -errno on failure."""
    if ret < 0:
        raise BpfError(what, ret)
    return ret


def check_ptr(ptr: Any, what: str) -> Any:
    """libbpf returns NULL and sets errno for pointer results."""
    if ptr == ffi.NULL:
        raise BpfError(what, ffi.errno or 22)
    return ptr


def obj_get(path: str) -> int:
    """Open a pinned object; its fd."""
    fd: int = lib.bpf_obj_get(path.encode())
    if fd < 0:
        raise BpfError(f"cannot open pinned {path}", fd)
    return fd


def num_cpus() -> int:
    return int(check(lib.libbpf_num_possible_cpus(), "possible CPUs"))
