"""Network lab for the kernel tests: namespaces, veth, a delay line, TCP traffic.

Everything here stays inside network namespaces that the caller creates with
:class:`Netns`; nothing talks to an address outside them. Netlink work goes
through pyroute2 (no ``ip`` subprocesses). Namespaces are entered per thread:
``setns(2)`` changes only the calling thread, so :func:`run_in_netns` runs a
function in a fresh thread that has joined the namespace and the rest of the
process (pytest included) stays where it was. A socket or a TUN fd belongs to
the namespace it was created in, so once made it can be used from any thread.

Pieces:

* :class:`Netns` - a uniquely named namespace (``ebt-<pid>-<n>``) with ``lo``
  up, removed on exit.
* :func:`run_in_netns` / :class:`NetnsThread` - run code in a namespace.
* :func:`veth_pair` - a veth between two namespaces with IPv4/IPv6 addresses
  (and optionally many extra addresses on either side).
* :class:`DelayLine` - a TUN device in each of two namespaces, routed to each
  other through forwarder threads that hold every packet for exactly
  ``delay_s`` and can drop a seeded share of them. This replaces netem, which
  this kernel does not have.
* :class:`TcpEchoServer`, :func:`tcp_pingpong`, :func:`tcp_pingpong_many` -
  request/response TCP traffic and the kernel's RTT for it (``TCP_INFO``).
* :func:`sock_diag_rtts` / :func:`sock_diag_tcp_info` - the same RTT read from
  outside the sockets through sock_diag (``INET_DIAG_INFO``).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import fcntl
import ipaddress
import itertools
import os
import random
import re
import select
import selectors
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Generic, ParamSpec, Self, TypeAlias, TypeVar

import pyroute2.config
from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns
from pyroute2.netlink.diag import DiagSocket

# pyroute2 waits 2 s for the helper process that creates a namespace (a new
# Python that imports pyroute2): under an emulated CPU on a busy host the
# first one took longer (seen on 6.1 under TCG: TimeoutError in Netns())
pyroute2.config.default_communicate_timeout = 60

__all__ = [
    "DelayLine",
    "DirectionStats",
    "Netns",
    "NetnsThread",
    "PingPongResult",
    "TcpEchoServer",
    "TcpInfo",
    "TcpPingPong",
    "VethPair",
    "cleanup_stale_netns",
    "net_counter",
    "netns_exists",
    "norm_addr",
    "run_in_netns",
    "sock_diag_rtts",
    "sock_diag_tcp_info",
    "tcp_info",
    "tcp_pingpong",
    "tcp_pingpong_many",
    "veth_pair",
    "wait_until",
]

P = ParamSpec("P")
T = TypeVar("T")

NETNS_PREFIX = "ebt-"
NETNS_RUN_DIR = "/var/run/netns"

# Linux ABI constants used below.
_IFF_UP = 0x1
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
_TUNSETIFF = 0x400454CA
_IFA_F_NODAD = 0x02
_IFA_F_DADFAILED = 0x08
_IFA_F_TENTATIVE = 0x40
_RT_SCOPE_LINK = 253
_TCP_ESTABLISHED = 1
_INET_DIAG_INFO = 2

_counter = itertools.count(1)


def _next_id() -> int:
    return next(_counter)


# --------------------------------------------------------------------------
# polling


def wait_until(
    cond: Callable[[], T | bool | None],
    timeout: float = 5.0,
    interval: float = 0.002,
    what: str = "condition",
) -> T:
    """Poll ``cond`` until it returns something truthy, or raise TimeoutError.

    Returns the truthy value. ``interval`` is the pause between polls, not a
    synchronisation delay: the deadline is what bounds the wait.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.3g}s waiting for {what}")
        time.sleep(interval)


# --------------------------------------------------------------------------
# namespaces and threads


def _ns_name(ns: Netns | str) -> str:
    return ns.name if isinstance(ns, Netns) else ns


def netns_exists(name: str) -> bool:
    """True if a named namespace ``name`` is mounted under /var/run/netns."""
    return name in pr_netns.listnetns()


class Netns:
    """A uniquely named network namespace with ``lo`` up; removed on exit.

    The name is ``ebt-<pid>-<n>`` (plus ``-<tag>`` if given), so stale ones
    left by a killed run can be recognised (:func:`cleanup_stale_netns`).
    """

    def __init__(self, tag: str = "") -> None:
        if tag and not re.fullmatch(r"[A-Za-z0-9_]{1,16}", tag):
            raise ValueError(f"bad namespace tag {tag!r}")
        suffix = f"-{tag}" if tag else ""
        self._name = f"{NETNS_PREFIX}{os.getpid()}-{_next_id()}{suffix}"
        self._created = False

    @property
    def name(self) -> str:
        return self._name

    @property
    def path(self) -> str:
        return f"{NETNS_RUN_DIR}/{self._name}"

    def create(self) -> None:
        if self._created:
            return
        if netns_exists(self._name):
            raise FileExistsError(f"netns {self._name} already exists")
        pr_netns.create(self._name)
        self._created = True
        try:
            self.run(_set_link_up, "lo")
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        if not self._created:
            return
        self._created = False
        pr_netns.remove(self._name)

    def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Shorthand for :func:`run_in_netns` on this namespace."""
        return run_in_netns(self._name, fn, *args, **kwargs)

    def __enter__(self) -> Self:
        self.create()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"Netns({self._name!r})"


def cleanup_stale_netns() -> list[str]:
    """Remove ``ebt-<pid>-*`` namespaces whose creating process is gone."""
    removed = []
    for name in pr_netns.listnetns():
        m = re.fullmatch(rf"{re.escape(NETNS_PREFIX)}(\d+)-.*", name)
        if m is None:
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or os.path.exists(f"/proc/{pid}"):
            continue
        pr_netns.remove(name)
        removed.append(name)
    return removed


class _Running:
    """A context manager: start() on enter, stop() on exit. A failure of stop()
    never hides the failure that ended the block."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> object:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.stop()
        else:
            with contextlib.suppress(Exception):
                self.stop()


