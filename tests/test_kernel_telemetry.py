"""Retransmits, drops, run-queue latency, CPU and events against ground truth
from outside the agent: the kernel's own SNMP counters, /proc/stat,
/proc/<tid>/schedstat, packets the test sends itself."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pytest

from agentlab import EMULATED, EventDrain, attach, cli, peer_id
from ebpf_telemetry import btf, facts, loader
from ebpf_telemetry.events import Lease
from ebpf_telemetry.maps import Pins
from ebpf_telemetry.snapshot import HOST, Window, take
from netlab import (
    DelayLine,
    Netns,
    TcpEchoServer,
    TcpPingPong,
    net_counter,
    run_in_netns,
    sock_diag_tcp_info,
    tcp_pingpong,
    veth_pair,
    wait_until,
)

# TCP states that can still send a retransmit (not LISTEN, FIN_WAIT2, TIME_WAIT, CLOSE)
RETRANSMITTING = sum(1 << st for st in (1, 2, 3, 4, 8, 9, 11))


def busy_sockets(ns: Netns) -> list[Any]:
    return list(sock_diag_tcp_info(ns, states=RETRANSMITTING))


def retrans_counters(ns: Netns) -> tuple[int, int]:
    """(TcpRetransSegs, TCPRetransFail) of a namespace."""
    return net_counter(ns, "Tcp:RetransSegs"), net_counter(ns, "TcpExt:TCPRetransFail")


@pytest.mark.matrix
@pytest.mark.parametrize(
    "forced", [pytest.param(None, marks=pytest.mark.smoke), "tracepoint:tcp_retransmit_skb:2"]
)
def test_retransmits_equal_kernel_snmp(make_config: Any, forced: str | None) -> None:
    # forced: the program for kernels whose tracepoint passes no `err` (and
    # fires only for retransmits that went out); on a kernel that does pass
    # err, the tracepoint also fires for failed attempts, which it then counts
    kernel = facts.read().without(forced) if forced else None
    with (
        Netns("a") as a,
        Netns("b") as b,
        DelayLine(a, b, 0.001, "10.243.0.1", "10.243.0.2", loss=0.15, seed=7),
    ):
        cfg = make_config(peers={"a": ["10.243.0.1/32"], "b": ["10.243.0.2/32"]})
        with attach(cfg, kernel) as pins:
            before = take(pins), retrans_counters(a), retrans_counters(b)
            # emulated, a round trip through the userspace delay line with its
            # RTOs takes long enough that 4 x 60 ran past the ping-pong's bound
            rounds, timeout = (2, 240) if EMULATED else (4, 60)
            with TcpEchoServer(b, "10.243.0.2") as srv:
                for _ in range(rounds):
                    tcp_pingpong(a, "10.243.0.2", srv.port, 60, size=3000, timeout=timeout)
            # closing connections retransmit their FINs after the exchange
            wait_until(lambda: not busy_sockets(a) and not busy_sockets(b), 2 * timeout, 0.1)
            after = take(pins), retrans_counters(a), retrans_counters(b)
    w = Window(before[0], after[0])
    ours = (
        w.node(peer_id(after[0], "b")).retrans_count,  # sent by a's sockets, to b
        w.node(peer_id(after[0], "a")).retrans_count,
    )
    snmp = tuple(after[i][0] - before[i][0] for i in (1, 2))
    failed = tuple(after[i][1] - before[i][1] for i in (1, 2))
    # runs the kernel skipped: a retransmit from a timer that interrupted the
    # program on its CPU (ebpf_bpf_misses_total)
    missed = sum(after[0].misses.get(p, 0) - before[0].misses.get(p, 0) for p in after[0].misses)
    print(
        f"\nretransmits: ours a->b, b->a {ours}; TcpRetransSegs {snmp}; "
        f"TCPRetransFail {failed}; runs skipped {missed}"
    )
    assert sum(snmp) > 10  # the loss made some
    for mine, theirs, fail in zip(ours, snmp, failed, strict=True):
        if forced and has_err_arg():
            # a program for older kernels on this one: the tracepoint here also
            # fires for failed attempts, which it counts too; close, not equal
            assert abs(mine - theirs) <= max(3, 0.05 * theirs)
        else:
            # the same, but for a retransmit the device then refused (the kernel
            # counts it in RetransSegs before sending it, and in TCPRetransFail)
            # and runs the kernel skipped; on 6.17+ we saw up to 2 in ~150 more
            # go missing with neither (equal on 6.1 and 6.12): a tolerance of 2%
            assert theirs - fail - missed - max(2, theirs // 50) <= mine <= theirs
    assert w.node(0).retrans_count >= sum(ours)


def udp_send(ns: Netns, dst: str, port: int, count: int) -> None:
    def send() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _ in range(count):
                s.sendto(b"x", (dst, port))

    run_in_netns(ns, send)


@pytest.fixture
def drop_lab(make_config: Any) -> Iterator[tuple[Netns, Netns, Any, Pins]]:
    with Netns("a") as a, Netns("b") as b:
        veth = veth_pair(a, b, v6=None)
        with attach(make_config(peers={"a": [f"{veth.v4_a}/32"]})) as pins:
            yield a, b, veth, pins


def drops_by_name(pins: Pins) -> dict[str, int]:
    return btf.drops_by_name(pins.drops())


# Drops count for the whole host (no per-peer attribution): a drop elsewhere
# on the machine in the same second (a stray broadcast) can add to a reason.
NOISE = 3


def drop_delta(pins: Pins, d0: dict[str, int], reason: str) -> int:
    return drops_by_name(pins).get(reason, 0) - d0.get(reason, 0)


@pytest.mark.smoke
@pytest.mark.matrix
def test_drops_no_socket(drop_lab: Any) -> None:
    a, _, veth, pins = drop_lab
    # kernels before 5.17 pass no reason (drops variant tp_btf_noreason): every
    # drop counts as "unknown" there, and their BTF has no NO_SOCKET
    reason = "NO_SOCKET" if "NO_SOCKET" in btf.drop_reasons().values() else "unknown"
    before, d0 = take(pins), drops_by_name(pins)
    udp_send(a, veth.v4_b, 9, 37)  # nothing listens on udp/9 in b
    wait_until(lambda: drop_delta(pins, d0, reason) >= 37, timeout=5)
    after = take(pins)
    # "unknown" holds every drop of the machine, not only this socket's kind
    noise = NOISE if reason == "NO_SOCKET" else 20
    assert 37 <= drop_delta(pins, d0, reason) <= 37 + noise
    host = after.node(HOST).drop_count - before.node(HOST).drop_count
    # the host's count and the reasons' are read a moment apart (seen under
    # TCG: a stray drop between the two reads)
    by_reason = sum(after.drops.values()) - sum(before.drops.values())
    assert host >= 37 and abs(host - by_reason) <= NOISE


def test_drops_netfilter(drop_lab: Any) -> None:
    a, b, veth, pins = drop_lab
    rules = (
        "table inet ebt {\n chain input {\n  type filter hook input priority 0;\n"
        "  udp dport 4444 drop\n }\n}\n"
    )
    run_in_netns(b, subprocess.run, ["nft", "-f", "-"], input=rules, text=True, check=True)
    d0 = drops_by_name(pins)
    udp_send(a, veth.v4_b, 4444, 23)
    wait_until(lambda: drop_delta(pins, d0, "NETFILTER_DROP") >= 23, 5)
    assert 23 <= drop_delta(pins, d0, "NETFILTER_DROP") <= 23 + NOISE


def test_drop_reason_names_come_from_kernel_btf() -> None:
    names = btf.drop_reasons()
    assert names[0] == "NOT_DROPPED_YET"
    assert "NO_SOCKET" in names.values() and "NETFILTER_DROP" in names.values()
    assert len(names) > 50


@pytest.mark.matrix
def test_subsystem_drop_reasons_are_named_from_btf() -> None:
    """Reasons of subsystems ((subsystem << 16) | code, 6.4+) take the name of
    the subsystem's own enum member, from its module's BTF once loaded, else
    SUBSYSTEM_code; never a bare number. (No subsystem drop can be caused
    here: the names are checked, the counting path by the kernel build.)"""
    code = 1  # OVS_DROP_LAST_ACTION since 6.4
    loaded = subprocess.run(["modprobe", "-q", "openvswitch"], check=False).returncode == 0
    with btf.vmlinux() as base:
        subsystems = btf.enum_values(base, "skb_drop_reason_subsys")
    ovs = {v for v, n in subsystems.items() if n == "SKB_DROP_REASON_SUBSYS_OPENVSWITCH"}
    if not ovs:  # before 6.4: no subsystems; such a value is only ever a number
        assert btf.drop_reason_name((5 << 16) | code) == f"SUBSYS_5_{code}"
        return
    value = (ovs.pop() << 16) | code
    ovs_btf = os.path.exists("/sys/kernel/btf/openvswitch")
    print(f"\nopenvswitch module loaded: {loaded}, its BTF: {ovs_btf}")
    name = btf.drop_reason_name(value)
    assert name == ("OVS_DROP_LAST_ACTION" if ovs_btf else f"OPENVSWITCH_{code}")


# -- scheduler ------------------------------------------------------------------------


def spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


@dataclass
class Sleeper:
    """A thread that sleeps 5 ms at a time, and its own schedstat read at the
    end between two clock readings (CLOCK_MONOTONIC, as the events' ktime)."""

    tid: int = 0
    before_ns: int = 0  # just before the read
    after_ns: int = 0  # just after
    runs: int = 0  # sched_info.pcount: the arrivals the scheduler counted
    run_delay_ns: int = 0  # sched_info.run_delay: their waits, summed

    def run(self, stop: threading.Event) -> None:
        self.tid = threading.get_native_id()
        while not stop.is_set():
            time.sleep(0.005)
        self.before_ns = time.monotonic_ns()
        with open("/proc/thread-self/schedstat") as f:  # consistent: it runs
            fields = f.read().split()
        self.after_ns = time.monotonic_ns()
        self.run_delay_ns, self.runs = int(fields[1]), int(fields[2])


def kernel_at_least(major: int, minor: int) -> bool:
    have = tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2])
    return have >= (major, minor)


