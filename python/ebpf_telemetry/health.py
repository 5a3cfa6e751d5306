"""Is the agent alive? Its textfile's age, for a liveness probe.

The agent rewrites the textfile every interval (atomically: a new file is
renamed over the old one), so the file's modification time is the time of the
last write. An agent that hangs, or that cannot write any more, leaves it
growing old; one that has not written yet leaves no file. `health` checks
the age against a bound (default: three intervals, as the
EbpfTelemetryStale alert) and reads nothing else: no BPF, no capabilities.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from ebpf_telemetry.binding import TelemetryError

STALE_INTERVALS = 3


@dataclass(frozen=True)
class Health:
    path: str
    age: float
    max_age: float


def check(textfile: str, max_age: float, now: float | None = None) -> Health:
    """The textfile's age; TelemetryError (one line) when missing or older than max_age."""
    try:
        mtime = os.stat(textfile).st_mtime
    except FileNotFoundError:
        raise TelemetryError(f"{textfile} does not exist: the agent has not written yet") from None
    except OSError as e:
        raise TelemetryError(f"{textfile}: {e.strerror}") from None
    age = (time.time() if now is None else now) - mtime
    if age > max_age:
        raise TelemetryError(
            f"{textfile} last written {age:.1f} s ago (more than {max_age:g} s): "
            "the agent is not writing"
        )
    return Health(textfile, age, max_age)


def default_max_age(interval_seconds: float) -> float:
    return STALE_INTERVALS * interval_seconds