class NetnsThread(_Running, Generic[T]):
    """A thread that joins a network namespace, then runs ``fn(stop_event)``.

    For long-running functions (servers): ``fn`` gets a :class:`threading.Event`
    and should return soon after it is set. :meth:`stop` sets it and joins;
    :meth:`result` only joins. Both return ``fn``'s value or re-raise its
    exception in the caller. As a context manager it starts on enter and
    stops on exit.
    """

    def __init__(
        self,
        ns: Netns | str,
        fn: Callable[[threading.Event], T],
        name: str | None = None,
    ) -> None:
        self.ns = _ns_name(ns)
        self.stop_event = threading.Event()
        self._fn = fn
        self._value: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, name=name or f"netns:{self.ns}", daemon=True
        )

    def _run(self) -> None:
        try:
            pr_netns.setns(self.ns, flags=0)
            self._value = self._fn(self.stop_event)
        except BaseException as e:
            self._error = e

    def start(self) -> Self:
        self._thread.start()
        return self

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def result(self, timeout: float | None = None) -> T:
        """Wait for ``fn`` to finish; return its value or raise its exception."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"thread in netns {self.ns} still running after {timeout}s")
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]

    def stop(self, timeout: float | None = 10.0) -> T:
        """Set the stop event, then :meth:`result`."""
        self.stop_event.set()
        return self.result(timeout)


def run_in_netns(ns: Netns | str, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run ``fn(*args, **kwargs)`` in a fresh thread inside ``ns``.

    Returns its result or re-raises its exception. The thread ends with the
    call, so nothing else ever runs in the namespace by accident.
    """

    def call(_stop: threading.Event) -> T:
        return fn(*args, **kwargs)

    return NetnsThread(ns, call).start().result()


def _socket_in(
    ns: Netns | str, family: int, type_: int = socket.SOCK_STREAM, proto: int = 0
) -> socket.socket:
    return run_in_netns(ns, socket.socket, family, type_, proto)


# --------------------------------------------------------------------------
# rtnetlink helpers (each runs inside the namespace's thread)


def _set_link_up(ifname: str) -> None:
    with IPRoute() as ipr:
        (idx,) = ipr.link_lookup(ifname=ifname)
        ipr.link("set", index=idx, state="up")


def _parse_iface(spec: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    """``"10.0.0.1/24"`` or bare ``"10.0.0.1"`` (a host prefix)."""
    return ipaddress.ip_interface(spec)


def _add_addr(
    ipr: Any,
    index: int,
    iface: ipaddress.IPv4Interface | ipaddress.IPv6Interface,
) -> None:
    kw: dict[str, Any] = {
        "index": index,
        "address": str(iface.ip),
        "prefixlen": iface.network.prefixlen,
    }
    if iface.version == 6:
        kw["flags"] = _IFA_F_NODAD
    ipr.addr("add", **kw)


def _link_ready(ipr: Any, ifname: str, need_operstate_up: bool) -> bool:
    links = ipr.link("get", ifname=ifname)
    if not links:
        return False
    link = links[0]
    if not link["flags"] & _IFF_UP:
        return False
    return not (need_operstate_up and link.get("IFLA_OPERSTATE") != "UP")


def _addrs_ready(ipr: Any, index: int, want: Iterable[str]) -> bool:
    have: dict[str, int] = {}
    for msg in ipr.addr("dump", index=index):
        addr = msg.get("IFA_ADDRESS")
        if addr is None:
            continue
        flags = msg.get("IFA_FLAGS")
        have[ipaddress.ip_address(addr).compressed] = msg["flags"] if flags is None else flags
    for a in want:
        flags = have.get(ipaddress.ip_address(a).compressed)
        if flags is None or flags & (_IFA_F_TENTATIVE | _IFA_F_DADFAILED):
            return False
    return True


def _wait_iface_ready(
    ifname: str, addrs: Sequence[str], operstate_up: bool, timeout: float
) -> None:
    with IPRoute() as ipr:

        def ready() -> bool:
            if not _link_ready(ipr, ifname, operstate_up):
                return False
            (idx,) = ipr.link_lookup(ifname=ifname)
            return _addrs_ready(ipr, idx, addrs)

        wait_until(ready, timeout=timeout, what=f"{ifname} up with {list(addrs)}")


# --------------------------------------------------------------------------
# veth


IfaceSpec: TypeAlias = str


@dataclass(frozen=True)
class VethPair:
    """What :func:`veth_pair` made. Addresses are bare (no prefix length)."""

    ns_a: str
    ns_b: str
    ifname_a: str
    ifname_b: str
    v4_a: str | None
    v4_b: str | None
    v6_a: str | None
    v6_b: str | None
    extra_a: tuple[str, ...] = ()
    extra_b: tuple[str, ...] = ()

    @property
    def addrs_a(self) -> tuple[str, ...]:
        """Every address on the ``ns_a`` end: v4, v6, then the extras."""
        return tuple(a for a in (self.v4_a, self.v6_a) if a) + self.extra_a

    @property
    def addrs_b(self) -> tuple[str, ...]:
        """Every address on the ``ns_b`` end: v4, v6, then the extras."""
        return tuple(a for a in (self.v4_b, self.v6_b) if a) + self.extra_b


def _configure_end(
    ifname: str,
    ifaces: Sequence[ipaddress.IPv4Interface | ipaddress.IPv6Interface],
    routes: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network],
    mtu: int | None,
    gateways: Mapping[int, str] | None = None,
) -> None:
    """Address ``ifname``, bring it up, route ``routes`` over it.

    A route goes via the other end's primary address of its family when there
    is one (``gateways``, by IP version): one neighbour entry for any number
    of addresses. Link-scope routes would need one ARP/NDP entry per address,
    and past ``gc_thresh3`` (1024, shared by every namespace) new entries
    fail with "neighbor table overflow" and SYNs are lost.
    """
    gateways = gateways or {}
    with IPRoute() as ipr:
        (idx,) = ipr.link_lookup(ifname=ifname)
        if mtu is not None:
            ipr.link("set", index=idx, mtu=mtu)
        for iface in ifaces:
            _add_addr(ipr, idx, iface)
        ipr.link("set", index=idx, state="up")
        for net in routes:
            via = gateways.get(net.version)
            hop: dict[str, Any] = {"gateway": via} if via else {"scope": _RT_SCOPE_LINK}
            ipr.route(
                "add",
                dst=str(net.network_address),
                dst_len=net.prefixlen,
                oif=idx,
                family=socket.AF_INET if net.version == 4 else socket.AF_INET6,
                **hop,
            )


