"""Load, attach and pin the BPF object; reuse what is pinned; unload.

Pins (default /sys/fs/bpf/ebpf_telemetry/): every map by name, and one link
per collector under links/. A pinned link keeps its program attached with
no process holding it, so the kernel counts while no agent runs; `run`
attaches only collectors whose link is missing and reuses the pinned maps
as they are (counters continue).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from importlib import resources
from typing import Any

import structlog

from ebpf_telemetry import btf, nodes
from ebpf_telemetry.binding import BpfError, TelemetryError, check, check_ptr, ffi, lib
from ebpf_telemetry.config import Config
from ebpf_telemetry.maps import MAPS, PinnedMap, Pins

log = structlog.get_logger("loader")

NODE_MAPS = ("rtt_hist_map", "node_metrics_map", "peer_info_map", "peer_addr_map")
BPFFS_ROOT = "/sys/fs/bpf"
TRACEFS = "/sys/kernel/tracing"


@dataclass(frozen=True)
class Hook:
    """One tracepoint: its tp_btf program and its classic-tracepoint twin."""

    tracepoint: str  # "category/name"
    btf_prog: str
    tp_prog: str

    @property
    def name(self) -> str:
        return self.tracepoint.split("/")[1]

    @property
    def btf_typedef(self) -> str:
        return "btf_trace_" + self.name

    def prog(self, how: str) -> str:
        return self.btf_prog if how == "tp_btf" else self.tp_prog


@dataclass(frozen=True)
class Collector:
    """One measurement: hooks that run together, all tp_btf or all tracepoints."""

    name: str
    hooks: tuple[Hook, ...]


def _hook(tp: str) -> Hook:
    n = tp.split("/")[1]
    return Hook(tp, f"{n}_btf", f"{n}_tp")


COLLECTORS = (
    Collector("rtt", (_hook("tcp/tcp_probe"),)),
    Collector("retrans", (_hook("tcp/tcp_retransmit_skb"), _hook("tcp/tcp_retransmit_synack"))),
    Collector("drops", (_hook("skb/kfree_skb"),)),
    Collector(
        "sched",
        (_hook("sched/sched_wakeup"), _hook("sched/sched_wakeup_new"), _hook("sched/sched_switch")),
    ),
)


def object_path() -> str:
    override = os.environ.get("EBPF_TELEMETRY_OBJECT")
    if override:
        return override
    return str(resources.files("ebpf_telemetry") / "data" / "telemetry.bpf.o")


# -- what the running kernel offers --------------------------------------------


def tracepoint_exists(tp: str) -> bool:
    return os.path.isdir(os.path.join(TRACEFS, "events", tp))


def plan() -> dict[str, str | None]:
    """Collector -> "tp_btf", "tracepoint", or None (a hook is missing here).

    EBPF_TELEMETRY_HOOK=tracepoint forces the classic tracepoints (tests of
    the fallback; kernels whose tp_btf is broken)."""
    forced = os.environ.get("EBPF_TELEMETRY_HOOK")
    wanted = [h.btf_typedef for c in COLLECTORS for h in c.hooks]
    have = set() if forced == "tracepoint" else btf.typedefs(wanted)
    out: dict[str, str | None] = {}
    for c in COLLECTORS:
        if all(h.btf_typedef in have for h in c.hooks):
            out[c.name] = "tp_btf"
        elif all(tracepoint_exists(h.tracepoint) for h in c.hooks):
            out[c.name] = "tracepoint"
        else:
            out[c.name] = None
    return out


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


def require_caps() -> None:
    caps = effective_caps()
    missing = [n for n, bit in REQUIRED_CAPS.items() if not caps >> bit & 1]
    if missing:
        raise TelemetryError(
            f"missing capabilities {', '.join(missing)}: run as root or grant "
            f"{' '.join(REQUIRED_CAPS)} (see docs/security.md)"
        )


def preflight(cfg: Config) -> None:
    """What `run` checks before it touches anything: privileges, then BTF."""
    require_caps()
    btf.require_btf()


# -- load / attach ----------------------------------------------------------------


def _check_existing(cfg: Config) -> None:
    """Pinned maps must be ours, of this layout and size, before libbpf reuses them."""
    want = cfg.max_peers + 2
    for name in MAPS:
        if not os.path.exists(os.path.join(cfg.pin_dir, name)):
            continue
        m = PinnedMap(cfg.pin_dir, name)
        try:
            if name in NODE_MAPS and m.max_entries != want:
                raise TelemetryError(
                    f"pinned maps hold {m.max_entries - 2} peers, config asks max_peers "
                    f"{cfg.max_peers}: run `ebpf-telemetry unload` (resets counters) or keep "
                    f"max_peers = {m.max_entries - 2}"
                )
        finally:
            m.close()


def link_path(pin_dir: str, h: Hook) -> str:
    return os.path.join(pin_dir, "links", h.name)


def linked(pin_dir: str, c: Collector) -> bool:
    return all(os.path.exists(link_path(pin_dir, h)) for h in c.hooks)


def attach(cfg: Config) -> dict[str, str]:
    """Make every collector run, reusing pins; write peers and settings.

    Returns collector -> how it runs ("tp_btf", "tracepoint", "pinned" when
    reused as it was, "missing" when this kernel lacks its hook)."""
    preflight(cfg)
    ensure_bpffs(cfg.pin_dir)
    _check_existing(cfg)
    make_pin_dir(cfg.pin_dir)
    state: dict[str, str] = {}
    todo: dict[Collector, str] = {}
    hooks = plan()
    for c in COLLECTORS:
        if linked(cfg.pin_dir, c):
            state[c.name] = "pinned"
        elif hooks[c.name] is None:
            tps = ",".join(h.tracepoint for h in c.hooks)
            log.warning("collector skipped: no hook on this kernel", collector=c.name, hooks=tps)
            state[c.name] = "missing"
        else:
            todo[c] = state[c.name] = str(hooks[c.name])
    if todo or not Pins(cfg.pin_dir).exists():
        _load_and_attach(cfg, todo)  # writes settings between load and attach
    else:
        with Pins(cfg.pin_dir) as pins:
            nodes.apply(pins, cfg)
    return state


def _load_and_attach(cfg: Config, todo: dict[Collector, str]) -> None:
    if "tracepoint" in todo.values():
        ensure_mount(TRACEFS, "tracefs")
    opts = ffi.new("struct bpf_object_open_opts *")
    opts.sz = ffi.sizeof("struct bpf_object_open_opts")
    pin_root = ffi.new("char[]", cfg.pin_dir.encode())
    opts.pin_root_path = pin_root
    path = object_path()
    obj = check_ptr(lib.bpf_object__open_file(path.encode(), opts), f"cannot open {path}")
    try:
        for name in NODE_MAPS:
            m = check_ptr(lib.bpf_object__find_map_by_name(obj, name.encode()), name)
            check(lib.bpf_map__set_max_entries(m, cfg.max_peers + 2), f"size {name}")
        ring = os.environ.get("EBPF_TELEMETRY_RINGBUF_BYTES")  # tests: a ring that fills fast
        if ring:
            m = check_ptr(lib.bpf_object__find_map_by_name(obj, b"events"), "events")
            check(lib.bpf_map__set_max_entries(m, int(ring)), "size events")
        chosen = {h.prog(how) for c, how in todo.items() for h in c.hooks}
        prog = lib.bpf_object__next_program(obj, ffi.NULL)
        while prog != ffi.NULL:
            name = ffi.string(lib.bpf_program__name(prog)).decode()
            check(lib.bpf_program__set_autoload(prog, name in chosen), f"autoload {name}")
            prog = lib.bpf_object__next_program(obj, prog)
        ret = lib.bpf_object__load(obj)
        if ret < 0:
            raise BpfError(f"loading {path} failed (see the libbpf log above)", ret)
        with Pins(cfg.pin_dir) as pins:  # programs count nothing until this is written
            nodes.apply(pins, cfg)
        for c, how in todo.items():
            for h in c.hooks:
                _attach_one(obj, h, h.prog(how), cfg.pin_dir)
            log.info("attached", collector=c.name, hook=how)
    finally:
        lib.bpf_object__close(obj)


def _attach_one(obj: Any, h: Hook, prog_name: str, pin_dir: str) -> None:
    prog = check_ptr(lib.bpf_object__find_program_by_name(obj, prog_name.encode()), prog_name)
    link = check_ptr(lib.bpf_program__attach(prog), f"attach {prog_name}")
    try:
        path = link_path(pin_dir, h)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a half-attached collector from a crash: replace it
        check(lib.bpf_link__pin(link, path.encode()), f"pin link {h.name}")
    finally:
        lib.bpf_link__destroy(link)  # the pin keeps it attached


def unload(pin_dir: str) -> list[str]:
    """Detach every collector and remove every pin; what was removed."""
    removed: list[str] = []
    if not os.path.isdir(pin_dir):
        raise TelemetryError(f"nothing pinned at {pin_dir}")
    links = os.path.join(pin_dir, "links")
    ours = [f"links/{h.name}" for c in COLLECTORS for h in c.hooks] + list(MAPS)
    for name in ours:
        path = os.path.join(pin_dir, name)
        if os.path.lexists(path):
            os.unlink(path)
            removed.append(name)
    for d in (links, pin_dir):
        try:
            os.rmdir(d)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise TelemetryError(f"{d}: {e.strerror} (pins not ours are left alone)") from None
    return removed
