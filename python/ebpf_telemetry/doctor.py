"""`doctor`: can `run` work on this machine? Each check says what to fix.

The collectors' lines come from the loader's own plan (plan.py over this
kernel's facts) and, with the privileges to do so, from a trial load of each
planned collector (nothing pinned, nothing attached): what `doctor` calls
runnable, the verifier has accepted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from ebpf_telemetry import btf, exporter, facts, host, loader, pincheck, plan
from ebpf_telemetry.binding import TelemetryError
from ebpf_telemetry.config import Config


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


def system_checks(kernel: facts.KernelFacts) -> Iterator[Check]:
    yield Check(
        "kernel",
        True,
        f"{kernel.release} (documented minimum {plan.MIN_KERNEL}; the collectors below decide)",
    )
    missing = host.missing_caps()
    yield Check(
        "capabilities",
        not missing,
        "missing " + ", ".join(missing) if missing else " ".join(host.REQUIRED_CAPS),
        "run as root or grant them (see docs/security.md)",
    )
    yield Check("btf", kernel.btf, btf.btf_path(), "kernel needs CONFIG_DEBUG_INFO_BTF=y")
    fs = host.mounted_fstype(host.BPFFS_ROOT)
    yield Check(
        "bpffs",
        fs == "bpf",
        f"{host.BPFFS_ROOT} is {fs or 'not mounted'}",
        "`mount -t bpf bpf /sys/fs/bpf` (run mounts it itself as root)",
        fatal=False,
    )
    fs = host.mounted_fstype(host.TRACEFS)
    yield Check(
        "tracefs",
        fs == "tracefs",
        f"{host.TRACEFS} is {fs or 'not mounted'}",
        "`mount -t tracefs tracefs /sys/kernel/tracing` (only trace_pipe debug output needs it)",
        fatal=False,
    )
    obj = loader.object_path()
    yield Check("bpf object", os.path.exists(obj), obj, "reinstall the package (make build)")


@dataclass(frozen=True)
class Verdict:
    """One collector as `run` would start it."""

    choice: plan.Choice
    rejected: str | None  # the verifier's verdict on a trial load
    tried: bool  # a trial load ran (privileges and the object were there)

    @property
    def variant(self) -> str | None:
        v = self.choice.variant
        return v.name if v is not None and self.rejected is None else None

    @property
    def why(self) -> str:
        return self.rejected or self.choice.why

    def check(self) -> Check:
        c, name = self.choice, f"collector {self.choice.name}"
        tps = ", ".join(c.collector.tracepoints)
        if self.variant is None:
            return Check(name, False, f"{tps}: skipped: {self.why}", fatal=False)
        how = "loads" if self.tried else "planned (not loaded: no privileges)"
        lost = f"; loses {c.why}" if c.why else ""
        return Check(name, True, f"{tps} via {self.variant}, {how}{lost}")


def verdicts(kernel: facts.KernelFacts, can_load: bool) -> list[Verdict]:
    out = []
    for ch in plan.plan(kernel):
        tried = can_load and ch.variant is not None
        taken, rejected = loader.trial(ch) if tried else (ch, None)
        out.append(Verdict(taken, rejected, tried))
    return out


def setup_checks(cfg: Config, config_check: Check) -> Iterator[Check]:
    """What `run` with this config meets besides the kernel: its config, the
    textfile's directory, and the pins already in its pin dir."""
    yield config_check
    try:
        exporter.check_writable(cfg.textfile)
        yield Check("textfile", True, f"{cfg.textfile} can be written")
    except TelemetryError as e:
        yield Check("textfile", False, str(e), "create the directory node_exporter reads")
    yield pins_check(cfg)


def pins_check(cfg: Config) -> Check:
    """What `run` will do with what is pinned in the pin dir."""
    where = cfg.pin_dir
    if not os.path.isdir(where):
        return Check("pins", True, f"none at {where}: run creates them")
    try:
        found = pincheck.survey(where)
    except (PermissionError, TelemetryError) as e:
        return Check("pins", False, f"{where}: cannot read: {e}", "run as root", fatal=False)
    if not found.present:
        return Check("pins", True, f"none at {where}: run creates them")
    if found.other_layout and cfg.strict_pins:
        names = ", ".join(found.other_layout)
        return Check(
            "pins", False, f"{where}: maps of another layout: {names}; run refuses them "
            "(strict_pins = true)", "`ebpf-telemetry unload` (their counters restart)",
        )  # fmt: skip
    if found.other_layout:
        names = ", ".join(found.to_replace())
        return Check(
            "pins", False, f"{where}: maps of another layout: run replaces {names} "
            "(their counters restart; the other maps keep theirs)",
            "nothing to do; strict_pins = true refuses them instead", fatal=False,
        )  # fmt: skip
    if found.resized(cfg.max_peers):
        return Check("pins", False, loader.resized_message(found.pinned_peers or 0, cfg.max_peers))
    return Check(
        "pins", True, f"{where}: {len(found.present)} maps of this layout: run reuses them "
        "(counters continue)",
    )  # fmt: skip


def run(cfg: Config, config_check: Check, as_json: bool = False) -> int:
    kernel = facts.current()
    checks = [*system_checks(kernel), *setup_checks(cfg, config_check)]
    can_load = all(c.ok for c in checks if c.fatal and c.name in LOAD_NEEDS)
    found = verdicts(kernel, can_load)
    checks += [v.check() for v in found]
    if not any(v.variant for v in found):
        checks.append(Check("collectors", False, "none can run on this kernel"))
    bad = [c for c in checks if not c.ok and c.fatal]
    if as_json:
        print(json.dumps(_as_dict(kernel, checks, found, bad), indent=1))
    else:
        for c in checks:
            print(c.line())
        print("run can work here" if not bad else f"run cannot work here: {len(bad)} problem(s)")
    return 1 if bad else 0


# a trial load needs these; the others (config, textfile, pins) do not stop it
LOAD_NEEDS = ("capabilities", "btf", "bpf object")


def _as_dict(
    kernel: facts.KernelFacts, checks: list[Check], found: list[Verdict], bad: list[Check]
) -> dict[str, object]:
    return {
        "kernel": kernel.release,
        "checks": [asdict(c) for c in checks],
        "collectors": {
            v.choice.name: {"variant": v.variant, "why": v.why, "loaded": v.tried} for v in found
        },
        "warnings": [c.line() for c in checks if not c.ok and not c.fatal],
        "problems": [c.line() for c in bad],
        "ok": not bad,
    }
