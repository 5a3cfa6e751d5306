"""Plan, load, attach and pin the BPF object; reuse what is pinned; unload.

plan.py says which variant of each collector this kernel takes. Each
collector is then loaded on its own (one bpf_object per collector, its
programs only), so a collector the kernel rejects is skipped with one warning
and the others run. Maps are pinned by name under the pin dir (default
/sys/fs/bpf/ebpf_telemetry/) and shared by every collector's object; each
program's link is pinned under links/<tracepoint>. A pinned link keeps its
program attached with no process holding it, so the kernel counts while no
agent runs; `run` reuses the pinned maps as they are (counters continue)
and replaces pinned programs only where this build's differ (upgrades).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Any

import structlog

from ebpf_telemetry import facts, host, lock, peertable, pincheck, plan, programs
from ebpf_telemetry.binding import BpfError, TelemetryError, captured, check, check_ptr, ffi, lib
from ebpf_telemetry.config import Config
from ebpf_telemetry.facts import KernelFacts
from ebpf_telemetry.layout import MAPS, NODE_MAPS
from ebpf_telemetry.maps import Pins

log = structlog.get_logger("loader")

# pinned by earlier releases; unload removes them (cpu_time_map: CPU time is
# read from /proc/stat since 0.2, cputime.py says why)
LEGACY_PINS = ("peer_alloc_map", "cpu_time_map")
# links of tracepoints earlier releases hooked (sched: the wakeups, until 0.2
# read the run queue's clock at sched_switch); removed once the collector
# that replaced them is attached, and by unload
LEGACY_LINKS = {"sched": ("sched_wakeup", "sched_wakeup_new")}


@dataclass(frozen=True)
class Running:
    """What one collector does after attach()."""

    collector: str
    variant: str | None  # None: skipped
    state: str  # "attached", "upgraded", "pinned" (kept as an earlier run left it), "skipped"
    why: str = ""  # skipped: the reason; degraded: what the variant loses

    @property
    def up(self) -> bool:
        return self.variant is not None


def object_path() -> str:
    override = os.environ.get("EBPF_TELEMETRY_OBJECT")
    if override:
        return override
    return str(resources.files("ebpf_telemetry") / "data" / "telemetry.bpf.o")


# -- one collector's object -------------------------------------------------------


@contextlib.contextmanager
def opened(pin_dir: str | None, max_peers: int) -> Iterator[Any]:
    """The object, opened: maps pinned under pin_dir, or (None) not pinned at
    all and with the smallest ring buffer, for a trial load."""
    opts = ffi.new("struct bpf_object_open_opts *")
    opts.sz = ffi.sizeof("struct bpf_object_open_opts")
    pin_root = ffi.new("char[]", (pin_dir or "").encode())
    if pin_dir:
        opts.pin_root_path = pin_root
    path = object_path()
    obj = check_ptr(lib.bpf_object__open_file(path.encode(), opts), f"cannot open {path}")
    try:
        sizes = dict.fromkeys(NODE_MAPS, max_peers + 2)
        ring = os.environ.get("EBPF_TELEMETRY_RINGBUF_BYTES")  # tests: a ring that fills fast
        if pin_dir is None:
            sizes["events"] = 4096
        elif ring:
            sizes["events"] = int(ring)
        m = lib.bpf_object__next_map(obj, ffi.NULL)
        while m != ffi.NULL:
            name = ffi.string(lib.bpf_map__name(m)).decode()
            if name in sizes:
                check(lib.bpf_map__set_max_entries(m, sizes[name]), f"size {name}")
            if pin_dir is None:
                check(lib.bpf_map__set_pin_path(m, ffi.NULL), f"unpin {name}")
            m = lib.bpf_object__next_map(obj, m)
        yield obj
    finally:
        lib.bpf_object__close(obj)


def programs_of(obj: Any) -> Iterator[tuple[str, Any]]:
    """(name, program) of every program of an opened object."""
    prog = lib.bpf_object__next_program(obj, ffi.NULL)
    while prog != ffi.NULL:
        yield ffi.string(lib.bpf_program__name(prog)).decode(), prog
        prog = lib.bpf_object__next_program(obj, prog)


def load(obj: Any, variant: plan.Variant) -> None:
    """Load only the variant's programs; a rejection is a BpfError naming the
    verifier's verdict (its whole log has gone to the log already)."""
    for name, prog in programs_of(obj):
        check(lib.bpf_program__set_autoload(prog, name in variant.programs), f"autoload {name}")
    with captured() as lines:
        ret = lib.bpf_object__load(obj)
    if ret < 0:
        raise BpfError(f"the kernel rejected variant {variant.name}: {verdict(lines)}", ret)


