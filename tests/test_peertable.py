"""The peer table's owner (peertable.py): its invariants hold after real
traffic, broken states written into the maps (the end states of races and
of interrupted steps, as earlier releases could leave them) are repaired and
counted, and nothing reaches the textfile as a mixed count. Also: one agent
per pin dir, one events consumer, unload under an agent, and a reload that
cannot be applied. Each test here fails on the release before peertable.py
(which had none of this: ids freed twice, a second agent switching modes,
an agent exporting frozen counters after unload)."""

from __future__ import annotations

import ipaddress
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agentlab import EMULATED, EventDrain, attach, cli
from ebpf_telemetry import loader, peertable, plan
from ebpf_telemetry.binding import ffi, lib
from ebpf_telemetry.config import Config
from ebpf_telemetry.maps import Pins
from ebpf_telemetry.nodes import peer_key
from netlab import Netns, TcpEchoServer, tcp_pingpong_many, veth_pair, wait_until
from test_peers import Cycles, labels
from test_reliability import AgentProc, one_error_line, toml, value

MAX = 8  # a small table: every id is looked at


def pool_of(pins: Pins) -> list[int]:
    """The free pool's ids, head first; put back as they were."""
    pool = pins["peer_free_map"]
    ids = pool.drain()
    for i in ids:
        pool.push(i)
    return ids


def flags(pins: Pins) -> dict[int, int]:
    """id -> its flags, for every peer id in use (1..max_peers)."""
    n, infos = pins["peer_info_map"].array_rows()
    return {i: int(infos[i].flags) for i in range(1, n - 1) if infos[i].flags}


def assert_invariants(pins: Pins, cfg: Config) -> None:
    """I1-I4 of peertable.py, read independently of its checker."""
    owners = peertable.owners(pins)
    f = flags(pins)
    assert all(len(a) == 1 and 1 <= i <= cfg.max_peers for i, a in owners.items()), owners
    auto = {i for i, fl in f.items() if fl & lib.PEER_AUTO}
    retiring = {i for i, fl in f.items() if fl & lib.PEER_RETIRING}
    assert auto == set(owners), (auto, owners)
    pool = Counter(pool_of(pins))
    assert max(pool.values(), default=1) == 1, pool
    assert not set(pool) & (auto | retiring)
    assert set(pool) | auto | retiring == set(range(1, cfg.max_peers + 1))


def mapped(addr: str) -> bytes:
    return b"\0" * 10 + b"\xff\xff" + ipaddress.IPv4Address(addr).packed


def set_info(pins: Pins, node: int, fl: int, addr: bytes = b"") -> None:
    pins["peer_info_map"].update(ffi.new("__u32 *", node), peertable._info(fl, addr=addr))


def map_address(pins: Pins, addr: str, node: int) -> None:
    key = peer_key(ipaddress.ip_network(f"{addr}/32"))
    pins["peer_addr_map"].update(key, ffi.new("__u32 *", node))


@pytest.fixture
def lab() -> Iterator[tuple[Netns, Netns, Any]]:
    with Netns("a") as a, Netns("b") as b:
        extra = [f"10.250.7.{i}" for i in range(1, 41)]
        yield a, b, veth_pair(a, b, v6=None, extra_b=extra), extra


# -- invariants and repairs ---------------------------------------------------------


@pytest.mark.matrix
def test_race_end_state_is_repaired_not_freed_twice(make_config: Any) -> None:
    """What a lost allocation race left before this release: id 3 described
    as an automatic peer, no address mapping to it, and id 3 in the pool.
    The release before freed it again at expiry: id 3 twice in the pool,
    then two peers in one row."""
    cfg = make_config(max_peers=MAX)
    with attach(cfg) as pins:
        set_info(pins, 3, lib.PEER_AUTO, mapped("10.250.9.9"))
        pins["peer_free_map"].push(3)  # already there once: now twice
        table = peertable.Checker()
        assert table.check(pins, cfg) == set()
        assert table.repairs == Counter(ghost=1, pool_duplicate=1), table.repairs
        assert_invariants(pins, cfg)
        # nothing left to repair: the next cycle finds the table whole
        assert table.check(pins, cfg) == set() and sum(table.repairs.values()) == 2