def _create_veth(ifname_a: str, ifname_b: str, ns_b: str) -> None:
    fd = os.open(f"{NETNS_RUN_DIR}/{ns_b}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with IPRoute() as ipr:
            ipr.link(
                "add",
                ifname=ifname_a,
                kind="veth",
                peer={"ifname": ifname_b, "net_ns_fd": fd},
            )
    finally:
        os.close(fd)


def _uncovered(
    ifaces: Sequence[ipaddress.IPv4Interface | ipaddress.IPv6Interface],
    local: Sequence[ipaddress.IPv4Interface | ipaddress.IPv6Interface],
) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """Networks of ``ifaces`` that no connected network in ``local`` contains."""
    nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for iface in ifaces:
        net = iface.network
        covered = any(
            loc.version == net.version and net.subnet_of(loc.network)  # type: ignore[arg-type]
            for loc in local
        )
        if not covered and net not in nets:
            nets.append(net)
    return nets


def _gateways(
    other: Sequence[ipaddress.IPv4Interface | ipaddress.IPv6Interface],
    local: Sequence[ipaddress.IPv4Interface | ipaddress.IPv6Interface],
) -> dict[int, str]:
    """By IP version: the first of ``other`` (the far end's primaries) on a
    network ``local`` is connected to, usable as a next hop."""
    out: dict[int, str] = {}
    for iface in other:
        if iface.version not in out and not _uncovered([iface], local):
            out[iface.version] = str(iface.ip)
    return out


def veth_pair(
    ns_a: Netns | str,
    ns_b: Netns | str,
    v4: tuple[str, str] | None = ("10.241.1.1/24", "10.241.1.2/24"),
    v6: tuple[str, str] | None = ("fd00:241:1::1/64", "fd00:241:1::2/64"),
    *,
    extra_a: Sequence[IfaceSpec] = (),
    extra_b: Sequence[IfaceSpec] = (),
    mtu: int | None = None,
    timeout: float = 5.0,
) -> VethPair:
    """Create a veth between two namespaces, address both ends, bring it up.

    ``v4``/``v6`` are (a-end, b-end) addresses with prefix lengths; IPv6 ones
    get ``nodad`` so they are usable at once. ``extra_a``/``extra_b`` add more
    addresses to one end (``"10.241.1.50/24"``, or a bare ``"10.241.7.9"`` as
    a /32); an extra whose network the other end is not connected to gets a
    link-scope route there, so every address is reachable from the other
    side. Returns once both links are up and every address is usable.

    The veth disappears with its namespaces; there is nothing to undo.
    """
    a, b = _ns_name(ns_a), _ns_name(ns_b)
    n = _next_id()
    ifname_a, ifname_b = f"ebv{n}a", f"ebv{n}b"

    prim_a = [_parse_iface(x[0]) for x in (v4, v6) if x is not None]
    prim_b = [_parse_iface(x[1]) for x in (v4, v6) if x is not None]
    ext_a = [_parse_iface(x) for x in extra_a]
    ext_b = [_parse_iface(x) for x in extra_b]
    ifaces_a, ifaces_b = prim_a + ext_a, prim_b + ext_b

    run_in_netns(a, _create_veth, ifname_a, ifname_b, b)
    routes_a, routes_b = _uncovered(ifaces_b, ifaces_a), _uncovered(ifaces_a, ifaces_b)
    gw_a, gw_b = _gateways(prim_b, prim_a), _gateways(prim_a, prim_b)
    run_in_netns(a, _configure_end, ifname_a, ifaces_a, routes_a, mtu, gw_a)
    run_in_netns(b, _configure_end, ifname_b, ifaces_b, routes_b, mtu, gw_b)

    addrs_a = [str(i.ip) for i in ifaces_a]
    addrs_b = [str(i.ip) for i in ifaces_b]
    deadline = time.monotonic() + timeout
    run_in_netns(a, _wait_iface_ready, ifname_a, addrs_a, True, timeout)
    run_in_netns(b, _wait_iface_ready, ifname_b, addrs_b, True, deadline - time.monotonic())

    def bare(i: ipaddress.IPv4Interface | ipaddress.IPv6Interface) -> str:
        return i.ip.compressed

    return VethPair(
        ns_a=a,
        ns_b=b,
        ifname_a=ifname_a,
        ifname_b=ifname_b,
        v4_a=bare(_parse_iface(v4[0])) if v4 else None,
        v4_b=bare(_parse_iface(v4[1])) if v4 else None,
        v6_a=bare(_parse_iface(v6[0])) if v6 else None,
        v6_b=bare(_parse_iface(v6[1])) if v6 else None,
        extra_a=tuple(bare(i) for i in ext_a),
        extra_b=tuple(bare(i) for i in ext_b),
    )


# --------------------------------------------------------------------------
# delay line (TUN <-> TUN through this process)


def _open_tun(template: str) -> tuple[int, str]:
    """Create a TUN device in the calling thread's namespace; (fd, ifname)."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        ifr = struct.pack("16sH22x", template.encode(), _IFF_TUN | _IFF_NO_PI)
        res = fcntl.ioctl(fd, _TUNSETIFF, ifr)
    except BaseException:
        os.close(fd)
        raise
    return fd, res[:16].rstrip(b"\0").decode()


_PR_SET_TIMERSLACK = 29
_RT_PRIORITY = 10


def _tune_forwarder_thread(realtime: bool) -> None:
    """Make the calling thread wake on time.

    1 ns timer slack (the default 50 us shows in the delay) and, if asked and
    permitted, SCHED_FIFO so other processes' CPU load cannot delay it. The
    forwarder threads only ever block (poll, sleep), so they starve nothing.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_TIMERSLACK, 1, 0, 0, 0)
    if realtime:
        with contextlib.suppress(OSError, AttributeError):
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(_RT_PRIORITY))


