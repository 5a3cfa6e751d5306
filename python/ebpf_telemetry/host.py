"""The host around the BPF object: bpffs and tracefs mounts, the pin dir,
privileges, CPUs.

What `run` checks and prepares before it touches the kernel, and what
`doctor` reports.
"""

from __future__ import annotations

import os

import structlog

from ebpf_telemetry import btf
from ebpf_telemetry.binding import BpfError, TelemetryError, ffi, lib

log = structlog.get_logger("host")

BPFFS_ROOT = "/sys/fs/bpf"
TRACEFS = "/sys/kernel/tracing"
BPF_FS_MAGIC = 0xCAFE4A11  # statfs(2) f_type of bpffs (linux/magic.h)


# -- filesystems -----------------------------------------------------------------


def mounted_fstype(path: str) -> str | None:
    """Filesystem type of the mount holding path (longest mount point)."""
    path = os.path.realpath(path)
    best, fstype = "", None
    with open("/proc/self/mounts") as f:
        for line in f:
            _, mnt, typ, *_ = line.split()
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, fstype = mnt, typ
    return fstype


def fs_magic(path: str) -> int:
    """statfs(2) f_type of the filesystem holding path (symlinks followed)."""
    out = ffi.new("unsigned long long *")
    err = lib.ebt_fs_type(path.encode(), out)
    if err < 0:
        raise BpfError(f"statfs {path}", err)
    return int(out[0])


def on_bpffs(path: str) -> bool:
    return fs_magic(path) == BPF_FS_MAGIC


def ensure_mount(target: str, fstype: str, options: str = "") -> None:
    if mounted_fstype(target) == fstype:
        return
    os.makedirs(target, exist_ok=True)
    if lib.mount(fstype.encode(), target.encode(), fstype.encode(), 0, options.encode()) != 0:
        raise BpfError(f"{fstype} is not mounted at {target} and mounting it failed", ffi.errno)
    log.info("mounted", fstype=fstype, target=target)


def ensure_bpffs(pin_dir: str) -> None:
    """bpffs mounted under pin_dir; creates nothing (make_pin_dir does, after checks)."""
    if mounted_fstype(os.path.dirname(pin_dir.rstrip("/")) or "/") != "bpf":
        ensure_mount(BPFFS_ROOT, "bpf", "mode=0700")
    if mounted_fstype(os.path.dirname(pin_dir.rstrip("/"))) != "bpf":
        raise TelemetryError(f"pin dir {pin_dir} is not on a BPF filesystem (mount -t bpf)")
    if os.path.lexists(pin_dir) and not os.path.isdir(pin_dir):
        raise TelemetryError(f"pin dir {pin_dir} exists and is not a directory")


def make_dir(path: str) -> bool:
    """A root-only (0700) directory; whether it was made now."""
    try:
        os.mkdir(path, mode=0o700)
    except FileExistsError:
        return False
    except OSError as e:
        raise TelemetryError(f"cannot create pin dir {path}: {e.strerror}") from None
    os.chmod(path, 0o700)
    return True


def make_pin_dir(pin_dir: str) -> None:
    """The pin dir and its links/ dir, root-only (0700) when we create them."""
    try:
        for d in (pin_dir, os.path.join(pin_dir, "links")):
            if not os.path.isdir(d):
                os.makedirs(d, mode=0o700, exist_ok=True)
                os.chmod(d, 0o700)
    except OSError as e:
        raise TelemetryError(f"cannot create pin dir {pin_dir}: {e.strerror}") from None


# -- privileges -----------------------------------------------------------------

# what `run` needs (docs/security.md): CAP_BPF (maps, programs), CAP_PERFMON
# (tracing programs, tracepoints), CAP_SYS_ADMIN (BTF of pinned maps by id for
# the layout check, mounting bpffs/tracefs)
REQUIRED_CAPS = {"CAP_BPF": 39, "CAP_PERFMON": 38, "CAP_SYS_ADMIN": 21}


def effective_caps() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def missing_caps() -> list[str]:
    caps = effective_caps()
    return [n for n, bit in REQUIRED_CAPS.items() if not caps >> bit & 1]


def require_caps() -> None:
    missing = missing_caps()
    if missing:
        raise TelemetryError(
            f"missing capabilities {', '.join(missing)}: run as root or grant "
            f"{' '.join(REQUIRED_CAPS)} (see docs/security.md)"
        )


def preflight() -> None:
    """What `run` checks before it touches anything: privileges, then BTF."""
    require_caps()
    btf.require_btf()