def sched_info_counts_every_arrival() -> bool:
    """Before 5.14 sched_info_arrive() counted arrivals with no wait recorded
    too (last_queued 0): pcount >= the waits schedstat (and we) measure."""
    return not kernel_at_least(5, 14)


@dataclass
class Seen:
    """The sleeper's run-queue latency events (us, in arrival order) up to the
    end of its schedstat read; `sure` of them came before the read began (an
    arrival during the read may or may not be in it)."""

    us: list[int]
    sure: int


def runqlat_window(pins: Pins, seconds: float, busy: int) -> tuple[float, Sleeper, Seen]:
    """p50 (us) over a window with `busy` spinning processes, and a sleeper
    thread started after attach with what the collector saw of it."""
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=spin, args=(seconds + 1.0,)) for _ in range(busy)]
    for p in procs:
        p.start()
    stop, sl = threading.Event(), Sleeper()
    t = threading.Thread(target=sl.run, args=(stop,))
    with EventDrain(pins.pin_dir) as drain:
        time.sleep(0.2)  # let the load settle: what is measured is the window below
        before = take(pins)
        t.start()
        time.sleep(seconds)
        stop.set()
        t.join()
        after = take(pins)
        # events carry bpf_ktime_get_ns (CLOCK_MONOTONIC): wait until the drain is past the read
        wait_until(lambda: any(e.timestamp > sl.after_ns for e in drain.events[-50:]), 30)
    for p in procs:
        p.join()
    mine = sorted(
        (e.timestamp, e.value)
        for e in drain.events
        if e.event_type == 4 and e.extra_data == sl.tid and e.timestamp <= sl.after_ns
    )
    p50 = Window(before, after).runqlat_quantile_us(0.5)
    assert p50 is not None
    return p50, sl, Seen([us for _, us in mine], sum(1 for ts, _ in mine if ts <= sl.before_ns))