class _SwitchInterval:
    """Lower ``sys.setswitchinterval`` while any delay line runs (refcounted).

    Forwarder threads share the GIL with the test; with the default 5 ms
    switch interval, Python code spinning in another thread delays a packet
    by up to 5 ms. The old value comes back when the last delay line stops.
    """

    _lock = threading.Lock()
    _users = 0
    _saved = 0.0

    @classmethod
    def acquire(cls, value: float) -> None:
        with cls._lock:
            if cls._users == 0:
                cls._saved = sys.getswitchinterval()
            cls._users += 1
            sys.setswitchinterval(min(value, sys.getswitchinterval()))

    @classmethod
    def release(cls) -> None:
        with cls._lock:
            cls._users -= 1
            if cls._users == 0:
                sys.setswitchinterval(cls._saved)


@dataclass
class DirectionStats:
    """Counters of one direction of a :class:`DelayLine`.

    Once stopped, ``read == forwarded + dropped + write_errors + unsent``
    (``unsent``: still held in the queue when the line stopped). Lateness is
    how long after its deadline a packet was written.
    """

    read: int = 0
    forwarded: int = 0
    dropped: int = 0
    write_errors: int = 0
    unsent: int = 0
    max_late_s: float = 0.0
    total_late_s: float = 0.0

    @property
    def mean_late_s(self) -> float:
        """Mean time a forwarded packet left after its deadline."""
        return self.total_late_s / self.forwarded if self.forwarded else 0.0


class _Direction:
    """One direction: a reader thread stamps packets, a writer releases them."""

    def __init__(
        self,
        label: str,
        src: int,
        dst: int,
        delay_s: float,
        loss: float,
        rng: random.Random,
        realtime: bool,
    ) -> None:
        self.label = label
        self.realtime = realtime
        self.src, self.dst = src, dst
        self.delay_s, self.loss, self.rng = delay_s, loss, rng
        self.stats = DirectionStats()
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.closed = False
        self.errors: list[BaseException] = []
        self.wake_r, self.wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.threads = [
            threading.Thread(
                target=self._guard(self._reader), name=f"delay-rd-{label}", daemon=True
            ),
            threading.Thread(
                target=self._guard(self._writer), name=f"delay-wr-{label}", daemon=True
            ),
        ]

    def _guard(self, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as e:
                self.errors.append(e)

        return run

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _reader(self) -> None:
        _tune_forwarder_thread(self.realtime)
        poller = select.poll()
        poller.register(self.src, select.POLLIN)
        poller.register(self.wake_r, select.POLLIN)
        while not self.stopping:
            events = poller.poll()
            if self.stopping:
                return
            if not any(fd == self.src for fd, _ in events):
                continue
            while True:
                try:
                    pkt = os.read(self.src, 65536)
                except BlockingIOError:
                    break
                now = time.monotonic()
                self.stats.read += 1
                if self.loss and self.rng.random() < self.loss:
                    self.stats.dropped += 1
                    continue
                with self.cond:
                    self.queue.append((now + self.delay_s, pkt))
                    self.cond.notify()

    def _writer(self) -> None:
        _tune_forwarder_thread(self.realtime)
        while True:
            with self.cond:
                while not self.queue and not self.stopping:
                    self.cond.wait()
                if self.stopping:
                    return
                deadline, pkt = self.queue[0]
            # The queue is in deadline order (constant delay, FIFO), so only
            # the head matters; later arrivals never need an earlier wake-up.
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or self.stopping:
                    break
                time.sleep(min(left, 0.05))
            if self.stopping:
                return
            with self.cond:
                self.queue.popleft()
            late = time.monotonic() - deadline
            try:
                os.write(self.dst, pkt)
            except OSError:
                self.stats.write_errors += 1
                continue
            self.stats.forwarded += 1
            self.stats.total_late_s += late
            self.stats.max_late_s = max(self.stats.max_late_s, late)

    def stop(self, timeout: float) -> None:
        if self.closed:
            return
        self.stopping = True
        with self.cond:
            self.cond.notify_all()
        with contextlib.suppress(BlockingIOError):
            os.write(self.wake_w, b"x")
        deadline = time.monotonic() + timeout
        for t in self.threads:
            if t.ident is not None:
                t.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self.threads if t.is_alive()]
        if alive:
            raise TimeoutError(f"delay line threads did not stop: {alive}")
        self.closed = True
        self.stats.unsent = len(self.queue)
        os.close(self.wake_r)
        os.close(self.wake_w)


