"""`doctor`: can `run` work on this machine? Each check says what to fix."""

from __future__ import annotations

import os
import platform
from collections.abc import Iterator
from dataclasses import dataclass

from ebpf_telemetry import btf, loader


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    fatal: bool = True

    def line(self) -> str:
        mark = "ok  " if self.ok else ("FAIL" if self.fatal else "warn")
        fix = f"  -> {self.fix}" if not self.ok and self.fix else ""
        return f"{mark} {self.name}: {self.detail}{fix}"


def checks() -> Iterator[Check]:
    rel = platform.release()
    major, minor = (int(x) for x in rel.split(".")[:2])
    yield Check("kernel", (major, minor) >= (5, 15), rel, "needs Linux >= 5.15")
    caps = loader.effective_caps()
    missing = [n for n, bit in loader.REQUIRED_CAPS.items() if not caps >> bit & 1]
    yield Check(
        "capabilities",
        not missing,
        "missing " + ", ".join(missing) if missing else "CAP_BPF CAP_PERFMON CAP_SYS_ADMIN",
        "run as root or grant them (see docs/deploy.md)",
    )
    btf_file = btf.btf_path()
    yield Check("btf", os.path.exists(btf_file), btf_file, "kernel needs CONFIG_DEBUG_INFO_BTF=y")
    fs = loader.mounted_fstype(loader.BPFFS_ROOT)
    yield Check(
        "bpffs",
        fs == "bpf",
        f"{loader.BPFFS_ROOT} is {fs or 'not mounted'}",
        "`mount -t bpf bpf /sys/fs/bpf` (run mounts it itself as root)",
        fatal=False,
    )
    fs = loader.mounted_fstype(loader.TRACEFS)
    yield Check(
        "tracefs",
        fs == "tracefs",
        f"{loader.TRACEFS} is {fs or 'not mounted'}",
        "`mount -t tracefs tracefs /sys/kernel/tracing` (needed for classic "
        "tracepoints and trace_pipe; run mounts it when it needs it)",
        fatal=False,
    )
    obj = loader.object_path()
    yield Check("bpf object", os.path.exists(obj), obj, "reinstall the package (make build)")
    plan = loader.plan() if os.path.exists(btf_file) else {}
    for c in loader.COLLECTORS:
        how = plan.get(c.name)
        tps = ", ".join(h.tracepoint for h in c.hooks)
        yield Check(
            f"collector {c.name}",
            how is not None,
            f"{tps} via {how}" if how else f"{tps}: not all found",
            "this collector will be skipped",
            fatal=False,
        )


def run() -> int:
    results = list(checks())
    for c in results:
        print(c.line())
    bad = [c for c in results if not c.ok and c.fatal]
    print("run can work here" if not bad else f"run cannot work here: {len(bad)} problem(s)")
    return 1 if bad else 0