def test_a_refill_killed_halfway_loses_no_id(make_config: Any) -> None:
    """An agent killed while filling the pool (entering automatic peers)
    left it half full: the release before never looked again, so those ids
    were lost until an unload. The next agent's first check refills it."""
    cfg = make_config(max_peers=MAX)
    with attach(cfg) as pins:
        pool = pins["peer_free_map"]
        pool.drain()
        for i in range(1, MAX // 2 + 1):  # where the kill came
            pool.push(i)
        table = peertable.Checker()
        table.check(pins, cfg)
        assert table.repairs == Counter(pool_missing=MAX // 2), table.repairs
        assert_invariants(pins, cfg)


@pytest.mark.matrix
def test_a_shared_id_never_reaches_the_textfile(make_config: Any, lab: Any) -> None:
    """Two addresses mapped to one id (what the duplicate pool id of an earlier
    release led to): that id's counts are mixed, so its label is withheld,
    the id retired, and each address then takes an id of its own."""
    a, b, _, extra = lab
    first, second = extra[0], extra[1]
    c = Cycles(make_config(max_peers=MAX))
    try:
        with TcpEchoServer(b, "0.0.0.0") as srv:
            tcp_pingpong_many(a, [(first, srv.port)], 5)
            shared = labels(c.cycle())[first]
            # the broken state, as the kernel's second allocation of the
            # same id would leave it: the address claimed, the id described
            map_address(c.pins, second, shared)
            set_info(c.pins, shared, lib.PEER_AUTO, mapped(second))
            tcp_pingpong_many(a, [(second, srv.port)], 7)  # counts into the shared row
            snap = c.cycle()
            text = Path(c.agent.cfg.textfile).read_text()
            assert shared not in snap.peers and first not in labels(snap)
            assert f'peer="{first}"' not in text and f'peer="{second}"' not in text
            assert value(text, "ebpf_peer_table_repairs_total", kind="shared") == 1
            assert peertable.owners(c.pins).get(shared) is None  # retired
            tcp_pingpong_many(a, [(first, srv.port), (second, srv.port)], 3)
            snap = c.cycle()
        got = labels(snap)
        assert got[first] != got[second]
        assert snap.node(got[first]).rtt_count == snap.node(got[second]).rtt_count == 3
    finally:
        c.close()


def test_the_table_is_read_again_when_peer_info_changes(make_config: Any) -> None:
    """check() reads peer_addr_map again only after peer_info_map changed
    (every allocation and every repair writes it) or when the last read is
    older than full_read_ns: a hash-only change (a hand from outside) is
    found then, and by the first check of every new Checker."""
    cfg = make_config(max_peers=MAX)
    with attach(cfg) as pins:
        table = peertable.Checker()
        table.check(pins, cfg)
        reads = table.table_reads
        assert table.check(pins, cfg) == set() and table.table_reads == reads  # nothing moved
        map_address(pins, "10.250.9.1", 5)  # the hash alone: not read yet
        map_address(pins, "10.250.9.2", 5)
        assert table.check(pins, cfg) == set() and table.table_reads == reads
        table.full_read_ns = 0  # the period over: read, found, retired
        assert table.check(pins, cfg) == {5} and table.table_reads == reads + 1
        assert table.repairs["shared"] == 1
        table.full_read_ns = int(peertable.FULL_READ_SECONDS * 1e9)
        assert table.check(pins, cfg) == set() and table.table_reads == reads + 2  # 5 retired
        assert table.check(pins, cfg) == set() and table.table_reads == reads + 2
        map_address(pins, "10.250.9.3", 7)
        map_address(pins, "10.250.9.4", 7)
        assert peertable.Checker().check(pins, cfg) == {7}  # a new checker reads it all


@pytest.mark.matrix
def test_parallel_allocation_on_both_cpus_keeps_the_invariants(make_config: Any, lab: Any) -> None:
    """40 new addresses at once, connections spread over both CPUs: every
    allocation race ends with one id per address and the pool whole."""
    a, b, _, extra = lab
    cfg = make_config(max_peers=64)
    with attach(cfg) as pins:
        with TcpEchoServer(b, "0.0.0.0") as srv:
            for _ in range(3):
                tcp_pingpong_many(a, [(x, srv.port) for x in extra], 5)
        table = peertable.Checker()
        table.check(pins, cfg)
        races = pins.stats()["peer_race"]
        print(f"\n40 addresses x 3 at once: races {races}, repairs {dict(table.repairs)}")
        assert not table.repairs
        live = {a: i for i, addrs in peertable.owners(pins).items() for a in addrs}
        assert {mapped(x) for x in extra} <= set(live)
        assert_invariants(pins, cfg)


@pytest.mark.matrix
def test_mode_switches_leave_no_stale_flags(make_config: Any, lab: Any) -> None:
    """auto (with a retiring id) -> named -> auto: the release before left the
    retiring flag through named mode, and back in auto mode freed that id a
    second time (it was in the refilled pool already)."""
    a, b, veth, extra = lab
    auto = make_config(max_peers=MAX, peer_idle_seconds=0.05)
    with attach(auto) as pins, TcpEchoServer(b, "0.0.0.0") as srv:
        tcp_pingpong_many(a, [(extra[0], srv.port)], 3)
        live = set(peertable.owners(pins))
        assert live
        assert peertable.expire(pins, auto, live, pins.seen(), peertable.now_ns()) == 0  # noted
        time.sleep(0.1)  # idle for longer than peer_idle_seconds
        assert peertable.expire(pins, auto, set(), pins.seen(), peertable.now_ns()) == len(live)
        assert any(fl & lib.PEER_RETIRING for fl in flags(pins).values())
        named = make_config(max_peers=MAX, peers={"b": [f"{veth.v4_b}/32"]})
        peertable.apply(pins, named)
        assert flags(pins) == {1: lib.PEER_NAMED}
        peertable.apply(pins, auto)
        assert flags(pins) == {} and sorted(pool_of(pins)) == list(range(1, MAX + 1))
        assert_invariants(pins, auto)


def test_idle_clock_is_boottime_and_freed_ids_start_blank(make_config: Any, lab: Any) -> None:
    a, b, _, extra = lab
    cfg = make_config(max_peers=MAX, peer_idle_seconds=3600)
    with attach(cfg) as pins, TcpEchoServer(b, "0.0.0.0") as srv:
        tcp_pingpong_many(a, [(extra[0], srv.port)], 3)
        (node,) = [i for i, addrs in peertable.owners(pins).items() if mapped(extra[0]) in addrs]
        # a last activity on the wall clock (the release before): from the
        # future on CLOCK_BOOTTIME, it restarts the idle clock, retires nothing
        pins["peer_seen_map"].update(ffi.new("__u32 *", node), ffi.new("__u64 *", time.time_ns()))
        now = peertable.now_ns()
        assert peertable.expire(pins, cfg, set(), pins.seen(), now) == 0
        assert pins.seen()[node] == now
        # retired and freed: blank (last activity too), and the generation moves
        gen = pins.settings().generation
        peertable._retire(pins, cfg, [node], now - 10**9)
        assert peertable.expire(pins, cfg, set(), pins.seen(), peertable.now_ns()) == 0
        assert node not in pins.seen() and node in pool_of(pins)
        assert pins.settings().generation == gen + 2  # retired, then freed


# -- one agent per pin dir; unload under an agent; one consumer -------------------------


@pytest.fixture
def agent(pin_dir: str, tmp_path: Path) -> Iterator[AgentProc]:
    cfg = toml(tmp_path, "")
    proc = AgentProc(cfg, pin_dir, tmp_path / "a.prom")
    proc.wait_write()
    yield proc
    proc.kill()


def test_a_second_agent_is_refused_before_touching_anything(
    agent: AgentProc, pin_dir: str, tmp_path: Path
) -> None:
    named = toml(tmp_path, '[peers]\n"x" = ["10.250.1.0/24"]\n', "named.toml")
    before = Pins(pin_dir).settings().generation
    r = cli("run", "--once", "--config", str(named), "--pin-dir", pin_dir,
            "--textfile", str(tmp_path / "b.prom"))  # fmt: skip
    line = one_error_line(r)
    assert f"an agent runs on {pin_dir} already (pid {agent.proc.pid})" in line
    with Pins(pin_dir) as pins:
        assert pins.settings().auto_peers == 1 and pins.settings().generation == before
    assert not (tmp_path / "b.prom").exists()


def test_unload_under_an_agent_is_refused_then_forced_and_noticed(
    agent: AgentProc, pin_dir: str
) -> None:
    r = cli("unload", "--pin-dir", pin_dir)
    assert "stop it first (or unload --force)" in one_error_line(r)
    assert Pins(pin_dir).exists()
    r = cli("unload", "--force", "--pin-dir", pin_dir)
    assert r.returncode == 0, r.stderr
    rc = agent.proc.wait(60 if EMULATED else 10)  # within an interval or two, not frozen
    assert rc != 0 and "were removed or replaced while running" in agent.log


def test_one_events_consumer_at_a_time(make_config: Any) -> None:
    cfg = make_config()
    with attach(cfg), EventDrain(cfg.pin_dir):
        r = cli("events", "--pin-dir", cfg.pin_dir, "--count", "1")
        assert f"an events consumer runs on {cfg.pin_dir}" in one_error_line(r)
    r = cli("events", "--pin-dir", cfg.pin_dir, "--count", "1", "--type", "runqlat")
    assert r.returncode == 0 and r.stdout.count("\n") == 1  # the first one gone, a second may


def test_a_reload_that_cannot_be_applied_changes_nothing(pin_dir: str, tmp_path: Path) -> None:
    """More CIDRs than the pinned table holds: the release before applied the
    reload halfway while its log said the old config was kept."""
    good = '[peers]\n"keep" = ["10.250.2.0/24"]\n'
    cfg = toml(tmp_path, good)
    proc = AgentProc(cfg, pin_dir, tmp_path / "a.prom")
    try:
        proc.wait_write()
        many = ["[peers]"] + [
            f'"p{n}" = [' + ", ".join(f'"{ipaddress.ip_address(0x0B000000 + n * 4096 + h)}/32"'
                                     for h in range(250)) + "]"
            for n in range(70)
        ]  # fmt: skip
        cfg.write_text("\n".join(many) + "\n")  # 17,500 CIDRs; the table holds 16,384
        with Pins(pin_dir) as pins:
            cidrs_before = sum(1 for _ in pins["peer_cidr_map"].keys("struct peer_key"))
        proc.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "config not reloaded" in proc.log, 10, 0.05)
        with Pins(pin_dir) as pins:
            assert sum(1 for _ in pins["peer_cidr_map"].keys("struct peer_key")) == cidrs_before
            assert flags(pins) == {1: lib.PEER_NAMED}
        assert "peer CIDRs configured; the pinned table holds 16384" in proc.log
    finally:
        proc.kill()


def test_a_stray_link_of_an_interrupted_upgrade_is_removed(make_config: Any, lab: Any) -> None:
    """Killed between pinning links/<tp>-new and the rename: that link keeps a
    second program attached, counting every event twice, until attach
    removes it (the release before removed it only when re-attaching that
    tracepoint, so a rollback kept it for good)."""
    a, b, veth, _ = lab
    cfg = make_config(peers={"b": [f"{veth.v4_b}/32"]})
    attach(cfg).close()
    rtt = next(c for c in plan.plan(loader.facts.current()) if c.name == "rtt")
    assert rtt.variant is not None
    with loader.opened(cfg.pin_dir, cfg.max_peers) as obj:
        loader.load(obj, rtt.variant)
        (hook,) = rtt.variant.hooks
        link = lib.bpf_program__attach(loader._program(obj, hook.program))
        stray = loader.link_path(cfg.pin_dir, hook.tracepoint) + "-new"
        assert lib.bpf_link__pin(link, stray.encode()) == 0
        lib.bpf_link__destroy(link)
    with TcpEchoServer(b, veth.v4_b) as srv, Pins(cfg.pin_dir) as pins:
        tcp_pingpong_many(a, [(veth.v4_b, srv.port)], 10)
        doubled = pins.node_rows()[1][1].rtt_count
        with attach(cfg):
            assert not os.path.lexists(stray)
            c0 = pins.node_rows()[1][1].rtt_count
            tcp_pingpong_many(a, [(veth.v4_b, srv.port)], 10)
            once = pins.node_rows()[1][1].rtt_count - c0
    assert (doubled, once) == (20, 10)
