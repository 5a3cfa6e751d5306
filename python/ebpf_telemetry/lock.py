"""One agent per pin dir, one `events` consumer at a time.

bpffs holds no regular files, so the locks are flock(2) on directories of
the pin dir: the pin dir itself for `run` (and for `unload`, which refuses
while an agent holds it), its `events-consumer/` directory for `events`.
The kernel drops a lock when its holder dies, however it dies; who holds it
is read from /proc/locks, by the directory's device and inode.
"""

from __future__ import annotations

import fcntl
import os

from ebpf_telemetry.binding import TelemetryError

EVENTS_DIR = "events-consumer"  # under the pin dir; unload removes it


class Busy(TelemetryError):
    pass


def holder(fd: int) -> int | None:
    """The pid holding a flock on fd's inode (as /proc/locks shows it), if any."""
    st = os.fstat(fd)
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 5 and parts[1] == "FLOCK" and parts[5] == ident:
                    return int(parts[4])
    except (OSError, ValueError):
        return None
    return None


def take(path: str, who: str) -> int:
    """An exclusive lock on the directory path, held until its fd is closed
    (or the process ends); Busy, naming the holder's pid, if another has it."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = holder(fd)
        os.close(fd)
        by = f"pid {pid}" if pid else "another process"
        raise Busy(f"{who} runs on {path} already ({by})") from None
    return fd


def events_dir(pin_dir: str) -> str:
    d = os.path.join(pin_dir, EVENTS_DIR)
    os.makedirs(d, mode=0o700, exist_ok=True)
    return d