def _configure_tun(
    ifname: str,
    local: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address],
    remote: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address],
    mtu: int,
    timeout: float,
) -> None:
    with IPRoute() as ipr:
        (idx,) = ipr.link_lookup(ifname=ifname)
        ipr.link("set", index=idx, mtu=mtu)
        for addr in local:
            _add_addr(ipr, idx, ipaddress.ip_interface(addr))
        ipr.link("set", index=idx, state="up")
        for addr in remote:
            ipr.route(
                "add",
                dst=str(addr),
                dst_len=addr.max_prefixlen,
                oif=idx,
                scope=_RT_SCOPE_LINK,
                family=socket.AF_INET if addr.version == 4 else socket.AF_INET6,
            )

        def ready() -> bool:
            return _link_ready(ipr, ifname, False) and _addrs_ready(
                ipr, idx, [str(a) for a in local]
            )

        wait_until(ready, timeout=timeout, what=f"{ifname} ready")


class DelayLine(_Running):
    """Two namespaces joined through TUN devices with a fixed one-way delay.

    ``ns_a`` gets ``addr_a`` (and ``addr6_a``) on its TUN device and a host
    route to ``addr_b`` (``addr6_b``) through it; ``ns_b`` the mirror image.
    Forwarder threads in this process copy packets between the two TUN fds,
    releasing each one ``delay_s`` after it was read, so a TCP connection
    between ``addr_a`` and ``addr_b`` sees an RTT of ``2 * delay_s`` plus
    roughly 0.1-0.3 ms (thread wake-ups, the echo server). ``loss`` drops
    that share of packets (per direction, decided by ``random.Random``
    seeded from ``seed``); the counts are in :attr:`stats`,
    :attr:`forwarded` and :attr:`dropped`.

    Addresses are bare (``"10.242.0.1"``); use ones outside any veth subnet
    in the same namespaces. Counts include the odd IPv6 control packet (MLD,
    router solicitation) that the kernel sends on the devices.

    Timing: the forwarder threads run with 1 ns timer slack and, with
    ``realtime`` (default) and root, SCHED_FIFO, so other processes' CPU load
    does not delay them. They share the GIL with the test, though: while a
    delay line runs, the interpreter's switch interval is lowered to
    ``switch_interval`` (restored afterwards), which bounds what a thread
    spinning in Python can add; still, keep CPU-bound Python out of the test
    process while measuring RTT.
    """

    def __init__(
        self,
        ns_a: Netns | str,
        ns_b: Netns | str,
        delay_s: float,
        addr_a: str | None,
        addr_b: str | None,
        addr6_a: str | None = None,
        addr6_b: str | None = None,
        loss: float = 0.0,
        seed: int = 0,
        *,
        mtu: int = 1500,
        timeout: float = 5.0,
        realtime: bool = True,
        switch_interval: float = 0.0005,
    ) -> None:
        if delay_s < 0:
            raise ValueError("delay_s must be >= 0")
        if not 0.0 <= loss < 1.0:
            raise ValueError("loss must be in [0, 1)")
        if (addr_a is None) != (addr_b is None) or (addr6_a is None) != (addr6_b is None):
            raise ValueError("addresses come in pairs (a and b)")
        if addr_a is None and addr6_a is None:
            raise ValueError("need an IPv4 or an IPv6 address pair")
        self.ns_a, self.ns_b = _ns_name(ns_a), _ns_name(ns_b)
        self.delay_s, self.loss, self.seed = delay_s, loss, seed
        self.mtu, self.timeout = mtu, timeout
        self.realtime, self.switch_interval = realtime, switch_interval
        self._switch_held = False
        self.local_a = [ipaddress.ip_address(x) for x in (addr_a, addr6_a) if x is not None]
        self.local_b = [ipaddress.ip_address(x) for x in (addr_b, addr6_b) if x is not None]
        self.addr_a, self.addr_b = addr_a, addr_b
        self.addr6_a, self.addr6_b = addr6_a, addr6_b
        self.ifname_a = self.ifname_b = ""
        self._fds: list[int] = []
        self._dirs: list[_Direction] = []
        self._running = False

    @property
    def stats(self) -> dict[str, DirectionStats]:
        """Per-direction counters, keys ``"a->b"`` and ``"b->a"``."""
        return {d.label: d.stats for d in self._dirs}

    @property
    def forwarded(self) -> int:
        return sum(d.stats.forwarded for d in self._dirs)

    @property
    def dropped(self) -> int:
        return sum(d.stats.dropped for d in self._dirs)

    def start(self) -> Self:
        if self._running or self._fds:
            raise RuntimeError("delay line already started")
        n = _next_id()
        try:
            fd_a, self.ifname_a = run_in_netns(self.ns_a, _open_tun, f"ebd{n}a")
            self._fds.append(fd_a)
            fd_b, self.ifname_b = run_in_netns(self.ns_b, _open_tun, f"ebd{n}b")
            self._fds.append(fd_b)
            deadline = time.monotonic() + self.timeout
            run_in_netns(
                self.ns_a, _configure_tun, self.ifname_a, self.local_a, self.local_b,
                self.mtu, self.timeout,
            )  # fmt: skip
            run_in_netns(
                self.ns_b, _configure_tun, self.ifname_b, self.local_b, self.local_a,
                self.mtu, max(0.1, deadline - time.monotonic()),
            )  # fmt: skip
            # Both ends are up before anything is forwarded, so no packet is
            # written to a device that is still down; what the kernel sent
            # meanwhile waits in the TUN queue and goes through normally.
            self._dirs = [
                _Direction("a->b", fd_a, fd_b, self.delay_s, self.loss,
                           random.Random(f"{self.seed}:a->b"), self.realtime),
                _Direction("b->a", fd_b, fd_a, self.delay_s, self.loss,
                           random.Random(f"{self.seed}:b->a"), self.realtime),
            ]  # fmt: skip
            self._running = True
            _SwitchInterval.acquire(self.switch_interval)
            self._switch_held = True
            for d in self._dirs:
                d.start()
        except BaseException:
            with contextlib.suppress(Exception):
                self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the forwarders and close the TUN fds (which deletes the devices)."""
        errors: list[BaseException] = []
        try:
            for d in self._dirs:
                try:
                    d.stop(self.timeout)
                except BaseException as e:
                    errors.append(e)
                errors.extend(d.errors)
                d.errors.clear()
        finally:
            self._running = False
            if self._switch_held:
                self._switch_held = False
                _SwitchInterval.release()
            for fd in self._fds:
                os.close(fd)
            self._fds = []
        if errors:
            raise errors[0]


# --------------------------------------------------------------------------
# TCP_INFO

# struct tcp_info offsets (include/uapi/linux/tcp.h); stable ABI.
_TCPI_LEN = 232
_TCPI_OFFSETS = {
    "state": (0, "B"),
    "retransmits": (2, "B"),
    "rto_us": (8, "I"),
    "unacked": (24, "I"),
    "lost": (32, "I"),
    "retrans": (36, "I"),
    "rtt_us": (68, "I"),
    "rttvar_us": (72, "I"),
    "snd_cwnd": (80, "I"),
    "total_retrans": (100, "I"),
    "segs_out": (136, "I"),
    "segs_in": (140, "I"),
    "min_rtt_us": (148, "I"),
}


@dataclass(frozen=True)
class TcpInfo:
    """The parts of ``struct tcp_info`` the tests use (times in microseconds)."""

    state: int
    retransmits: int
    rto_us: int
    unacked: int
    lost: int
    retrans: int
    rtt_us: int
    rttvar_us: int
    snd_cwnd: int
    total_retrans: int
    segs_out: int
    segs_in: int
    min_rtt_us: int

    @classmethod
    def from_bytes(cls, raw: bytes) -> TcpInfo:
        vals: dict[str, int] = {}
        for name, (off, fmt) in _TCPI_OFFSETS.items():
            size = struct.calcsize(fmt)
            vals[name] = struct.unpack_from(fmt, raw, off)[0] if len(raw) >= off + size else 0
        return cls(**vals)


def tcp_info(sock: socket.socket) -> TcpInfo:
    """``getsockopt(TCP_INFO)`` of a TCP socket."""
    return TcpInfo.from_bytes(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCPI_LEN))


# --------------------------------------------------------------------------
# TCP echo server


Endpoint: TypeAlias = tuple[str, int]


def norm_addr(addr: str) -> str:
    """The kernel's spelling of an address (``inet_ntop``), as used in keys.

    IPv6 is compressed; IPv4-mapped IPv6 stays ``::ffff:a.b.c.d``.
    """
    ip = ipaddress.ip_address(addr)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return f"::ffff:{ip.ipv4_mapped}"
    return ip.compressed


def _endpoint(sockaddr: Any) -> Endpoint:
    return norm_addr(sockaddr[0]), int(sockaddr[1])


class TcpEchoServer(_Running):
    """A TCP echo server listening on ``addr`` in ``ns`` (``.port`` once started).

    ``addr`` may be a wildcard: ``"0.0.0.0"``, or ``"::"`` for both families.
    One selector thread serves every connection, echoing bytes as they come.
    ``peers`` collects the remote endpoints it accepted.
    """

    def __init__(self, ns: Netns | str, addr: str, port: int = 0, backlog: int = 1024) -> None:
        self.ns = _ns_name(ns)
        self.addr = norm_addr(addr)
        self._want_port = port
        self.backlog = backlog
        self.port = 0
        self.accepted = 0
        self.bytes_echoed = 0
        self.peers: list[Endpoint] = []
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: NetnsThread[None] | None = None

    def start(self) -> Self:
        ip = ipaddress.ip_address(self.addr)
        family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
        lst = _socket_in(self.ns, family)
        try:
            lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                lst.setsockopt(
                    socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if ip.is_unspecified else 1
                )
            lst.bind((self.addr, self._want_port))
            lst.listen(self.backlog)
            lst.setblocking(False)
            self.port = lst.getsockname()[1]
            self._wake_r, self._wake_w = socket.socketpair()
        except BaseException:
            lst.close()
            raise
        self._listener = lst
        self._thread = NetnsThread(self.ns, self._serve, name=f"echo:{self.ns}:{self.port}")
        self._thread.start()
        return self

    def _serve(self, stop: threading.Event) -> None:
        assert self._listener is not None and self._wake_r is not None
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ, None)
        sel.register(self._wake_r, selectors.EVENT_READ, None)
        pending: dict[socket.socket, bytearray] = {}
        try:
            while not stop.is_set():
                for key, events in sel.select():
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if sock is self._wake_r:
                        continue
                    if sock is self._listener:
                        self._accept(sel, pending)
                        continue
                    if events & selectors.EVENT_READ:
                        self._on_read(sel, sock, pending)
                    if sock in pending and events & selectors.EVENT_WRITE:
                        self._flush(sel, sock, pending)
        finally:
            for sock in pending:
                sock.close()
            sel.close()

    def _accept(self, sel: selectors.BaseSelector, pending: dict[socket.socket, bytearray]) -> None:
        while True:
            try:
                conn, peer = self._listener.accept()  # type: ignore[union-attr]
            except BlockingIOError:
                return
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.accepted += 1
            self.peers.append(_endpoint(peer))
            pending[conn] = bytearray()
            sel.register(conn, selectors.EVENT_READ)

    def _on_read(
        self,
        sel: selectors.BaseSelector,
        sock: socket.socket,
        pending: dict[socket.socket, bytearray],
    ) -> None:
        try:
            data = sock.recv(262144)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            sel.unregister(sock)
            del pending[sock]
            sock.close()
            return
        pending[sock] += data
        self._flush(sel, sock, pending)

    def _flush(
        self,
        sel: selectors.BaseSelector,
        sock: socket.socket,
        pending: dict[socket.socket, bytearray],
    ) -> None:
        buf = pending[sock]
        try:
            n = sock.send(buf) if buf else 0
        except BlockingIOError:
            n = 0
        except OSError:
            sel.unregister(sock)
            del pending[sock]
            sock.close()
            return
        del buf[:n]
        self.bytes_echoed += n
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if buf else 0)
        if sel.get_key(sock).events != want:
            sel.modify(sock, want)

    def stop(self) -> None:
        try:
            if self._thread is not None:
                self._thread.stop_event.set()
                if self._wake_w is not None:
                    self._wake_w.send(b"x")
                self._thread.stop()
        finally:
            self._thread = None
            for s in (self._listener, self._wake_r, self._wake_w):
                if s is not None:
                    s.close()
            self._listener = self._wake_r = self._wake_w = None


# --------------------------------------------------------------------------
# TCP ping-pong client


@dataclass(frozen=True)
class PingPongResult:
    """One connection's outcome so far; ``info`` was read at the end of the run."""

    exchanges: int
    local: Endpoint
    remote: Endpoint
    info: TcpInfo
    elapsed_s: float

    @property
    def rtt_us(self) -> int:
        """The kernel's smoothed RTT (``tcpi_rtt``), microseconds."""
        return self.info.rtt_us


