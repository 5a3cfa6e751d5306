"""The peers file (`peers_file`): parsing like /etc/hosts, bad lines, a
missing file, and, with real traffic between namespaces, the agent re-reading
it on change: names and zones in the textfile, a rename that never shows the
old name's counts, the latency from a file change to the textfile."""

from __future__ import annotations

import ipaddress
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from ebpf_telemetry.peersfile import PeersFile, parse
from netlab import Netns, TcpEchoServer, TcpPingPong, veth_pair, wait_until
from test_reliability import AgentProc, toml, value

net = ipaddress.ip_network


def warnings(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["log_level"] == "warning"]


def test_lines_comments_shared_names_and_zones() -> None:
    text = (
        "# rack A\n"
        "10.1.0.0/24   rack-a  zone-1   # the servers\n"
        "\n"
        "fd00:1::/64   rack-a\n"
        "10.1.1.7/32   db\n"
        "   10.2.0.0/16 rack-b zone-2\n"
    )
    with capture_logs() as logs:
        t = parse(text, "/etc/p")
    assert not warnings(logs)
    assert t.peers == {
        "rack-a": (net("10.1.0.0/24"), net("fd00:1::/64")),
        "db": (net("10.1.1.7/32"),),
        "rack-b": (net("10.2.0.0/16"),),
    }
    assert t.zones == {"rack-a": "zone-1", "rack-b": "zone-2"}


def test_a_bad_line_is_one_warning_naming_file_and_line() -> None:
    text = (
        "10.1.0.0/24 a z1\n"
        "10.1.0.1/24 b\n"  # host bits set
        "10.9.0.0/33 b\n"  # no such prefix
        "10.1.0.0/24 c\n"  # a's already
        "10.3.0.0/24\n"  # no name
        "10.4.0.0/24 d z1 extra\n"  # four fields
        "10.5.0.0/24 other\n"  # reserved
        f"10.6.0.0/24 {'n' * 80}\n"  # too long for the kernel's peer_info
        "10.7.0.0/24 a z2\n"  # a is in z1
        "10.8.0.0/24 e\n"
    )
    with capture_logs() as logs:
        t = parse(text, "/etc/p")
    lines = [w["line"] for w in warnings(logs)]
    assert lines == [f"/etc/p:{i}" for i in range(2, 10)], warnings(logs)
    assert all(w["event"] == "peers file: line skipped" for w in warnings(logs))
    assert t.peers == {"a": (net("10.1.0.0/24"),), "e": (net("10.8.0.0/24"),)}


def test_missing_file_one_warning_then_read_when_back(tmp_path: Path) -> None:
    path = tmp_path / "peers"
    src = PeersFile(str(path))
    with capture_logs() as logs:
        assert src.poll() is None
        assert src.poll() is None  # the same streak: no second warning
    assert [w["path"] for w in warnings(logs)] == [str(path)]
    assert src.last_sync() is None
    path.write_text("10.0.0.0/8 a\n")
    assert src.poll() is not None and src.last_sync() is not None
    assert src.poll() is None  # unchanged: not read again
    path.write_text("10.0.0.0/8 b\n")  # same size, new content
    t = src.poll()
    assert t is not None and list(t.peers) == ["b"]
    os.chmod(path, 0)
    path.rename(tmp_path / "gone")
    with capture_logs() as logs:
        assert src.poll() is None
    assert len(warnings(logs)) == 1


# -- the agent, real traffic -----------------------------------------------------------


@pytest.fixture
def lab2() -> Iterator[tuple[Netns, Netns, Any]]:
    """a and b over a veth; b has a second address. Addresses of these tests
    only: the hooks see every namespace's traffic, other tests' too."""
    v4 = ("10.246.17.1/24", "10.246.17.2/24")
    with Netns("a") as a, Netns("b") as b:
        yield a, b, veth_pair(a, b, v4, v6=None, extra_b=["10.246.17.50"])


def peer_series(text: str, peer: str) -> dict[str, float | None]:
    return {
        "rtt_count": value(text, "ebpf_tcp_rtt_seconds_count", peer=peer),
        "retrans": value(text, "ebpf_tcp_retransmits_total", peer=peer),
    }