@pytest.mark.smoke
@pytest.mark.matrix
def test_runqueue_latency_equals_schedstat(make_config: Any) -> None:
    """The sleeper's events are its schedstat arrivals, one for one, each the
    wait sched_info_arrive() adds to its run delay: the collector reads the
    two values that function uses. Nothing here depends on timing: the same
    bounds hold under emulation."""
    with attach(make_config(sample_rate=1)) as pins:
        idle_p50, idle, ev_idle = runqlat_window(pins, 2.0, busy=0)
        load_p50, load, ev_load = runqlat_window(pins, 2.0, busy=2 * os.cpu_count())
        lost = pins.stats()["events_lost"]
    print(
        f"\nrunqlat p50 idle {idle_p50:.0f} us, {2 * os.cpu_count()} spinners {load_p50:.0f} us; "
        f"sleeper events/schedstat runs {len(ev_idle.us)}/{idle.runs} idle, "
        f"{len(ev_load.us)}/{load.runs} loaded; sum us/run_delay us "
        f"{sum(ev_idle.us)}/{idle.run_delay_ns / 1000:.0f} idle, "
        f"{sum(ev_load.us)}/{load.run_delay_ns / 1000:.0f} loaded; lost {lost}"
    )
    assert lost == 0
    for sl, seen in ((idle, ev_idle), (load, ev_load)):
        assert sl.runs > 50
        delay_us = sl.run_delay_ns / 1000
        if sched_info_counts_every_arrival():
            assert seen.sure <= sl.runs
            assert sum(seen.us[: seen.sure]) <= delay_us
            continue
        # equal in most runs. Under TCG, 6.12-rt and 7.3.4 once lost 7-56%:
        # the drain's 3 s lease lapsed (its thread went >2 s unpolled under
        # the spinners) and the kernel sent nothing; EventDrain's lease now
        # outlasts the test. On the host (6.18) under load, one arrival in
        # ~370 still had no event in some runs (no recursion miss, no ring
        # loss, no lease lapse; cause not found): never more events than
        # arrivals, at most 1% fewer
        assert seen.sure <= sl.runs <= len(seen.us) + sl.runs // 100
        # each event is floor(wait_ns / 1000) of a wait that run_delay holds;
        # run_delay also holds the part of a wait before a load-balancing
        # migration (sched_info_dequeue() adds it, no tracepoint sees it), so
        # the sum is a lower bound of it: equal to 0.1% idle, 5-25% under here
        assert sum(seen.us[: sl.runs]) <= delay_us
    if not EMULATED:
        # 100x and more on a real CPU; emulated (TCG), idle latency is already
        # 100-175 us and the ratio was seen from 1.5 to 4.9: host only
        assert load_p50 > 3 * idle_p50


