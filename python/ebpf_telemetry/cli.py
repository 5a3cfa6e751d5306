"""The command line: run, inspect, events, unload, doctor, health.

Every expected failure is one line on stderr and exit status 1 (2 for usage);
never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from ebpf_telemetry import __version__
from ebpf_telemetry.binding import TelemetryError
from ebpf_telemetry.maps import DEFAULT_PIN_DIR, Pins
from ebpf_telemetry.values import EVENT_TYPES

PROG = "ebpf-telemetry"


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not v > 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return v


class Parser(argparse.ArgumentParser):
    """A usage error is one line on stderr and exit status 2 (argparse prints
    the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message} (`{self.prog} --help` for usage)\n")


def _common() -> Parser:
    """The global flags, accepted after the subcommand too (`run -v`)."""
    c = Parser(add_help=False)
    c.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
        help="debug logs (libbpf's too)",
    )  # fmt: skip
    return c


def parser() -> argparse.ArgumentParser:
    from ebpf_telemetry.config import DEFAULT_CONFIG, DEFAULT_TEXTFILE, MIN_INTERVAL, Config

    d = Config(node_name="")
    p = Parser(prog=PROG, description="eBPF node telemetry for Prometheus")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logs (libbpf's too)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)
    common = [_common()]

    run = sub.add_parser(
        "run", parents=common, help="load/attach (or reuse pins), write metrics every interval",
        description="Flags override the config file; each default is the config's.",
    )  # fmt: skip
    run.add_argument("--config", help=f"TOML config file (default: {DEFAULT_CONFIG} if it exists)")
    run.add_argument("--node-name", help="the `node` label (default: the hostname)")
    run.add_argument(
        "--interval", type=_positive_float,
        help=f"seconds between writes, >= {MIN_INTERVAL:g} (default: {d.interval_seconds:g})",
    )  # fmt: skip
    run.add_argument(
        "--textfile", help=f"the .prom file for node_exporter (default: {DEFAULT_TEXTFILE})"
    )
    run.add_argument("--listen", help="also serve /metrics on HOST:PORT (default: off)")
    run.add_argument("--pin-dir", help=f"(default: {DEFAULT_PIN_DIR})")
    run.add_argument("--once", action="store_true", help="one interval, one write, exit")

    ins = sub.add_parser(
        "inspect", parents=common, help="print the pinned maps (no load, no attach)"
    )
    ins.add_argument("--pin-dir", default=DEFAULT_PIN_DIR, help=f"(default: {DEFAULT_PIN_DIR})")
    ins.add_argument("--json", action="store_true", help="one JSON object")
    ins.add_argument("--node", type=int, help="one node id only (default: every node)")

    ev = sub.add_parser("events", parents=common, help="stream sampled events as JSON lines")
    ev.add_argument("--pin-dir", default=DEFAULT_PIN_DIR, help=f"(default: {DEFAULT_PIN_DIR})")
    ev.add_argument(
        "--type", choices=sorted(EVENT_TYPES.values()), help="one type only (default: all)"
    )
    ev.add_argument("--count", type=int, help="stop after N events (default: never)")

    un = sub.add_parser("unload", parents=common, help="detach everything and remove the pins")
    un.add_argument("--pin-dir", default=DEFAULT_PIN_DIR, help=f"(default: {DEFAULT_PIN_DIR})")
    un.add_argument("--force", action="store_true", help="even while an agent runs on them")

    doc = sub.add_parser(
        "doctor", parents=common, help="check that this machine can run the agent",
        description="Checks what `run` with the same config and flags would meet.",
    )  # fmt: skip
    doc.add_argument("--config", help=f"TOML config file (default: {DEFAULT_CONFIG} if it exists)")
    doc.add_argument("--textfile", help=f"(default: {DEFAULT_TEXTFILE})")
    doc.add_argument("--pin-dir", help=f"(default: {DEFAULT_PIN_DIR})")
    doc.add_argument("--json", action="store_true", help="every check as one JSON object")

    hl = sub.add_parser(
        "health", parents=common, help="exit 0 if the agent wrote its textfile recently",
        description="A liveness check: the textfile's age (no BPF, no capabilities needed).",
    )  # fmt: skip
    hl.add_argument("--config", help=f"TOML config file (default: {DEFAULT_CONFIG} if it exists)")
    hl.add_argument("--textfile", help=f"(default: the config's, else {DEFAULT_TEXTFILE})")
    hl.add_argument(
        "--max-age", type=_positive_float,
        help="seconds (default: 3 x the config's interval_seconds)",
    )  # fmt: skip
    return p


def cmd_run(a: argparse.Namespace) -> int:
    from ebpf_telemetry import config
    from ebpf_telemetry.agent import Agent

    overrides: dict[str, Any] = {
        "node_name": a.node_name,
        "interval_seconds": a.interval,
        "textfile": a.textfile,
        "listen": a.listen,
        "pin_dir": a.pin_dir,
    }
    path = a.config
    if path is None and os.path.exists(config.DEFAULT_CONFIG):
        path = config.DEFAULT_CONFIG
    cfg = config.load(path, overrides)
    return Agent(cfg, path, overrides).run(once=a.once)


def _require_pins(pin_dir: str) -> Pins:
    pins = Pins(pin_dir)
    if not pins.exists():
        raise TelemetryError(f"nothing pinned at {pin_dir}: is `{PROG} run` running or run once?")
    return pins


def cmd_inspect(a: argparse.Namespace) -> int:
    from ebpf_telemetry import report
    from ebpf_telemetry.snapshot import take

    with _require_pins(a.pin_dir) as pins:
        snap = take(pins)
    if a.node is not None and a.node not in snap.hists:
        raise TelemetryError(f"no node {a.node} (ids 0..{max(snap.hists)})")
    print(report.as_json(snap, a.node) if a.json else report.as_text(snap, a.node))
    return 0


def cmd_events(a: argparse.Namespace) -> int:
    from ebpf_telemetry.events import stream_json

    if a.count is not None and a.count <= 0:
        raise TelemetryError("--count must be > 0")
    _require_pins(a.pin_dir).close()
    with contextlib.suppress(KeyboardInterrupt):
        stream_json(a.pin_dir, sys.stdout.buffer, a.type, a.count)
    return 0


def cmd_unload(a: argparse.Namespace) -> int:
    from ebpf_telemetry import loader

    removed = loader.unload(a.pin_dir, force=a.force)
    if removed:
        print(f"removed {len(removed)} pins from {a.pin_dir}")
    else:
        print(f"nothing to unload at {a.pin_dir}")
    return 0


def cmd_doctor(a: argparse.Namespace) -> int:
    from ebpf_telemetry import config, doctor

    overrides = {"textfile": a.textfile, "pin_dir": a.pin_dir}
    path = a.config
    if path is None and os.path.exists(config.DEFAULT_CONFIG):
        path = config.DEFAULT_CONFIG
    try:
        cfg = config.load(path, overrides)
        check = doctor.Check("config", True, path or "none: the defaults")
    except config.ConfigError as e:
        cfg = config.load(None, overrides)
        check = doctor.Check("config", False, str(e))
    return doctor.run(cfg, check, as_json=a.json)


def cmd_health(a: argparse.Namespace) -> int:
    from ebpf_telemetry import config, health

    path = a.config
    if path is None and os.path.exists(config.DEFAULT_CONFIG):
        path = config.DEFAULT_CONFIG
    cfg = config.load(path, {"textfile": a.textfile})
    max_age = a.max_age or health.default_max_age(cfg.interval_seconds)
    h = health.check(cfg.textfile, max_age)
    print(f"ok: {h.path} written {h.age:.1f} s ago (at most {h.max_age:g} s)")
    return 0


COMMANDS = {
    "run": cmd_run,
    "inspect": cmd_inspect,
    "events": cmd_events,
    "unload": cmd_unload,
    "doctor": cmd_doctor,
    "health": cmd_health,
}


def main(argv: Sequence[str] | None = None) -> int:
    a = parser().parse_args(argv)
    from ebpf_telemetry import log

    log.setup(a.verbose)
    try:
        return COMMANDS[a.command](a)
    except TelemetryError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except PermissionError as e:
        print(
            f"{PROG}: error: {e.filename or ''}: permission denied (run as root)", file=sys.stderr
        )
        return 1
    except BrokenPipeError:
        return 0
    except Exception as e:  # a bug: still one line, the traceback with -v
        if a.verbose:
            raise
        print(f"{PROG}: internal error: {type(e).__name__}: {e} (-v shows where)", file=sys.stderr)
        return 70


if __name__ == "__main__":
    sys.exit(main())
