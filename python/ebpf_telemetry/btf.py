"""What the running kernel's BTF says: tracepoint arguments, enum names.

Drop reason names are read from `enum skb_drop_reason` here, never from a
table of ours: numbers and names differ between kernel versions. Reasons of
subsystems (6.4+: `(subsystem << 16) | code`) are named by the subsystem's own
`enum *_drop_reason` (mac80211's, openvswitch's), found in the BTF of
vmlinux or of the module that defines it.
"""

from __future__ import annotations

import functools
import glob
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ebpf_telemetry.binding import TelemetryError, ffi, lib

BTF_VMLINUX = "/sys/kernel/btf/vmlinux"
BTF_KIND_INT, BTF_KIND_PTR, BTF_KIND_STRUCT, BTF_KIND_UNION = 1, 2, 4, 5
BTF_KIND_ENUM, BTF_KIND_TYPEDEF, BTF_KIND_FUNC_PROTO, BTF_KIND_ENUM64 = 6, 8, 13, 19
BTF_KIND_FUNC = 12
_MODIFIERS = (9, 10, 11, 18)  # volatile, const, restrict, type tag: not part of a name
DROP_REASON_PREFIXES = ("SKB_DROP_REASON_", "SKB_")  # SKB_NOT_DROPPED_YET, SKB_CONSUMED
SUBSYS_SHIFT = 16  # SKB_DROP_REASON_SUBSYS_SHIFT
SUBSYS_PREFIX = "SKB_DROP_REASON_SUBSYS_"


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


def _kind(t: Any) -> int:
    return int((t.info >> 24) & 0x1F)


def _name(btf: Any, t: Any) -> str:
    return str(ffi.string(lib.btf__name_by_offset(btf, t.name_off)).decode())


def type_name(btf: Any, type_id: int) -> str:
    """A C spelling of a type without qualifiers: `struct sock *`, `int`, `enum x`."""
    if type_id == 0:
        return "void"
    t = lib.btf__type_by_id(btf, type_id)
    kind = _kind(t)
    if kind in _MODIFIERS:
        return type_name(btf, t.size)  # .size aliases .type for these kinds
    if kind == BTF_KIND_PTR:
        return type_name(btf, t.size) + " *"
    prefix = {BTF_KIND_STRUCT: "struct ", BTF_KIND_UNION: "union ", BTF_KIND_ENUM: "enum "}
    return prefix.get(kind, "enum " if kind == BTF_KIND_ENUM64 else "") + _name(btf, t)


def typedef_args(btf: Any, name: str) -> tuple[str, ...] | None:
    """Argument types of a `typedef void (*name)(void *, ...)`, the first (the
    tracepoint's data pointer) left out; None if there is no such typedef."""
    tid = lib.btf__find_by_name_kind(btf, name.encode(), BTF_KIND_TYPEDEF)
    if tid <= 0:
        return None
    ptr = lib.btf__type_by_id(btf, lib.btf__type_by_id(btf, tid).size)
    proto = lib.btf__type_by_id(btf, ptr.size)
    if _kind(ptr) != BTF_KIND_PTR or _kind(proto) != BTF_KIND_FUNC_PROTO:
        return None
    params = ffi.cast("struct btf_param *", proto + 1)
    return tuple(type_name(btf, params[i].type) for i in range(1, proto.info & 0xFFFF))


def has_func(btf: Any, name: str) -> bool:
    """Is there a function of this name (a kfunc is one, in vmlinux BTF)?"""
    return bool(lib.btf__find_by_name_kind(btf, name.encode(), BTF_KIND_FUNC) > 0)


def enum_names(btf: Any, enum: str, prefix: str) -> list[str]:
    """Member names of an enum, prefix removed."""
    return [n.removeprefix(prefix) for n in enum_values(btf, enum).values()]


def enum_values(btf: Any, name: str) -> dict[int, str]:
    tid = lib.btf__find_by_name_kind(btf, name.encode(), BTF_KIND_ENUM)
    if tid <= 0:
        return {}
    return _members(btf, lib.btf__type_by_id(btf, tid))


def _members(btf: Any, t: Any) -> dict[int, str]:
    """value -> name of each member of the enum type t."""
    members = ffi.cast("struct btf_enum *", t + 1)
    return {
        members[i].val & 0xFFFFFFFF: ffi.string(
            lib.btf__name_by_offset(btf, members[i].name_off)
        ).decode()
        for i in range(t.info & 0xFFFF)
    }


@functools.cache
def drop_reasons() -> dict[int, str]:
    """enum skb_drop_reason value -> name without the SKB_DROP_REASON_ (or SKB_)
    prefix; "unknown" for drops counted on kernels that pass no reason."""
    with vmlinux() as btf:
        names = {v: _strip_prefix(n) for v, n in enum_values(btf, "skb_drop_reason").items()}
    return {**names, lib.DROP_REASON_UNKNOWN: "unknown"}


def drops_by_name(counts: dict[int, int]) -> dict[str, int]:
    """reason value -> count, as label -> count (in value order; two values
    that share a name share its count)."""
    out: dict[str, int] = {}
    for value, count in sorted(counts.items()):
        name = drop_reason_name(value)
        out[name] = out.get(name, 0) + count
    return out


def drop_reason_name(value: int) -> str:
    """The label of a drop reason value: its enum name without prefix."""
    name = drop_reasons().get(value)
    if name is not None:
        return name
    return _subsys_reason_name(value) if value >> SUBSYS_SHIFT else str(value)


@functools.cache
def _subsys_reason_name(value: int) -> str:
    """A subsystem's drop reason: the member of an `enum *_drop_reason` (other
    than skb_drop_reason) with this value, in vmlinux or a module's BTF; else
    SUBSYSTEM_code, the subsystem named by enum skb_drop_reason_subsys."""
    with vmlinux() as base:
        found = _drop_enum_member(base, value, 1)
        modules = glob.glob(os.path.join(os.path.dirname(BTF_VMLINUX), "*"))
        for path in sorted(m for m in modules if os.path.basename(m) != "vmlinux"):
            if found is not None:
                break
            mod = lib.btf__parse_split(path.encode(), base)
            if mod != ffi.NULL:
                try:
                    found = _drop_enum_member(mod, value, lib.btf__type_cnt(base))
                finally:
                    lib.btf__free(mod)
        subsys = enum_values(base, "skb_drop_reason_subsys").get(value >> SUBSYS_SHIFT)
    if found is not None:
        return found
    what = subsys.removeprefix(SUBSYS_PREFIX) if subsys else f"SUBSYS_{value >> SUBSYS_SHIFT}"
    return f"{what}_{value & ((1 << SUBSYS_SHIFT) - 1)}"


def _drop_enum_member(btf: Any, value: int, first: int) -> str | None:
    """The member with this value of an enum named *_drop_reason among btf's
    types from id `first` on (a module's own types follow vmlinux's)."""
    for tid in range(first, lib.btf__type_cnt(btf)):
        t = lib.btf__type_by_id(btf, tid)
        if _kind(t) != BTF_KIND_ENUM:
            continue
        name = _name(btf, t)
        if name.endswith("_drop_reason") and name != "skb_drop_reason":
            found = _members(btf, t).get(value)
            if found is not None:
                return found
    return None


def _strip_prefix(name: str) -> str:
    for p in DROP_REASON_PREFIXES:
        if name.startswith(p):
            return name[len(p) :]
    return name
