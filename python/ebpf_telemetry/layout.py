"""What our pinned maps must be: type, key and value sizes, and the value's
struct member for member as the map's own BTF describes it.

A map is only read after its kernel BTF says its value is the struct we
compiled against (name, size, every member's name and offset), so a stale
pin from another version, or a foreign map at our path, is a clear error
instead of garbage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ebpf_telemetry.binding import BpfError, TelemetryError, ffi, lib

# enum bpf_map_type values used here (uapi linux/bpf.h)
MAP_HASH, MAP_ARRAY, MAP_PERCPU_HASH, MAP_PERCPU_ARRAY, MAP_LPM_TRIE = 1, 2, 5, 6, 11
MAP_QUEUE, MAP_RINGBUF = 22, 27
BTF_KIND_INT, BTF_KIND_STRUCT, BTF_KIND_TYPEDEF = 1, 4, 8
BTF_KIND_VOLATILE, BTF_KIND_CONST, BTF_KIND_RESTRICT = 9, 10, 11
BPF_F_MMAPABLE = 1 << 10  # uapi linux/bpf.h: an array userspace can mmap


class LayoutError(TelemetryError):
    pass


@dataclass(frozen=True)
class MapSpec:
    name: str
    map_type: int
    key_size: int
    value: str | None  # cffi type of one value; structs are checked against BTF
    flags: int = 0  # map_flags the map must have


MAPS: dict[str, MapSpec] = {
    s.name: s
    for s in (
        MapSpec("rtt_hist_map", MAP_ARRAY, 4, "struct hist"),
        MapSpec("rtt_host_hist_map", MAP_PERCPU_ARRAY, 4, "struct hist"),
        MapSpec("node_metrics_map", MAP_ARRAY, 4, "struct node_metrics", BPF_F_MMAPABLE),
        MapSpec("host_metrics_map", MAP_PERCPU_ARRAY, 4, "struct node_metrics"),
        MapSpec("runqlat_hist_map", MAP_PERCPU_ARRAY, 4, "struct hist"),
        MapSpec("drop_reasons_map", MAP_PERCPU_ARRAY, 4, "__u64"),
        MapSpec("drop_subsys_map", MAP_PERCPU_HASH, 4, "__u64"),
        MapSpec("peer_cidr_map", MAP_LPM_TRIE, ffi.sizeof("struct peer_key"), "__u32"),
        MapSpec("peer_addr_map", MAP_HASH, ffi.sizeof("struct peer_key"), "__u32"),
        MapSpec("peer_info_map", MAP_ARRAY, 4, "struct peer_info", BPF_F_MMAPABLE),
        MapSpec("peer_free_map", MAP_QUEUE, 0, "__u32"),
        MapSpec("peer_seen_map", MAP_ARRAY, 4, "__u64", BPF_F_MMAPABLE),
        MapSpec("settings_map", MAP_ARRAY, 4, "struct settings"),
        MapSpec("events_lease_map", MAP_ARRAY, 4, "struct events_lease"),
        MapSpec("stats_map", MAP_PERCPU_ARRAY, 4, "__u64"),
        MapSpec("events", MAP_RINGBUF, 0, None),
    )
}


# sized by max_peers (+2: the host and `other`), indexed by peer id
NODE_MAPS = (
    "rtt_hist_map",
    "node_metrics_map",
    "peer_info_map",
    "peer_addr_map",
    "peer_seen_map",
    "peer_free_map",
)


def _kind(t: Any) -> int:
    return int((t.info >> 24) & 0x1F)


def _vlen(t: Any) -> int:
    return int(t.info & 0xFFFF)


def _strip(btf: Any, type_id: int) -> Any:
    t = lib.btf__type_by_id(btf, type_id)
    while t != ffi.NULL and _kind(t) in (
        BTF_KIND_TYPEDEF,
        BTF_KIND_VOLATILE,
        BTF_KIND_CONST,
        BTF_KIND_RESTRICT,
    ):
        t = lib.btf__type_by_id(btf, t.size)  # .size aliases .type for these kinds
    return t


def check_btf_layout(path: str, info: Any, ctype: str) -> None:
    """The map's BTF value type must be our struct, member for member."""
    if not ctype.startswith("struct "):
        return
    if info.btf_id == 0 or info.btf_value_type_id == 0:
        raise LayoutError(f"{path}: map carries no BTF; not an ebpf-telemetry map")
    btf = lib.btf__load_from_kernel_by_id(info.btf_id)
    if btf == ffi.NULL:
        raise BpfError(f"{path}: cannot load its BTF", ffi.errno)
    try:
        t = _strip(btf, info.btf_value_type_id)
        name = ffi.string(lib.btf__name_by_offset(btf, t.name_off)).decode()
        want = ctype.removeprefix("struct ")
        if _kind(t) != BTF_KIND_STRUCT or name != want:
            raise LayoutError(f"{path}: value is '{name}', expected 'struct {want}'")
        members = ffi.cast("struct btf_member *", t + 1)
        theirs = {
            ffi.string(lib.btf__name_by_offset(btf, members[i].name_off)).decode(): (
                members[i].offset & 0xFFFFFF
            )
            // 8
            for i in range(_vlen(t))
        }
        ours = {f: ffi.offsetof(ctype, f) for f in _struct_fields(ctype)}
        if t.size != ffi.sizeof(ctype) or theirs != ours:
            raise LayoutError(
                f"{path}: struct {want} layout differs from this version's "
                f"({t.size} vs {ffi.sizeof(ctype)} bytes); "
                "run `ebpf-telemetry unload` to replace the old pins"
            )
    finally:
        lib.btf__free(btf)


def _struct_fields(ctype: str) -> list[str]:
    return [name for name, _ in ffi.typeof(ctype).fields]
