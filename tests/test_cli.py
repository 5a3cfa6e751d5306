"""The command line as an operator meets it on day one: usage errors, flags,
help, the empty config, `inspect --json`, `doctor --json`."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from agentlab import cli
from ebpf_telemetry import cli as cli_mod
from ebpf_telemetry import report
from ebpf_telemetry.config import DEFAULT_TEXTFILE
from ebpf_telemetry.histogram import MAX_SLOTS, SUB, le_seconds, slot_lower, value_to_slot
from ebpf_telemetry.maps import DEFAULT_PIN_DIR
from ebpf_telemetry.values import Hist

PROG = "ebpf-telemetry"
EVERY_EDGE = json.loads((Path(__file__).parent / "data" / "le_edges.json").read_text())[
    "every kernel edge (rtt_buckets=all, any range)"
]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["run", "--bogus"], "unrecognized arguments: --bogus"),
        (["run", "--interval", "0"], "argument --interval: must be > 0"),
        (["inspect", "--node", "x"], "argument --node: invalid int value: 'x'"),
        (["events", "--type", "nope"], "argument --type: invalid choice: 'nope'"),
    ],
)
def test_usage_errors_are_one_line(args: list[str], message: str) -> None:
    r = cli(*args)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2, r
    assert len(lines) == 1 and lines[0].startswith(f"{PROG}: error: "), r.stderr
    assert message in lines[0] and "--help" in lines[0], lines
    assert r.stdout == ""


def test_global_flags_after_the_subcommand() -> None:
    p = cli_mod.parser()
    assert p.parse_args(["run", "-v"]).verbose is True
    assert p.parse_args(["-v", "run"]).verbose is True
    assert p.parse_args(["run"]).verbose is False
    assert p.parse_args(["unload", "--verbose"]).verbose is True
    r = cli("unload", "-v", "--pin-dir", "/sys/fs/bpf/ebt-cli-never-made")
    assert r.returncode == 0 and "nothing to unload" in r.stdout, r


def test_help_shows_the_defaults() -> None:
    text = " ".join(cli("run", "--help").stdout.split())  # argparse wraps lines
    assert "(default: 5)" in text and ">= 1" in text
    assert DEFAULT_TEXTFILE in text and DEFAULT_PIN_DIR in text
    for command in ("inspect", "events", "unload", "doctor"):
        assert DEFAULT_PIN_DIR in " ".join(cli(command, "--help").stdout.split()), command


def test_inspect_json_histograms_are_keyed_by_bounds_in_seconds() -> None:
    """Each bucket under its upper bound (exclusive) as the canonical `le`
    string; the counts are the bucket's own."""
    slots = [0] * MAX_SLOTS
    for us, n in ((3, 2), (60, 5), (61, 1), (1000, 7), (2**40, 1)):
        slots[value_to_slot(us)] += n
    got = report.hist_json(Hist(slots))
    assert got == {"4e-06": 2, "6.4e-05": 6, "0.001024": 7, "+Inf": 1}
    assert le_seconds(slot_lower(value_to_slot(60) + 1)) == "6.4e-05"
    assert SUB == 8  # the bounds above are those of log2x8


def test_empty_config_is_reported(pin_dir: str, tmp_path: Path) -> None:
    empty = tmp_path / "empty.toml"
    empty.write_text("# nothing set\n")
    r = cli("run", "--once", "--config", str(empty), "--pin-dir", pin_dir,
            "--textfile", str(tmp_path / "t.prom"), "--interval", "1")  # fmt: skip
    assert r.returncode == 0, r.stderr
    records = [json.loads(x) for x in r.stderr.splitlines() if x.startswith("{")]
    warned = [x for x in records if x["level"] == "warning" and x.get("config") == str(empty)]
    assert [x["msg"] for x in warned] == ["config file holds no settings; running on the defaults"]


def doctor_json(*args: str) -> tuple[int, dict[str, object]]:
    r = cli("doctor", "--json", *args)
    assert "Traceback" not in r.stderr, r.stderr
    return r.returncode, json.loads(r.stdout)


def checks_of(d: dict[str, object]) -> dict[str, dict[str, object]]:
    checks = d["checks"]
    assert isinstance(checks, list)
    return {c["name"]: c for c in checks}


def test_doctor_json_carries_every_check(pin_dir: str, tmp_path: Path) -> None:
    from conftest import require_kernel

    require_kernel()
    tf = tmp_path / "t.prom"
    rc, d = doctor_json("--pin-dir", pin_dir, "--textfile", str(tf))
    checks = checks_of(d)
    assert rc == 0 and d["ok"] is True, d
    want = {"kernel", "capabilities", "btf", "bpffs", "tracefs", "bpf object", "config",
            "textfile", "pins", "collector rtt", "collector retrans", "collector drops",
            "collector sched"}  # fmt: skip
    assert want <= set(checks), sorted(checks)
    assert "none at" in str(checks["pins"]["detail"])
    assert d["warnings"] == [] and d["problems"] == []

    # a missing textfile directory: a problem, exit 1 (run would refuse)
    rc, d = doctor_json("--pin-dir", pin_dir, "--textfile", str(tmp_path / "nodir" / "t.prom"))
    assert rc == 1 and d["ok"] is False
    assert checks_of(d)["textfile"]["ok"] is False
    assert any("textfile" in str(p) and "does not exist" in str(p) for p in d["problems"]), d

    # pins of this build: reused
    r = cli("run", "--once", "--pin-dir", pin_dir, "--textfile", str(tf), "--interval", "1")
    assert r.returncode == 0, r.stderr
    rc, d = doctor_json("--pin-dir", pin_dir, "--textfile", str(tf))
    pins = checks_of(d)["pins"]
    assert rc == 0 and pins["ok"] is True and "run reuses them" in str(pins["detail"]), pins

    # inspect --json on the same pins: bounds, never slot numbers
    r = cli("inspect", "--json", "--pin-dir", pin_dir)
    assert r.returncode == 0, r.stderr
    snap = json.loads(r.stdout)
    keys = set(snap["runqlat_hist_seconds"])
    for node in snap["nodes"]:
        keys |= set(node["rtt_hist_seconds"])
    assert keys and keys <= {*EVERY_EDGE, "+Inf"}, keys


def test_doctor_reports_pins_of_another_layout(pin_dir: str, tmp_path: Path) -> None:
    from conftest import require_kernel

    require_kernel()
    os.makedirs(pin_dir, mode=0o700)
    subprocess.run(["bpftool", "map", "create", f"{pin_dir}/rtt_hist_map", "type", "array",
                    "key", "4", "value", "8", "entries", "4", "name", "rtt_hist_map"],
                   check=True)  # fmt: skip
    tf = str(tmp_path / "t.prom")
    rc, d = doctor_json("--pin-dir", pin_dir, "--textfile", tf)
    pins = checks_of(d)["pins"]
    assert rc == 0 and pins["ok"] is False and pins["fatal"] is False, pins
    assert "run replaces rtt_hist_map" in str(pins["detail"])  # alone: the only one pinned
    assert any(str(w).startswith("warn pins:") for w in d["warnings"]), d["warnings"]
    strict = tmp_path / "strict.toml"
    strict.write_text("strict_pins = true\n")
    rc, d = doctor_json("--config", str(strict), "--pin-dir", pin_dir, "--textfile", tf)
    pins = checks_of(d)["pins"]
    assert rc == 1 and pins["fatal"] is True and "run refuses them" in str(pins["detail"])
    assert any(str(p).startswith("FAIL pins:") for p in d["problems"]), d["problems"]
