"""What the benchmark attaches: our object (pinned, as the agent does it),
the empty floor object, and the comparison tools (bpftrace, runqlat)."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from bpfstats import link_prog_id, prog_ids_of_pid, prog_stats

from ebpf_telemetry import facts, loader, plan
from ebpf_telemetry.binding import check, check_ptr, ffi, lib
from ebpf_telemetry.config import Config, Network
from ebpf_telemetry.facts import KernelFacts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH = {"x86_64": "x86", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
BPF_CFLAGS = ["-g", "-O2", "-target", "bpf", "-mcpu=v3", f"-D__TARGET_ARCH_{ARCH}"]
BPFTRACE_RTT = "tracepoint:tcp:tcp_probe { @us = hist(args->srtt >> 3); }"
RUNQLAT_CANDIDATES = ("runqlat", "runqlat-bpfcc", "/usr/sbin/runqlat")


def pin_dir(tag: str) -> str:
    return f"/sys/fs/bpf/ebt-bench-{os.getpid()}-{tag}"


def compile_bpf(src: str, out: str, extra: list[str] | None = None) -> str:
    """clang as the Makefile does it; include path: vmlinux/ and bpf/."""
    inc = [f"-I{ROOT}/vmlinux/{ARCH}", f"-I{ROOT}/bpf", f"-I{os.path.dirname(src)}"]
    cmd = ["clang", *BPF_CFLAGS, *inc, *(extra or []), "-c", src, "-o", out]
    subprocess.run(cmd, check=True)
    return out


# -- ours ---------------------------------------------------------------------------


@dataclass
class Telemetry:
    """Our object attached under a private pin dir; unloaded on exit."""

    pins: str
    cfg: Config = field(init=False)

    def __post_init__(self) -> None:
        self.cfg = replace(Config(), pin_dir=self.pins, node_name="bench")

    def attach(
        self, sample_rate: int = 100, obj: str | None = None, kernel: KernelFacts | None = None
    ) -> list[loader.Running]:
        """Attach obj (default: this build's) as the agent does, planned with
        kernel (default: this kernel's facts as obj can use them)."""
        self.cfg = replace(self.cfg, sample_rate=sample_rate)
        old = os.environ.get("EBPF_TELEMETRY_OBJECT")
        if obj:
            os.environ["EBPF_TELEMETRY_OBJECT"] = obj
        try:
            return loader.attach(self.cfg, kernel or usable_facts(obj))
        finally:
            if obj:
                if old is None:
                    del os.environ["EBPF_TELEMETRY_OBJECT"]
                else:
                    os.environ["EBPF_TELEMETRY_OBJECT"] = old

    def set_peers(self, count: int) -> None:
        """Configured peers lo1..loN = 127.0.0.1..N/32: an exact peer count
        whatever else runs on the machine (other traffic counts under `other`)."""
        self.cfg = replace(self.cfg, peers=loopback_peers(count))
        loader.attach(self.cfg)

    def detach(self, collector: str) -> None:
        """Remove a collector's pinned links: its programs detach."""
        for tp in plan.BY_NAME[collector].tracepoints:
            os.unlink(loader.link_path(self.pins, tp))

    def prog_ids(self) -> dict[str, int]:
        """hook name -> id of our program on it."""
        out: dict[str, int] = {}
        for c in plan.COLLECTORS:
            for tp in c.tracepoints:
                path = loader.link_path(self.pins, tp)
                if os.path.exists(path):
                    out[tp] = link_prog_id(path)
        return out

    def unload(self) -> None:
        if os.path.isdir(self.pins):
            loader.unload(self.pins)


def loopback_peers(count: int) -> dict[str, tuple[Network, ...]]:
    return {f"lo{n}": (ipaddress.ip_network(f"127.0.0.{n}/32"),) for n in range(1, count + 1)}


def peers_toml(count: int) -> str:
    lines = [f'lo{n} = ["127.0.0.{n}/32"]' for n in range(1, count + 1)]
    return "[peers]\n" + "\n".join(lines) + "\n"


def object_programs(path: str) -> frozenset[str]:
    """The names of the programs in a BPF object file (opened, not loaded)."""
    obj = check_ptr(lib.bpf_object__open_file(path.encode(), ffi.NULL), f"open {path}")
    try:
        return frozenset(name for name, _ in loader.programs_of(obj))
    finally:
        lib.bpf_object__close(obj)


def usable_facts(obj: str | None) -> KernelFacts | None:
    """This kernel's facts less the kfuncs of variants obj has no programs
    for (a build of an earlier revision: the plan then takes the variant
    before them, as on a kernel without the kfunc). None: this build's."""
    if obj is None:
        return None
    progs = object_programs(obj)
    lacking = {
        f"kfunc:{need.name}"
        for c in plan.COLLECTORS
        for v in c.variants
        if not v.programs <= progs
        for need in v.needs
        if need.kind == "kfunc"
    }
    return facts.read().without(*sorted(lacking))


@contextlib.contextmanager
def telemetry(
    tag: str, sample_rate: int = 100, obj: str | None = None, kernel: KernelFacts | None = None
) -> Iterator[Telemetry]:
    t = Telemetry(pin_dir(tag))
    try:
        t.attach(sample_rate, obj, kernel)
        yield t
    finally:
        t.unload()


# -- an object held by this process (no pins) ------------------------------------------


@dataclass
class Held:
    """A BPF object loaded by this process; its links die with close()."""

    obj: Any
    ids: dict[str, int] = field(default_factory=dict)  # program name -> id
    links: dict[str, Any] = field(default_factory=dict)

    def attach(self, name: str) -> None:
        prog = check_ptr(lib.bpf_object__find_program_by_name(self.obj, name.encode()), name)
        self.links[name] = check_ptr(lib.bpf_program__attach(prog), f"attach {name}")

    def detach(self, name: str) -> None:
        lib.bpf_link__destroy(self.links.pop(name))

    def close(self) -> None:
        for name in list(self.links):
            self.detach(name)
        lib.bpf_object__close(self.obj)


def _prog_id(prog: Any) -> int:
    info = ffi.new("struct bpf_prog_info *")
    size = ffi.new("__u32 *", ffi.sizeof("struct bpf_prog_info"))
    check(lib.bpf_obj_get_info_by_fd(lib.bpf_program__fd(prog), info, size), "prog info")
    return int(info.id)


@contextlib.contextmanager
def held_object(path: str, pin_root: str | None = None, attach: bool = True) -> Iterator[Held]:
    """Load path (maps pinned by name under pin_root, if it has such maps)
    and attach all its programs, or none (attach=False: Held.attach)."""
    opts = ffi.new("struct bpf_object_open_opts *")
    opts.sz = ffi.sizeof("struct bpf_object_open_opts")
    root = ffi.new("char[]", (pin_root or pin_dir("held")).encode())
    opts.pin_root_path = root
    obj = check_ptr(lib.bpf_object__open_file(path.encode(), opts), f"open {path}")
    held = Held(obj)
    try:
        check(lib.bpf_object__load(obj), f"load {path}")
        for name, prog in loader.programs_of(obj):
            held.ids[name] = _prog_id(prog)
            if attach:
                held.attach(name)
        yield held
    finally:
        held.close()


# -- comparison tools ------------------------------------------------------------------


@dataclass
class Tool:
    """A tracing tool run as a subprocess; its programs found through fdinfo."""

    name: str
    proc: subprocess.Popen[bytes] | None = None
    ids: dict[str, int] = field(default_factory=dict)  # program name -> id
    error: str | None = None

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_tool(name: str, argv: list[str], want: int, timeout: float = 20.0) -> Tool:
    """Start argv, wait until it holds `want` programs (or dies)."""
    tool = Tool(name)
    if not shutil.which(argv[0]):
        tool.error = f"{argv[0]} not installed"
        return tool
    tool.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if tool.proc.poll() is not None:
            err = tool.proc.stderr.read().decode(errors="replace") if tool.proc.stderr else ""
            tool.error = f"exited {tool.proc.returncode}: {err.strip()[-300:]}"
            return tool
        with contextlib.suppress(OSError):
            ids = prog_ids_of_pid(tool.proc.pid)
            if len(ids) >= want:
                time.sleep(0.3)  # let it finish attaching
                tool.ids = {prog_stats(i).name: i for i in prog_ids_of_pid(tool.proc.pid)}
                return tool
        time.sleep(0.1)
    tool.error = f"no BPF programs after {timeout:.0f} s"
    tool.stop()
    return tool


def runqlat_argv() -> list[str]:
    for c in RUNQLAT_CANDIDATES:
        if shutil.which(c):
            return [c, "3600", "1"]
    return ["runqlat"]


@contextlib.contextmanager
def tools(rtt: bool = True, sched: bool = True) -> Iterator[list[Tool]]:
    started: list[Tool] = []
    try:
        if rtt:
            started.append(start_tool("bpftrace", ["bpftrace", "-e", BPFTRACE_RTT], 1, 60))
        if sched:
            started.append(start_tool("runqlat", runqlat_argv(), 3))
        yield started
    finally:
        for t in started:
            t.stop()
