"""What the kernel says of our attached programs, found through their pinned
links: name (ours are at most 15 characters, so the kernel shows them whole),
tag (a hash of the instructions), runs the kernel skipped.

`recursion_misses` (5.12; for tp_btf programs counted from 6.1, backported to
stable) counts runs of a program the kernel did not make because the same
program was already running on that CPU (e.g. a tracepoint hit from a softirq
that interrupted the program): events we did not count.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ebpf_telemetry.binding import BpfError, check, ffi, lib, obj_get


@dataclass(frozen=True)
class Program:
    name: str
    tag: bytes
    recursion_misses: int


def _info(fd: int, ctype: str) -> Any:
    info = ffi.new(f"{ctype} *")
    size = ffi.new("__u32 *", ffi.sizeof(ctype))
    check(lib.bpf_obj_get_info_by_fd(fd, info, size), f"{ctype} of fd {fd}")
    return info


def behind_link(path: str) -> Program:
    """The program a pinned link runs."""
    fd = obj_get(path)
    try:
        link = _info(fd, "struct bpf_link_info")
    finally:
        os.close(fd)
    prog_fd = lib.bpf_prog_get_fd_by_id(link.prog_id)
    if prog_fd < 0:
        raise BpfError(f"program {link.prog_id} of {path}", prog_fd)
    try:
        return of_fd(prog_fd)
    finally:
        os.close(prog_fd)


def of_fd(fd: int) -> Program:
    info = _info(fd, "struct bpf_prog_info")
    return Program(
        ffi.string(info.name).decode(),
        bytes(ffi.buffer(info.tag, 8)),
        int(info.recursion_misses),
    )


def linked(pin_dir: str) -> dict[str, Program]:
    """tracepoint -> the program its pinned link runs, for every link pinned."""
    links = os.path.join(pin_dir, "links")
    if not os.path.isdir(links):
        return {}
    out = {}
    for tp in sorted(os.listdir(links)):
        try:
            out[tp] = behind_link(os.path.join(links, tp))
        except BpfError:
            continue  # unpinned meanwhile (unload, upgrade)
    return out