def zone_of(text: str, peer: str) -> str | None:
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "ebpf_tcp_rtt_seconds_count" and s.labels.get("peer") == peer:
                return s.labels["peer_zone"]
    return None


def test_agent_follows_the_file(
    lab2: Any, pin_dir: str, tmp_path: Path, agents: list[AgentProc]
) -> None:
    a, b, veth = lab2
    extra = veth.extra_b[0]
    peers = tmp_path / "peers"
    peers.write_text(f"{veth.v4_b}/32 node-b zone-b\n{extra}/32 node-x\n# bad next\nnope\n")
    cfg = toml(tmp_path, f'peers_file = "{peers}"\nzone = "zone-a"\n')
    tf = tmp_path / "t.prom"
    with (
        TcpEchoServer(b, veth.v4_b) as s1,
        TcpEchoServer(b, extra) as s2,
        TcpPingPong(a, [(veth.v4_b, s1.port), (extra, s2.port)]) as pp,
    ):
        agents.append(agent := AgentProc(cfg, pin_dir, tf))
        agent.wait_write()
        assert f"{peers}:4" in agent.log  # the bad line, named
        pp.run(200)

        def counted(peer: str, n: int) -> bool:
            return (value(tf.read_text(), "ebpf_tcp_rtt_seconds_count", peer=peer) or 0) >= n

        wait_until(lambda: counted("node-b", 200) and counted("node-x", 200), 10)
        text = tf.read_text()
        assert zone_of(text, "node-b") == "zone-b" and zone_of(text, "node-x") == ""
        assert value(text, "ebpf_peer_source_last_sync_timestamp_seconds", source="file")

        # node-x renamed node-y (zone-y): its counts start from zero, never node-x's
        changed = time.time()
        peers.write_text(f"{veth.v4_b}/32 node-b zone-b\n{extra}/32 node-y zone-y\n")
        wait_until(lambda: value(tf.read_text(), "ebpf_tcp_rtt_seconds_count", peer="node-y")
                   is not None, 10, 0.01, "the new name")  # fmt: skip
        latency = time.time() - changed
        text = tf.read_text()
        assert peer_series(text, "node-x") == {"rtt_count": None, "retrans": None}
        assert value(text, "ebpf_tcp_rtt_seconds_count", peer="node-y") == 0
        assert zone_of(text, "node-y") == "zone-y"
        assert (value(text, "ebpf_tcp_rtt_seconds_count", peer="node-b") or 0) >= 200  # kept
        pp.run(50)  # the same open connections, re-classified
        wait_until(lambda: counted("node-y", 50) and counted("node-b", 250), 10)
        assert (value(tf.read_text(), "ebpf_tcp_rtt_seconds_count", peer="node-y") or 0) < 200

        # the file goes: one warning, the names stay
        peers.unlink()
        agent.wait_write(after=time.time())
        agent.wait_write(after=time.time())
        assert counted("node-y", 50)
        assert agent.log.count("peers file not read") == 1
        assert agent.stop() == 0
    print(f"\npeers file change -> textfile: {latency * 1000:.0f} ms (interval 250 ms)")


def test_sighup_switches_from_peers_to_the_file(
    lab2: Any, pin_dir: str, tmp_path: Path, agents: list[AgentProc]
) -> None:
    veth = lab2[2]  # named peers are exported before any traffic
    cfg = toml(tmp_path, f'[peers]\nold-b = ["{veth.v4_b}/32"]\n')
    tf = tmp_path / "t.prom"
    agents.append(agent := AgentProc(cfg, pin_dir, tf))
    agent.wait_write()
    assert zone_of(tf.read_text(), "old-b") == ""
    peers = tmp_path / "peers"
    peers.write_text(f"{veth.v4_b}/32 node-b zone-b\n")
    toml(tmp_path, f'peers_file = "{peers}"\n')
    agent.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: zone_of(tf.read_text(), "node-b") == "zone-b", 10, 0.02, "the file's names")
    assert zone_of(tf.read_text(), "old-b") is None
    # and the file is followed from then on
    peers.write_text(f"{veth.v4_b}/32 node-b zone-c\n")
    wait_until(lambda: zone_of(tf.read_text(), "node-b") == "zone-c", 10, 0.02, "the new zone")
    assert agent.stop() == 0