@dataclass
class _Conn:
    sock: socket.socket
    remote: Endpoint
    started: float
    exchanges: int = 0
    todo: int = 0
    received: int = 0
    out: memoryview = field(default_factory=lambda: memoryview(b""))


class TcpPingPong:
    """Open TCP connections from ``ns`` and drive request/response traffic.

    One connection per ``targets`` entry (``(addr, port)``, optionally bound
    to ``sources[i]``), all established on enter and closed on exit, so the
    sockets can be inspected (:func:`sock_diag_rtts`) between runs::

        with TcpPingPong(ns_a, [(addr, srv.port)]) as pp:
            (res,) = pp.run(100)
            assert sock_diag_rtts(ns_a)[res.local, res.remote] == ...

    :meth:`run` does ``count`` round trips of ``size`` bytes on every
    connection at once (one selector, no threads), each waiting for the whole
    echoed response before the next request.
    """

    def __init__(
        self,
        ns: Netns | str,
        targets: Sequence[Endpoint],
        size: int = 64,
        *,
        sources: Sequence[str | None] | None = None,
        timeout: float = 10.0,
    ) -> None:
        if size < 1:
            raise ValueError("size must be >= 1")
        if sources is not None and len(sources) != len(targets):
            raise ValueError("sources must match targets one to one")
        self.ns = _ns_name(ns)
        self.targets = [(norm_addr(a), p) for a, p in targets]
        self.sources: Sequence[str | None] = (
            sources if sources is not None else [None] * len(targets)
        )
        self.size, self.timeout = size, timeout
        self._payload = memoryview(bytes(i & 0xFF for i in range(size)))
        self._conns: list[_Conn] = []

    @property
    def sockets(self) -> list[socket.socket]:
        return [c.sock for c in self._conns]

    def open(self) -> Self:
        deadline = time.monotonic() + self.timeout
        try:
            for (addr, port), src in zip(self.targets, self.sources, strict=True):
                ip = ipaddress.ip_address(addr)
                sock = _socket_in(self.ns, socket.AF_INET if ip.version == 4 else socket.AF_INET6)
                self._conns.append(_Conn(sock, (addr, port), time.monotonic()))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if src is not None:
                    sock.bind((src, 0))
                sock.setblocking(False)
                err = sock.connect_ex((addr, port))
                if err not in (0, errno.EINPROGRESS):
                    raise OSError(err, f"connect to {addr}:{port}: {os.strerror(err)}")
            with selectors.DefaultSelector() as sel:
                for c in self._conns:
                    sel.register(c.sock, selectors.EVENT_WRITE, c)
                waiting = len(self._conns)
                while waiting:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"{waiting} connections not established")
                    for key, _ in sel.select(left):
                        c = key.data
                        err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        if err:
                            raise OSError(err, f"connect to {c.remote}: {os.strerror(err)}")
                        sel.unregister(c.sock)
                        waiting -= 1
        except BaseException:
            self.close()
            raise
        return self

    def run(self, count: int, timeout: float | None = None) -> list[PingPongResult]:
        """``count`` more round trips on every connection; results in target order."""
        if count < 1:
            raise ValueError("count must be >= 1")
        if not self._conns:
            raise RuntimeError("not open")
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        size = self.size
        with selectors.DefaultSelector() as sel:
            for c in self._conns:
                c.todo, c.received, c.out = count, 0, self._payload
                sel.register(c.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, c)
            remaining = len(self._conns)
            while remaining:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"tcp ping-pong: {remaining}/{len(self._conns)} connections unfinished"
                    )
                for key, events in sel.select(left):
                    c = key.data
                    assert isinstance(c, _Conn)
                    if events & selectors.EVENT_WRITE and c.out:
                        with contextlib.suppress(BlockingIOError):
                            c.out = c.out[c.sock.send(c.out) :]
                    if events & selectors.EVENT_READ:
                        try:
                            data = c.sock.recv(size - c.received)
                        except BlockingIOError:
                            data = None
                        if data is not None:
                            if not data:
                                raise ConnectionError(
                                    f"{c.remote} closed after {c.exchanges} exchanges"
                                )
                            c.received += len(data)
                    if c.received == size and not c.out:
                        c.exchanges += 1
                        c.todo -= 1
                        c.received = 0
                        if c.todo == 0:
                            sel.unregister(c.sock)
                            remaining -= 1
                            continue
                        c.out = self._payload
                    want = selectors.EVENT_READ | (selectors.EVENT_WRITE if c.out else 0)
                    if key.events != want:
                        sel.modify(c.sock, want, c)
        now = time.monotonic()
        return [
            PingPongResult(
                exchanges=c.exchanges,
                local=_endpoint(c.sock.getsockname()),
                remote=c.remote,
                info=tcp_info(c.sock),
                elapsed_s=now - c.started,
            )
            for c in self._conns
        ]

    def close(self) -> None:
        for c in self._conns:
            c.sock.close()
        self._conns = []

    def __enter__(self) -> Self:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def tcp_pingpong_many(
    ns: Netns | str,
    targets: Sequence[Endpoint],
    count: int,
    size: int = 64,
    *,
    sources: Sequence[str | None] | None = None,
    timeout: float = 10.0,
) -> list[PingPongResult]:
    """Concurrent ping-pong connections, one per target, closed afterwards.

    See :class:`TcpPingPong`; ``timeout`` bounds connecting and running each.
    """
    with TcpPingPong(ns, targets, size, sources=sources, timeout=timeout) as pp:
        return pp.run(count)