def pinned_spin(cpu: int) -> None:
    """Spin on one CPU until terminated (no lock to check: it never sleeps)."""
    os.sched_setaffinity(0, {cpu})  # as `taskset -c CPU` would
    while True:
        pass


@pytest.mark.matrix
@pytest.mark.parametrize("busy", [0, 1, 2])
def test_cpu_utilization_follows_pinned_spinners(make_config: Any, busy: int) -> None:
    """`busy` spinners, each pinned to its own CPU since before attach: the
    ratio is busy / CPUs, give or take what the machine itself does. Truth
    from outside the agent (the spinners), not /proc/stat: that is now the
    agent's own source (cputime.py), comparing with it would test nothing."""
    ctx = multiprocessing.get_context("fork")
    cpus = sorted(os.sched_getaffinity(0))
    procs = [ctx.Process(target=pinned_spin, args=(c,)) for c in cpus[:busy]]
    for p in procs:
        p.start()
    try:
        with attach(make_config()) as pins:
            s0 = take(pins)
            time.sleep(2.0)  # the window measured, not a synchronisation
            s1 = take(pins)
    finally:
        for p in procs:
            p.terminate()
            p.join()
    ours = Window(s0, s1).cpu_utilization
    want = min(busy, len(cpus)) / len(cpus)
    print(f"\ncpu {busy} pinned spinners on {len(cpus)} CPUs: ours {ours:.3f}, expected {want:.3f}")
    # the machine's own work (and, in a TCG guest, its emulated interrupts)
    # adds a little busy time; a spinner can lose a little to interrupts
    assert ours is not None and want - 0.05 <= ours <= want + 0.15


# -- events -----------------------------------------------------------------------------