def verdict(lines: list[str]) -> str:
    """The verifier's last word from libbpf's log (the line before its statistics)."""
    for text in reversed(lines):
        log_lines = [x for x in text.splitlines() if x.strip()]
        if "-- END PROG LOAD LOG --" in text:
            body = log_lines[: log_lines.index("-- END PROG LOAD LOG --")]
            for x in reversed(body):
                if not x.startswith(("processed ", "verification time", "stack depth")):
                    return x.strip()
    return lines[-1].strip() if lines else "no log"


def trial(choice: plan.Choice) -> tuple[plan.Choice, str | None]:
    """Load a collector's variants in turn without pinning or attaching
    anything (doctor): the choice with the first the kernel takes and None,
    or the choice as planned and the kernel's verdict on its best variant."""
    verdicts: list[str] = []
    for v in choice.candidates():
        try:
            with opened(None, 1) as obj:
                load(obj, v)
        except BpfError as e:
            verdicts.append(str(e))
            continue
        return choice.taking(v), None
    return choice, verdicts[0]


# -- attach -------------------------------------------------------------------------


def _check_existing(cfg: Config) -> None:
    """Pinned maps must be ours, of this layout and size, before libbpf reuses them."""
    found = pincheck.survey(cfg.pin_dir)
    if found.other_layout:
        raise TelemetryError(next(iter(found.other_layout.values())))
    if found.resized(cfg.max_peers):
        raise TelemetryError(resized_message(found.pinned_peers or 0, cfg.max_peers))


def resized_message(pinned: int, wanted: int) -> str:
    return (
        f"pinned maps hold {pinned} peers, config asks max_peers {wanted}: run "
        f"`ebpf-telemetry unload` (resets counters) or keep max_peers = {pinned}"
    )


def link_path(pin_dir: str, tracepoint: str) -> str:
    return os.path.join(pin_dir, "links", tracepoint)


def linked(pin_dir: str, c: plan.Collector) -> bool:
    return all(os.path.exists(link_path(pin_dir, tp)) for tp in c.tracepoints)


def attach(cfg: Config, kernel: KernelFacts | None = None, renew: bool = False) -> list[Running]:
    """Make every collector this kernel can serve run, reusing pins; write
    peers and settings. `kernel`: the facts to plan with (default: this
    kernel's, or EBPF_TELEMETRY_FACTS). `renew`: replace every pinned link
    even where it runs these very programs (maps were replaced: the pinned
    programs still write the old ones).

    Every planned collector is loaded; one whose pinned links already run
    these very programs (same tags) is kept as it is; one whose links run
    other programs (another release, another variant) is upgraded in place:
    the new programs are attached, then their link pins replace the old ones
    (rename), which detaches the old programs. The maps stay: no counter
    resets, and no moment in which nothing counts."""
    host.preflight()
    host.ensure_bpffs(cfg.pin_dir)
    _check_existing(cfg)
    host.make_pin_dir(cfg.pin_dir)
    _remove_stray_links(cfg.pin_dir)
    out: dict[str, Running] = {}
    with contextlib.ExitStack() as objects:
        todo: list[tuple[plan.Choice, Any, str]] = []
        for ch in plan.plan(kernel or facts.current()):
            if ch.variant is None:
                out[ch.name] = _skipped(ch.name, ch.why)
                continue
            pinned = linked(cfg.pin_dir, ch.collector)
            obj, ch, err = _load_first(objects, cfg, ch)
            if obj is None:
                assert ch.variant is not None
                out[ch.name] = (
                    Running(ch.name, ch.variant.name, "pinned", f"kept: {err}")
                    if pinned
                    else _skipped(ch.name, err)
                )
                continue
            assert ch.variant is not None
            if pinned and not renew and _runs_already(obj, ch.variant, cfg.pin_dir):
                out[ch.name] = Running(ch.name, ch.variant.name, "pinned", ch.why)
            else:
                todo.append((ch, obj, "upgraded" if pinned else "attached"))
        if not Pins(cfg.pin_dir).exists():
            why = "; ".join(f"{r.collector}: {r.why}" for r in out.values())
            raise TelemetryError(f"no collector can run on this kernel: {why}")
        with Pins(cfg.pin_dir) as pins:  # programs count nothing until this is written
            peertable.apply(pins, cfg)
        for ch, obj, state in todo:
            assert ch.variant is not None
            for h in ch.variant.hooks:
                _attach_one(obj, h, cfg.pin_dir)
            out[ch.name] = Running(ch.name, ch.variant.name, state, ch.why)
            log.info(state, collector=ch.name, variant=ch.variant.name)
            _remove_legacy_links(cfg.pin_dir, ch.name)
    return [out[c.name] for c in plan.COLLECTORS]


def _load_first(
    objects: contextlib.ExitStack, cfg: Config, ch: plan.Choice
) -> tuple[Any, plan.Choice, str]:
    """The loaded object of the first of the choice's variants the kernel
    takes, and the choice with it; else None, the choice as planned and the
    kernel's verdict on its best variant."""
    verdicts: list[str] = []
    for v in ch.candidates():
        with contextlib.ExitStack() as attempt:
            obj = attempt.enter_context(opened(cfg.pin_dir, cfg.max_peers))
            try:
                load(obj, v)
            except BpfError as e:
                verdicts.append(str(e))
                continue
            objects.push(attempt.pop_all())
            return obj, ch.taking(v), ""
    return None, ch, verdicts[0]