def tcp_pingpong(
    ns: Netns | str,
    addr: str,
    port: int,
    count: int,
    size: int = 64,
    *,
    source: str | None = None,
    timeout: float = 10.0,
) -> PingPongResult:
    """One connection from ``ns`` doing ``count`` request/response round trips.

    Returns the exchange count and the socket's ``TCP_INFO`` (``.rtt_us`` is
    ``tcpi_rtt``) read before closing.
    """
    return tcp_pingpong_many(ns, [(addr, port)], count, size, sources=[source], timeout=timeout)[0]


# --------------------------------------------------------------------------
# the namespace's own SNMP counters


def net_counter(ns: Netns | str, name: str) -> int:
    """A counter of a namespace's /proc/net/snmp or netstat, as "Tcp:RetransSegs"
    or "TcpExt:TCPRetransFail" (/proc/thread-self/net: the thread's netns)."""
    group, field_name = name.split(":")

    def read() -> int:
        for path in ("/proc/thread-self/net/snmp", "/proc/thread-self/net/netstat"):
            with open(path) as f:
                rows = [line.split() for line in f if line.startswith(group + ":")]
            if rows and field_name in rows[0]:
                return int(rows[1][rows[0].index(field_name)])
        raise KeyError(name)

    return run_in_netns(ns, read)


