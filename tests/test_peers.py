"""Automatic peers that come and go: ids expire after peer_idle_seconds, are
reused, and no count of one peer ever shows under another's label. Real
traffic to many addresses of a namespace the test makes; the agent's own
cycle (read, expire, write the textfile) runs as `run` runs it."""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agentlab import EMULATED, attach, cli
from ebpf_telemetry.agent import Agent
from ebpf_telemetry.maps import Pins
from ebpf_telemetry.snapshot import HOST, Snapshot, Window, take
from netlab import (
    Netns,
    TcpEchoServer,
    TcpPingPong,
    run_in_netns,
    tcp_pingpong_many,
    veth_pair,
    wait_until,
)

ROUND_TRIPS = 5


class Cycles:
    """The agent's cycle, driven by the test: start(), then cycle() on demand."""

    def __init__(self, cfg: Any) -> None:
        self.agent = Agent(cfg, None, {})
        self.agent.start()
        self.pins = Pins(cfg.pin_dir)
        self.prev = take(self.pins)
        self.windows: list[Window] = []
        self.lines: list[int] = []

    def cycle(self) -> Snapshot:
        before = self.prev
        self.prev, ok = self.agent.cycle(before)
        assert ok
        self.windows.append(Window(before, self.prev))
        self.lines.append(len(Path(self.agent.cfg.textfile).read_text().splitlines()))
        return self.prev

    def close(self) -> None:
        self.pins.close()
        self.agent.close()


@pytest.fixture
def cycles(make_config: Any) -> Iterator[Any]:
    made: list[Cycles] = []

    def make(**keys: Any) -> Cycles:
        made.append(Cycles(make_config(**keys)))
        return made[-1]

    yield make
    for c in made:
        c.close()


def labels(snap: Snapshot) -> dict[str, int]:
    """label -> id; a label on two ids (two peers under one name) fails here
    rather than being hidden by the inversion."""
    out = {label: i for i, label in snap.peers.items()}
    assert len(out) == len(snap.peers), f"a label on two ids: {snap.peers}"
    return out


def expired(c: Cycles, addresses: list[str]) -> bool:
    """One more cycle: are all these peers gone from the table?"""
    return not set(addresses) & set(labels(c.cycle()))


def test_churn_of_a_thousand_addresses_loses_none_to_other(cycles: Any) -> None:
    extra = [f"10.250.{i // 200}.{i % 200 + 1}" for i in range(1050)]
    batches = [extra[i : i + 50] for i in range(0, len(extra), 50)]
    with Netns("a") as a, Netns("b") as b:
        veth_pair(a, b, v6=None, extra_b=extra)
        c = cycles(max_peers=64, peer_idle_seconds=1.0)
        counted: dict[str, int] = {}
        with TcpEchoServer(b, "0.0.0.0") as srv:
            for batch in batches:
                tcp_pingpong_many(a, [(x, srv.port) for x in batch], ROUND_TRIPS, timeout=30)
                snap = c.cycle()
                for x in batch:  # the client's sockets: one sample per round trip
                    counted[x] = snap.node(labels(snap)[x]).rtt_count
                wait_until(partial(expired, c, batch), 10, 0.3)
        last = c.prev
    # every window: the host is the sum of its peers (and `other`)
    for w in c.windows:
        assert w.node(HOST).rtt_count == sum(w.node(i).rtt_count for i in w.cur.peers if i)
    print(
        f"\nchurn: {len(extra)} addresses, {last.stats['peers_expired']} ids expired, "
        f"overflow {last.stats['peers_overflow']}, textfile lines min/max "
        f"{min(c.lines)}/{max(c.lines)} over {len(c.lines)} writes"
    )
    assert last.stats["peers_overflow"] == 0  # no address lost to `other`
    assert last.stats["peers_expired"] >= len(extra) - len(batches[-1])  # the last: held back
    assert set(counted.values()) == {ROUND_TRIPS}, counted  # none mixed with another
    half = len(c.lines) // 2
    assert max(c.lines[half:]) <= 1.1 * max(c.lines[:half])  # bounded: not growing with churn


@pytest.mark.matrix
def test_a_reused_id_never_shows_the_old_peers_counts(cycles: Any) -> None:
    with Netns("a") as a, Netns("b") as b:
        veth = veth_pair(a, b, v6=None, extra_b=["10.250.9.1", "10.250.9.2"])
        old, new = "10.250.9.1", "10.250.9.2"
        # two ids: one for the server side's view of a, one to share
        c = cycles(max_peers=2, peer_idle_seconds=1.0)
        with TcpEchoServer(b, "0.0.0.0") as srv, TcpPingPong(a, [(old, srv.port)]) as conn:
            conn.run(10)
            first = c.cycle()
            assert first.node(labels(first)[old]).rtt_count == 10
            # the old connection stays open, idle: ids expire and are freed
            wait_until(lambda: old not in labels(c.cycle()), 10, 0.3)
            wait_until(lambda: c.cycle().stats["peers_expired"] >= 2, 10, 0.3)  # both freed
            tcp_pingpong_many(a, [(new, srv.port)], 20)
            snap = c.cycle()
            reused = labels(snap)[new]
            assert reused in {labels(first)[old], labels(first)[veth.v4_a]}  # an old peer's id
            conn.run(30)  # the old peer talks again through its open socket
            after = c.cycle()
    assert after.node(reused).rtt_count == 20  # the new peer's own, nothing of the old
    assert after.hist(reused).count == 20
    other = labels(after)["other"]
    assert Window(snap, after).node(other).rtt_count == 30  # the old peer, table full
    assert veth.v4_a in labels(after)
    # inspect shows each automatic peer's last activity
    r = cli("inspect", "--pin-dir", c.agent.cfg.pin_dir, "--json")
    idle = {n["peer"]: n["idle_seconds"] for n in json.loads(r.stdout)["nodes"]}
    assert idle[new] is not None and 0 <= idle[new] < (120 if EMULATED else 10), idle
    assert idle["host"] is None


