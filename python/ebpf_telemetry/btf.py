"""What the running kernel's BTF says: tp_btf hooks it has, enum names.

Drop reason names are read from `enum skb_drop_reason` here, never from a
table of ours: numbers and names differ between kernel versions.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ebpf_telemetry.binding import TelemetryError, ffi, lib

BTF_VMLINUX = "/sys/kernel/btf/vmlinux"
BTF_KIND_ENUM, BTF_KIND_TYPEDEF, BTF_KIND_ENUM64 = 6, 8, 19
DROP_REASON_PREFIXES = ("SKB_DROP_REASON_", "SKB_")  # SKB_NOT_DROPPED_YET, SKB_CONSUMED


def btf_path() -> str:
    """vmlinux BTF; EBPF_TELEMETRY_BTF points elsewhere (tests simulate no BTF)."""
    return os.environ.get("EBPF_TELEMETRY_BTF", BTF_VMLINUX)


def require_btf() -> None:
    if not os.path.exists(btf_path()):
        raise TelemetryError(
            f"no kernel BTF at {btf_path()}: this kernel was built without "
            "CONFIG_DEBUG_INFO_BTF, which CO-RE needs"
        )


@contextmanager
def vmlinux() -> Iterator[Any]:
    btf = lib.btf__load_vmlinux_btf()
    if btf == ffi.NULL:
        raise TelemetryError("cannot read the kernel's BTF")
    try:
        yield btf
    finally:
        lib.btf__free(btf)


def typedefs(names: list[str]) -> set[str]:
    """Which of these typedefs the kernel has (btf_trace_<tp> means tp_btf works)."""
    if not os.path.exists(btf_path()):
        return set()
    with vmlinux() as btf:
        return {n for n in names if lib.btf__find_by_name_kind(btf, n.encode(), 8) > 0}


def enum_values(btf: Any, name: str) -> dict[int, str]:
    tid = lib.btf__find_by_name_kind(btf, name.encode(), BTF_KIND_ENUM)
    if tid <= 0:
        return {}
    t = lib.btf__type_by_id(btf, tid)
    members = ffi.cast("struct btf_enum *", t + 1)
    return {
        members[i].val & 0xFFFFFFFF: ffi.string(
            lib.btf__name_by_offset(btf, members[i].name_off)
        ).decode()
        for i in range(t.info & 0xFFFF)
    }


@functools.cache
def drop_reasons() -> dict[int, str]:
    """enum skb_drop_reason value -> name without the SKB_DROP_REASON_ (or SKB_) prefix."""
    with vmlinux() as btf:
        return {v: _strip_prefix(n) for v, n in enum_values(btf, "skb_drop_reason").items()}


def _strip_prefix(name: str) -> str:
    for p in DROP_REASON_PREFIXES:
        if name.startswith(p):
            return name[len(p) :]
    return name