def test_sample_rate_100_sends_about_one_percent(make_config: Any) -> None:
    with Netns("a") as a, Netns("b") as b:
        veth = veth_pair(a, b, v6=None)
        with attach(make_config(sample_rate=100)) as pins, TcpEchoServer(b, veth.v4_b) as srv:
            lease = Lease(pins.pin_dir, seconds=60)  # a consumer that does not read
            before = take(pins)
            tcp_pingpong(a, veth.v4_b, srv.port, 2000)
            after = take(pins)
            lease.release()
    w = Window(before, after)
    samples = w.node(0).rtt_count
    sent = after.stats["sampled_rtt"] - before.stats["sampled_rtt"]
    # per-CPU 1-in-100 counters: at most one partial cycle per CPU either way
    assert samples >= 4000
    assert abs(sent - samples / 100) <= os.cpu_count() + 1, (sent, samples)


def test_sample_rate_100_sends_one_runqlat_event_in_100(make_config: Any) -> None:
    """The sched collector samples on its per-CPU runqlat_count (the count it
    keeps anyway, no sampling counter of its own): 1 arrival in 100 per CPU."""
    with attach(make_config(sample_rate=100)) as pins:
        lease = Lease(pins.pin_dir, seconds=60)  # a consumer that does not read
        before = take(pins)
        for _ in range(3000):
            time.sleep(0.0002)  # load, not synchronisation: each wakeup is an arrival
        after = take(pins)
        lease.release()
    samples = Window(before, after).node(0).runqlat_count
    sent = after.stats["sampled_runqlat"] - before.stats["sampled_runqlat"]
    # at most one partial cycle per CPU either way; the machine's other
    # switches between a snapshot's reads of the two maps: 5% of the events
    assert samples >= 3000
    assert abs(sent - samples / 100) <= os.cpu_count() + 1 + samples / 2000, (sent, samples)