def test_synack_retransmits_take_no_peer_id(make_config: Any) -> None:
    """A half-open handshake from many addresses (SYN-ACKs never answered, as
    in a spoofed SYN flood): the server's SYN-ACK retransmits come from
    request sockets and must not fill the automatic peer table."""
    sources = [f"10.250.20.{i}" for i in range(1, 41)]
    drop_synack = (
        "table inet ebt {\n chain input {\n  type filter hook input priority 0;\n"
        "  tcp flags & (syn | ack) == syn | ack drop\n }\n}\n"
    )
    with Netns("a") as a, Netns("b") as b:
        veth = veth_pair(a, b, v6=None, extra_a=sources)
        run_in_netns(
            a, subprocess.run, ["nft", "-f", "-"], input=drop_synack, text=True, check=True
        )
        with attach(make_config(max_peers=8)) as pins, TcpEchoServer(b, veth.v4_b) as srv:
            before = take(pins)
            socks = [run_in_netns(a, half_open, src, veth.v4_b, srv.port) for src in sources]
            other = labels(before)["other"]
            # each request socket retransmits its SYN-ACK after 1 s
            wait_until(
                lambda: Window(before, take(pins)).node(other).retrans_count >= len(sources),
                10,
                0.1,
            )
            after = take(pins)
            for s in socks:
                s.close()
    peers = set(labels(after)) - {"other"}
    print(f"\nSYN-ACK retransmits to {len(sources)} addresses; peers {sorted(peers)}")
    assert peers <= {veth.v4_b}  # at most the client sockets' own view of b
    assert after.stats["peers_overflow"] == before.stats["peers_overflow"]


def half_open(src: str, dst: str, port: int) -> socket.socket:
    """A connect() from src that never completes (its SYN-ACKs are dropped)."""
    s = socket.socket()
    s.bind((src, 0))
    s.setblocking(False)
    s.connect_ex((dst, port))
    return s


def test_other_with_only_retransmits_is_exported(make_config: Any, tmp_path: Path) -> None:
    """Connections to an address no configured peer covers, whose SYNs are
    dropped: SYN retransmits only, counted under `other`, which is exported;
    the exported peers' retransmits add up to the host's."""
    drop_syn = (
        "table inet ebt {\n chain input {\n  type filter hook input priority 0;\n"
        "  tcp dport 9999 drop\n }\n}\n"
    )
    with Netns("a") as a, Netns("b") as b:
        veth = veth_pair(a, b, v6=None, extra_b=["10.250.30.1"])
        run_in_netns(b, subprocess.run, ["nft", "-f", "-"], input=drop_syn, text=True, check=True)
        c = Cycles(make_config(peers={"b": [f"{veth.v4_b}/32"]}))
        try:
            socks = [run_in_netns(a, half_open, veth.v4_a, "10.250.30.1", 9999) for _ in range(3)]
            wait_until(lambda: c.cycle().node(labels(c.prev)["other"]).retrans_count >= 3, 10, 0.2)
            text = Path(c.agent.cfg.textfile).read_text()
            host = c.prev.node(HOST).retrans_count  # the snapshot the text was made of
        finally:
            c.close()
            for s in socks:
                s.close()
    retrans = {
        s.labels["peer"]: s.value
        for fam in text_string_to_metric_families(text)
        if fam.name == "ebpf_tcp_retransmits"
        for s in fam.samples
    }
    assert retrans.get("other", 0) >= 3, retrans
    assert sum(retrans.values()) == host, (retrans, host)
    rtt_other = [
        x
        for x in text.splitlines()
        if x.startswith("ebpf_tcp_rtt_seconds_count") and 'peer="other"' in x
    ]
    assert rtt_other, "other is exported whole, its RTT histogram at 0"


@pytest.mark.matrix
def test_addresses_fold_into_subnets(make_config: Any) -> None:
    with Netns("a") as a, Netns("b") as b:
        veth_pair(a, b, v6=None, extra_b=["10.250.9.1", "10.250.9.2", "10.250.10.1"])
        with (
            attach(make_config(auto_peer_prefix_v4=24)) as pins,
            TcpEchoServer(b, "0.0.0.0") as srv,
        ):
            targets = [(x, srv.port) for x in ("10.250.9.1", "10.250.9.2", "10.250.10.1")]
            tcp_pingpong_many(a, targets, 10)
            snap = take(pins)
    by = labels(snap)
    assert snap.node(by["10.250.9.0/24"]).rtt_count == 20  # two addresses, one peer
    assert snap.node(by["10.250.10.0/24"]).rtt_count == 10
    assert "10.241.1.0/24" in by  # the server side's view of a, folded too
