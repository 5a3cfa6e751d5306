"""One pinned map: opened by path, checked (layout.py), read and written."""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from ebpf_telemetry.binding import BpfError, check, ffi, lib, num_cpus, obj_get
from ebpf_telemetry.layout import (
    MAP_PERCPU_ARRAY,
    MAP_PERCPU_HASH,
    MAPS,
    LayoutError,
    check_btf_layout,
)


class PinnedMap:
    """One pinned map, opened and checked against MAPS[name]."""

    def __init__(self, pin_dir: str, name: str) -> None:
        self.spec = MAPS[name]
        self.path = os.path.join(pin_dir, name)
        self.fd = obj_get(self.path)
        try:
            self.info = map_info(self.fd)
            self._check()
        except Exception:
            os.close(self.fd)
            raise
        self.ncpu = num_cpus() if self.percpu else 1
        self._mm: mmap.mmap | None = None

    @property
    def percpu(self) -> bool:
        return self.spec.map_type in (MAP_PERCPU_ARRAY, MAP_PERCPU_HASH)

    @property
    def max_entries(self) -> int:
        return int(self.info.max_entries)

    def _check(self) -> None:
        s, i = self.spec, self.info
        vsize = ffi.sizeof(s.value) if s.value else 0
        if i.type != s.map_type or i.key_size != s.key_size or (s.value and i.value_size != vsize):
            raise LayoutError(
                f"{self.path}: map type {i.type}, key {i.key_size} B, value {i.value_size} B; "
                f"expected type {s.map_type}, key {s.key_size} B, value {vsize} B "
                "(pins of another version? `ebpf-telemetry unload` replaces them)"
            )
        if i.map_flags & s.flags != s.flags:
            raise LayoutError(
                f"{self.path}: map flags {i.map_flags:#x}; expected {s.flags:#x} among them "
                "(pins of another version? `ebpf-telemetry unload` replaces them)"
            )
        if s.value:
            check_btf_layout(self.path, i, s.value)

    def mapped(self) -> npt.NDArray[np.uint8]:
        """An array map's values in place (BPF_F_MMAPABLE): bytes, max_entries
        values of value_size rounded up to 8, no copy, no syscall. Writable
        (a store is an update of the value, as the programs' are)."""
        size = self.max_entries * -(-int(self.info.value_size) // 8) * 8
        if self._mm is None:
            try:
                self._mm = mmap.mmap(self.fd, -(-size // mmap.PAGESIZE) * mmap.PAGESIZE)
            except OSError as e:
                raise BpfError(f"mmap of {self.path}", e.errno or 22) from None
        return np.frombuffer(self._mm, dtype=np.uint8, count=size)

    def close(self) -> None:
        if self._mm is not None:
            with contextlib.suppress(BufferError):  # a view still alive: unmapped when it goes
                self._mm.close()
            self._mm = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- element access ------------------------------------------------------
    def new_values(self, n: int) -> Any:
        assert self.spec.value
        return ffi.new(f"{self.spec.value}[]", n * self.ncpu)

    def lookup(self, key: Any) -> Any:
        """Value(s) for key: one cdata per CPU for per-CPU maps; None if absent."""
        vals = self.new_values(1)
        if lib.bpf_map_lookup_elem(self.fd, key, vals) < 0:
            if ffi.errno == 2:
                return None
            raise BpfError(f"lookup in {self.path}", ffi.errno)
        return vals

    def update(self, key: Any, value: Any, flags: int = 0) -> None:
        check(lib.bpf_map_update_elem(self.fd, key, value, flags), f"update of {self.path}")

    def delete(self, key: Any) -> None:
        if lib.bpf_map_delete_elem(self.fd, key) < 0 and ffi.errno != 2:
            raise BpfError(f"delete in {self.path}", ffi.errno)

    def push(self, value: int) -> None:
        """Queue maps: add a value at the tail."""
        check(
            lib.bpf_map_update_elem(self.fd, ffi.NULL, ffi.new("__u32 *", value), 0),
            f"push to {self.path}",
        )

    def drain(self) -> list[int]:
        """Queue maps: take every value out, head first."""
        out, v = [], ffi.new("__u32 *")
        while lib.bpf_map_lookup_and_delete_elem(self.fd, ffi.NULL, v) == 0:
            out.append(int(v[0]))
        return out

    def keys(self, ktype: str) -> Iterator[Any]:
        """Every key, each a `ktype *` owning its memory."""
        prev, nxt = ffi.NULL, ffi.new(f"{ktype} *")
        while lib.bpf_map_get_next_key(self.fd, prev, nxt) == 0:
            yield nxt
            prev, nxt = nxt, ffi.new(f"{ktype} *")

    def array_rows(self, count: int | None = None) -> tuple[int, Any]:
        """Every element of an array map, one batch call: (n, values[n*ncpu])."""
        n = count or self.max_entries
        keys = ffi.new("__u32[]", n)
        vals = self.new_values(n)
        cnt = ffi.new("__u32 *", n)
        batch = ffi.new("__u32 *")
        opts = ffi.new(
            "struct bpf_map_batch_opts *", {"sz": ffi.sizeof("struct bpf_map_batch_opts")}
        )
        ret = lib.bpf_map_lookup_batch(self.fd, ffi.NULL, batch, keys, vals, cnt, opts)
        if ret < 0 and ffi.errno == ENOTSUPP:
            return self._array_rows_one_by_one(n, vals)
        if ret < 0 and ffi.errno != 2:  # ENOENT: reached the end, cnt is valid
            raise BpfError(f"batch lookup in {self.path}", ffi.errno)
        return int(cnt[0]), vals

    def _array_rows_one_by_one(self, n: int, vals: Any) -> tuple[int, Any]:
        """Before 5.13 per-CPU arrays have no batch look-up (ENOTSUPP): a
        look-up per element (the rows are then not all of one instant)."""
        key = ffi.new("__u32 *")
        for i in range(n):
            key[0] = i
            if lib.bpf_map_lookup_elem(self.fd, key, vals + i * self.ncpu) < 0:
                raise BpfError(f"lookup of {i} in {self.path}", ffi.errno)
        return n, vals

    def hash_rows(self, ktype: str) -> tuple[int, Any, Any]:
        """Every element of a hash map, one batch call (5.6): (n, keys, values)."""
        n = self.max_entries
        keys, vals = ffi.new(f"{ktype}[]", n), self.new_values(n)
        cnt, batch = ffi.new("__u32 *", n), ffi.new("__u32 *")
        opts = ffi.new(
            "struct bpf_map_batch_opts *", {"sz": ffi.sizeof("struct bpf_map_batch_opts")}
        )
        ret = lib.bpf_map_lookup_batch(self.fd, ffi.NULL, batch, keys, vals, cnt, opts)
        if ret < 0 and ffi.errno != 2:  # ENOENT: reached the end, cnt is valid
            raise BpfError(f"batch lookup in {self.path}", ffi.errno)
        return int(cnt[0]), keys, vals


ENOTSUPP = 524  # the kernel's own, not ENOTSUP: an operation the map type lacks


def map_info(fd: int) -> Any:
    info = ffi.new("struct bpf_map_info *")
    ln = ffi.new("__u32 *", ffi.sizeof("struct bpf_map_info"))
    check(lib.bpf_obj_get_info_by_fd(fd, info, ln), "map info")
    return info