def test_full_ring_buffer_counts_losses(make_config: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EBPF_TELEMETRY_RINGBUF_BYTES", str(16 * 4096))  # 64 KiB: ~1600 events
    with Netns("a") as a, Netns("b") as b:
        veth = veth_pair(a, b, v6=None)
        with attach(make_config(sample_rate=1)) as pins, TcpEchoServer(b, veth.v4_b) as srv:
            lease = Lease(pins.pin_dir, seconds=60)  # a consumer that does not read
            tcp_pingpong(a, veth.v4_b, srv.port, 3000)
            stats = pins.stats()
            lease.release()
    sent = sum(v for k, v in stats.items() if k.startswith("sampled_"))
    assert stats["events_lost"] > 1000
    assert 1000 < sent < 1700  # what fitted


def test_missing_tracepoint_skips_one_collector(make_config: Any) -> None:
    # a kernel without kfree_skb, simulated by the plan's own input
    kernel = facts.read().without("tracepoint:kfree_skb")
    cfg = make_config()
    state = {r.collector: r for r in loader.attach(cfg, kernel)}
    assert {c: r.variant for c, r in state.items()} == {
        "rtt": "tp_btf_cast" if "bpf_rdonly_cast" in kernel.kfuncs else "tp_btf",
        "retrans": "tp_btf_err" if has_err_arg() else "tp_btf",
        "drops": None,
        "sched": "rq_clock",
    }
    assert "lacks tracepoint kfree_skb(struct sk_buff *, void *" in state["drops"].why
    assert not os.path.exists(f"{cfg.pin_dir}/links/kfree_skb")
    assert os.path.exists(f"{cfg.pin_dir}/links/tcp_probe")


def has_err_arg() -> bool:
    return len(facts.read().tracepoints["tcp_retransmit_skb"]) >= 3


@pytest.mark.matrix
def test_drops_without_reason_count_as_unknown(make_config: Any) -> None:
    # kfree_skb before 5.17 passes no reason: the planner picks the program
    # that reads two arguments, and every drop counts under "unknown"
    kernel = facts.read().without("tracepoint:kfree_skb:2")
    with Netns("a") as a, Netns("b") as b:
        veth = veth_pair(a, b, v6=None)
        cfg = make_config(peers={"a": [f"{veth.v4_a}/32"]})
        state = {r.collector: r.variant for r in loader.attach(cfg, kernel)}
        assert state["drops"] == "tp_btf_noreason"
        with Pins(cfg.pin_dir) as pins:
            before = take(pins)
            udp_send(a, veth.v4_b, 9, 11)  # no socket on port 9: 11 drops
            wait_until(
                lambda: take(pins).node(HOST).drop_count - before.node(HOST).drop_count >= 11, 5
            )
            after = take(pins)
    assert 11 <= Window(before, after).node(HOST).drop_count <= 11 + NOISE
    assert set(btf.drops_by_name(after.drops)) == {"unknown"}


def test_no_consumer_sends_and_loses_nothing(make_config: Any) -> None:
    with Netns("a") as a, Netns("b") as b:
        veth = veth_pair(a, b, v6=None)
        with attach(make_config(sample_rate=1)) as pins, TcpEchoServer(b, veth.v4_b) as srv:
            before = take(pins)
            tcp_pingpong(a, veth.v4_b, srv.port, 3000)  # would fill a 64 KiB ring twice
            after = take(pins)
    w = Window(before, after)
    sent = {k: after.stats[k] - before.stats[k] for k in after.stats if k.startswith("sampled_")}
    assert w.node(0).rtt_count >= 6000
    assert set(sent.values()) == {0} and after.stats["events_lost"] == 0, sent


@pytest.mark.matrix
def test_events_cli_gets_n_and_a_killed_one_stops_events(make_config: Any) -> None:
    with Netns("a") as a, Netns("b") as b:
        veth = veth_pair(a, b, v6=None)
        cfg = make_config(sample_rate=1)
        with (
            attach(cfg) as pins,
            TcpEchoServer(b, veth.v4_b) as srv,
            TcpPingPong(a, [(veth.v4_b, srv.port)]) as pp,
        ):
            stop = threading.Event()
            traffic = threading.Thread(target=lambda: [pp.run(20) for _ in iter(stop.is_set, True)])
            traffic.start()
            try:
                t0 = time.time()
                r = cli("events", "--pin-dir", cfg.pin_dir, "--type", "rtt", "--count", "50")
                t1 = time.time()
                lines = [json.loads(x) for x in r.stdout.splitlines()]
                assert r.returncode == 0 and len(lines) == 50, r.stderr
                assert {x["type"] for x in lines} == {"rtt"}
                # wall-clock time: sent while the command held its lease
                walls = [datetime.fromisoformat(x["time"]).timestamp() for x in lines]
                assert all(t0 - 0.001 <= w <= t1 for w in walls), (t0, walls, t1)
                assert all(x["time"].endswith("Z") for x in lines)
                assert {x["peer"] for x in lines} <= {veth.v4_a, veth.v4_b}, lines[:3]
                proc = subprocess.Popen(
                    [sys.executable, "-m", "ebpf_telemetry", "events", "--pin-dir", cfg.pin_dir],
                    stdout=subprocess.DEVNULL,
                )
                start = sent(pins)
                slow = 60 if EMULATED else 10  # starting the CLI takes long emulated
                wait_until(lambda: sent(pins) > start + 100, slow)  # it streams
                proc.kill()  # no chance to give its lease back
                proc.wait()
                killed = time.monotonic()
                wait_until(unchanged(lambda: sent(pins)), slow, interval=0.5, what="no events")
                stopped = time.monotonic() - killed
                rtt = take(pins).node(0).rtt_count
                settled = sent(pins)
                wait_until(lambda: take(pins).node(0).rtt_count > rtt + 200, slow)
                assert sent(pins) == settled  # traffic goes on, events do not
            finally:
                stop.set()
                traffic.join()
    print(f"\nevents stopped {stopped:.1f} s after kill -9 of the consumer")
    assert stopped <= (30.0 if EMULATED else 5.0)  # the lease: 3 s, then polls


def sent(pins: Pins) -> int:
    return sum(v for k, v in pins.stats().items() if k.startswith("sampled_"))


def unchanged(read: Any) -> Any:
    """A condition that holds once read() returns the same as at the last poll."""
    last: list[int] = []

    def cond() -> bool:
        v = read()
        same = bool(last) and last[-1] == v
        last.append(v)
        return same

    return cond