def _remove_stray_links(pin_dir: str) -> None:
    """links/<tp>-new pins that an upgrade killed between pin and rename
    left: each keeps a program attached beside the one under links/<tp>,
    counting every event twice. Removed before any collector is judged."""
    for c in plan.COLLECTORS:
        for tp in c.tracepoints:
            stray = link_path(pin_dir, tp) + "-new"
            if os.path.lexists(stray):
                os.unlink(stray)
                log.warning("stray link removed (an interrupted upgrade)", link=stray)


def _remove_legacy_links(pin_dir: str, collector: str) -> None:
    """Detach what an earlier release of this collector hooked and this one does not."""
    for tp in LEGACY_LINKS.get(collector, ()):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(link_path(pin_dir, tp))
            log.info("legacy link removed", collector=collector, link=tp)


def _program(obj: Any, name: str) -> Any:
    return check_ptr(lib.bpf_object__find_program_by_name(obj, name.encode()), name)


def _runs_already(obj: Any, variant: plan.Variant, pin_dir: str) -> bool:
    """Do the pinned links run exactly the programs just loaded (same tags)?"""
    for h in variant.hooks:
        try:
            pinned = programs.behind_link(link_path(pin_dir, h.tracepoint))
        except BpfError:
            return False
        fresh = programs.of_fd(lib.bpf_program__fd(_program(obj, h.program)))
        if (pinned.name, pinned.tag) != (fresh.name, fresh.tag):
            return False
    return True


def _skipped(collector: str, why: str) -> Running:
    log.warning("collector skipped", collector=collector, why=why)
    return Running(collector, None, "skipped", why)


def _attach_one(obj: Any, h: plan.Hook, pin_dir: str) -> None:
    """Attach, pin under a temporary name, then rename over the old pin (if
    any): the old link's last reference goes and its program detaches."""
    link = check_ptr(lib.bpf_program__attach(_program(obj, h.program)), f"attach {h.program}")
    try:
        path = link_path(pin_dir, h.tracepoint)
        fresh = path + "-new"  # no dots: bpffs refuses them
        with contextlib.suppress(FileNotFoundError):
            os.unlink(fresh)  # left by a crash
        check(lib.bpf_link__pin(link, fresh.encode()), f"pin link {h.tracepoint}")
        os.rename(fresh, path)
    finally:
        lib.bpf_link__destroy(link)  # the pin keeps it attached


def our_pins() -> list[str]:
    """Every name we pin under a pin dir (links, maps, pins of earlier releases)."""
    tps = [tp for c in plan.COLLECTORS for tp in c.tracepoints]
    tps += [tp for legacy in LEGACY_LINKS.values() for tp in legacy]
    return [*(f"links/{tp}{s}" for tp in tps for s in ("", "-new")), *MAPS, *LEGACY_PINS]


def unload(pin_dir: str, force: bool = False) -> list[str]:
    """Detach every collector and remove every pin; what was removed ([] when
    there is nothing to unload: no pin dir, or an empty one).

    Acts only on a directory on bpffs that holds our pins (or nothing): the
    filesystem is checked first, so a mistyped --pin-dir deletes nothing.
    Refused while an agent holds the pin dir (force: all the same; the agent
    then notices within one interval and exits non-zero)."""
    if not os.path.lexists(pin_dir):
        return []
    if not host.on_bpffs(pin_dir):
        raise TelemetryError(f"{pin_dir} is not on a BPF filesystem; nothing deleted")
    if os.path.islink(pin_dir) or not os.path.isdir(pin_dir):
        raise TelemetryError(f"{pin_dir} is not a directory; nothing deleted")
    present = [n for n in our_pins() if os.path.lexists(os.path.join(pin_dir, n))]
    dirs = {"links", lock.EVENTS_DIR}
    foreign = set(os.listdir(pin_dir)) - {n.split("/")[0] for n in present} - dirs
    if not present and foreign:
        raise TelemetryError(f"{pin_dir} holds no ebpf-telemetry pins; nothing deleted")
    try:
        held = lock.take(pin_dir, "an agent")
    except lock.Busy as e:
        if not force:
            raise TelemetryError(f"{e}: stop it first (or unload --force)") from None
        held = -1
    try:
        for name in present:
            os.unlink(os.path.join(pin_dir, name))
    finally:
        if held >= 0:
            os.close(held)
    for d in (os.path.join(pin_dir, "links"), os.path.join(pin_dir, lock.EVENTS_DIR), pin_dir):
        try:
            os.rmdir(d)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise TelemetryError(f"{d}: {e.strerror} (pins not ours are left alone)") from None
    return present
