"""Hand the registry to Prometheus: an atomic textfile, and optionally /metrics.

The textfile is written to a temporary file in the same directory (a name
node_exporter ignores), made 0644 and renamed over the old one: a reader sees
the old file or the new one, never half of either; a full disk leaves the old
file as it was. Not fsynced (as prometheus_client's write_to_textfile): the
file is rewritten every interval from counters that a crash loses anyway, and
two fsyncs per interval would cost every node two journal commits (about
10 ms here) for nothing a reader can see. After a power loss the file is the
last one the disk kept, or empty (no samples) on a filesystem that did not
flush it, until the agent's first cycle.
"""

from __future__ import annotations

import contextlib
import os
import stat
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest, start_http_server

from ebpf_telemetry.binding import TelemetryError


class TextfileError(TelemetryError):
    pass


def check_textfile_path(path: str) -> None:
    """Refuse a path that is a directory or a symlink (never followed)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise TextfileError(f"textfile {path} is a symlink; refusing to follow it")
    if not stat.S_ISREG(st.st_mode):
        raise TextfileError(f"textfile {path} exists and is not a regular file")


def preflight(path: str) -> None:
    """Fail at start, not at the first interval, on a textfile we cannot
    write; remove the temporary files a killed agent left."""
    check_writable(path)
    remove_stale_temps(path)


def check_writable(path: str) -> None:
    """Can the textfile be written (atomically, beside itself)? (`doctor` too)

    The directory is never created: it is node_exporter's
    --collector.textfile.directory, and a mistyped path that "works" would
    write a file nobody reads."""
    check_textfile_path(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.exists(directory):
        raise TextfileError(
            f"textfile directory {directory} does not exist (node_exporter's "
            "--collector.textfile.directory; it is not created)"
        )
    if not os.path.isdir(directory):
        raise TextfileError(f"textfile directory {directory} is not a directory")
    if os.statvfs(directory).f_flag & os.ST_RDONLY:
        raise TextfileError(f"textfile directory {directory} is on a read-only filesystem")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise TextfileError(f"textfile directory {directory} is not writable")


def _temp_name(path: str, pid: int) -> str:
    return os.path.join(
        os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.{pid}.tmp"
    )


def remove_stale_temps(path: str) -> list[str]:
    """Temporary files left by an agent killed mid-write (its pid gone)."""
    directory, base = os.path.split(os.path.abspath(path))
    prefix = f".{base}."
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        pid = name.removeprefix(prefix).removesuffix(".tmp")
        if not (name.startswith(prefix) and name.endswith(".tmp") and pid.isdecimal()):
            continue
        if int(pid) != os.getpid() and not os.path.exists(f"/proc/{pid}"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(directory, name))  # unlink never follows a symlink
                removed.append(name)
    return removed


def write_textfile(path: str, registry: CollectorRegistry) -> int:
    """Write the exposition of registry to path atomically; bytes written."""
    data = generate_latest(registry)
    write_atomic(path, data)
    return len(data)


def write_atomic(path: str, data: bytes) -> None:
    """data to path as a whole or not at all: a temporary file beside it,
    renamed over it; mode 0644 (no fsync: see the module's docstring)."""
    check_textfile_path(path)
    tmp = _temp_name(path, os.getpid())
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        try:
            os.fchmod(fd, 0o644)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise TextfileError(f"cannot write textfile {path}: {e.strerror}") from None


def serve(registry: CollectorRegistry, host: str, port: int) -> Any:
    """Serve /metrics from registry on host:port (a daemon thread)."""
    try:
        return start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        raise TelemetryError(f"cannot listen on {host}:{port}: {e.strerror}") from None