# --------------------------------------------------------------------------
# sock_diag


def _diag_dump(families: Sequence[int], states: int) -> list[tuple[Endpoint, Endpoint, TcpInfo]]:
    out: list[tuple[Endpoint, Endpoint, TcpInfo]] = []
    with DiagSocket() as ds:
        ds.bind()
        for family in families:
            msgs = ds.get_sock_stats(
                family=family, states=states, extensions=1 << (_INET_DIAG_INFO - 1)
            )
            for msg in msgs:
                info = msg.get_attr("INET_DIAG_INFO")
                if info is None:
                    continue
                vals = {name: info.get(f"tcpi_{name.removesuffix('_us')}", 0) or 0
                        for name in _TCPI_OFFSETS}  # fmt: skip
                local = (norm_addr(msg["idiag_src"]), msg["idiag_sport"])
                remote = (norm_addr(msg["idiag_dst"]), msg["idiag_dport"])
                out.append((local, remote, TcpInfo(**vals)))
    return out


def sock_diag_tcp_info(
    ns: Netns | str,
    *,
    family: int | None = None,
    states: int = 1 << _TCP_ESTABLISHED,
    local_port: int | None = None,
    remote_port: int | None = None,
) -> dict[tuple[Endpoint, Endpoint], TcpInfo]:
    """tcp_info of the TCP sockets in ``ns`` via sock_diag, keyed (local, remote).

    ``family`` is AF_INET, AF_INET6 or None for both; ``states`` a bitmask of
    ``1 << TCP_*`` states (default: established only). Addresses are in
    compressed form, IPv4 clients of a dual-stack listener as ``::ffff:a.b.c.d``.
    """
    families = [family] if family is not None else [socket.AF_INET, socket.AF_INET6]
    rows = run_in_netns(ns, _diag_dump, families, states)
    return {
        (local, remote): info
        for local, remote, info in rows
        if (local_port is None or local[1] == local_port)
        and (remote_port is None or remote[1] == remote_port)
    }


def sock_diag_rtts(
    ns: Netns | str,
    *,
    family: int | None = None,
    local_port: int | None = None,
    remote_port: int | None = None,
) -> dict[tuple[Endpoint, Endpoint], int]:
    """``tcpi_rtt`` (microseconds) of established TCP sockets in ``ns``.

    Keyed by ((local_addr, local_port), (remote_addr, remote_port)).
    """
    infos = sock_diag_tcp_info(ns, family=family, local_port=local_port, remote_port=remote_port)
    return {k: v.rtt_us for k, v in infos.items()}
