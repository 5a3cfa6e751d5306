"""Peer names from Kubernetes Node objects: the real `kubernetes` client
against a stand-in API server on 127.0.0.1 (tests/kubestub.py: no
kube-apiserver package exists here, so the server is the one thing mocked; it
speaks the real list/watch wire protocol). Then the agent itself, with real
traffic between namespaces to the nodes' addresses, read in the textfile."""

from __future__ import annotations

import ipaddress
import itertools
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ebpf_telemetry.config import Kubernetes
from ebpf_telemetry.kubenodes import PAGE, KubeNodes
from ebpf_telemetry.naming import PeerTable
from kubestub import KubeStub, node_object
from netlab import Netns, TcpEchoServer, TcpPingPong, veth_pair, wait_until
from test_reliability import AgentProc, toml, value

TOKEN = "stub-token-4242"
net = ipaddress.ip_network


@pytest.fixture
def stub() -> Iterator[KubeStub]:
    s = KubeStub()
    yield s
    s.stop()


@pytest.fixture
def watchers() -> Iterator[Any]:
    made: list[KubeNodes] = []

    def make(stub: KubeStub, tmp: Path, node: str = "node-a", pod_cidrs: bool = False) -> Any:
        kc = tmp / "kubeconfig"
        kc.write_text(stub.kubeconfig(TOKEN))
        cfg = Kubernetes(enabled=True, kubeconfig=str(kc), pod_cidrs=pod_cidrs)
        made.append(KubeNodes(node, cfg, backoff=(0.05, 0.4), watch_seconds=5))
        return Follow(made[-1])

    yield make
    for k in made:
        k.close()


class Follow:
    """The agent's side of a KubeNodes: the table as of its last poll()."""

    def __init__(self, k: KubeNodes) -> None:
        self.k = k
        self.table: PeerTable | None = None

    def now(self) -> PeerTable | None:
        t = self.k.poll()
        self.table = t or self.table
        return self.table

    def until(self, cond: Any, what: str, timeout: float = 10) -> PeerTable:
        return wait_until(
            lambda: (t := self.now()) is not None and cond(t) and t, timeout, 0.01, what
        )


def three(stub: KubeStub) -> None:
    stub.put(node_object("node-a", ["10.0.0.1"], "zone-a", ["10.244.1.0/24"]))
    stub.put(node_object("node-b", ["10.0.0.2", "192.0.2.2", "fd00::2"], "zone-b"))
    stub.put(node_object("node-c", ["10.0.0.3"]))  # no zone label


def test_first_list_names_and_zones(stub: KubeStub, watchers: Any, tmp_path: Path) -> None:
    three(stub)
    for i in range(600):  # more than one page
        stub.put(node_object(f"pool-{i:03}", [f"10.1.{i // 250}.{i % 250 + 1}"], "zone-p"))
    stub.start()
    f = watchers(stub, tmp_path, pod_cidrs=True)
    t = f.until(lambda t: len(t.peers) == 603, "the first list")
    assert t.peers["node-a"] == (net("10.0.0.1/32"), net("10.244.1.0/24"))
    assert t.peers["node-b"] == (net("10.0.0.2/32"), net("192.0.2.2/32"), net("fd00::2/128"))
    assert t.zones["node-a"] == "zone-a" and t.zones["node-c"] == "" and t.own_zone == "zone-a"
    assert t.zones["pool-599"] == "zone-p"
    assert stub.lists == -(-603 // PAGE)  # in pages
    assert stub.authorizations() == {f"Bearer {TOKEN}"}  # the kubeconfig's bearer token
    assert f.k.last_sync() is not None


def test_delete_add_and_address_change(stub: KubeStub, watchers: Any, tmp_path: Path) -> None:
    three(stub)
    stub.start()
    f = watchers(stub, tmp_path)
    f.until(lambda t: len(t.peers) == 3, "the first list")
    lists = stub.lists
    stub.delete("node-c")
    f.until(lambda t: "node-c" not in t.peers, "the deletion")
    stub.put(node_object("node-d", ["10.0.0.4"], "zone-d"))
    t = f.until(lambda t: "node-d" in t.peers, "the addition")
    assert t.zones["node-d"] == "zone-d"
    stub.put(node_object("node-d", ["10.0.0.40"], "zone-e"))  # a new address, a new zone
    t = f.until(lambda t: t.peers["node-d"] == (net("10.0.0.40/32"),), "the address change")
    assert t.zones["node-d"] == "zone-e"
    synced = f.k.last_sync()
    stub.bookmark()  # nothing changes, the watch is known to be current
    wait_until(lambda: (f.k.last_sync() or 0) > (synced or 0), 5, 0.01, "a bookmark")
    assert f.k.poll() is None  # no change: nothing to apply
    assert stub.lists == lists  # all of it from the watch, no relist


def test_410_gone_relists(stub: KubeStub, watchers: Any, tmp_path: Path) -> None:
    three(stub)
    stub.start()
    f = watchers(stub, tmp_path)
    f.until(lambda t: len(t.peers) == 3, "the first list")
    # the open watch gets an ERROR event with code 410 (the client raises it:
    # with timeout_seconds it does not retry): list again
    stub.expire()
    stub.put(node_object("node-e", ["10.0.0.5"]))
    f.until(lambda t: "node-e" in t.peers, "the relist after an ERROR 410")
    assert f.k.lists == 2
    # 410 as the HTTP status of the watch request itself (ApiException from the call)
    stub.stop()
    stub.gone_status = True
    stub.expire()
    stub.delete("node-e")
    stub.start()
    f.until(lambda t: "node-e" not in t.peers, "the relist after HTTP 410")
    assert f.k.lists == 3


def test_api_server_down_at_start_then_back(stub: KubeStub, watchers: Any, tmp_path: Path) -> None:
    three(stub)
    f = watchers(stub, tmp_path)  # nothing listens on the stub's port yet
    wait_until(lambda: f.k.error is not None, 5, 0.01, "a failed connection")
    assert f.now() is None and f.k.last_sync() is None
    stub.start()
    f.until(lambda t: len(t.peers) == 3, "the list once the server is back")
    # an outage after the first sync: the names stay, changes arrive after it
    stub.stop()
    synced = f.k.last_sync()
    stub.delete("node-b")
    wait_until(lambda: f.k.error is not None, 5, 0.01, "the outage seen")
    assert f.now() is not None and "node-b" in f.now().peers  # type: ignore[union-attr]
    assert f.k.last_sync() == synced  # how stale the names are
    stub.start()
    f.until(lambda t: "node-b" not in t.peers, "the deletion after the outage")


def test_kubeconfig_from_the_environment(
    stub: KubeStub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No kubeconfig configured, not in a cluster: $KUBECONFIG, as kubectl."""
    three(stub)
    stub.start()
    kc = tmp_path / "env-kubeconfig"
    kc.write_text(stub.kubeconfig("from-env"))
    monkeypatch.setenv("KUBECONFIG", str(kc))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    k = KubeNodes("node-a", Kubernetes(enabled=True), backoff=(0.05, 0.4), watch_seconds=5)
    try:
        wait_until(lambda: k.poll(), 10, 0.01, "the first list")
    finally:
        k.close()
    assert stub.authorizations() == {"Bearer from-env"}


# -- the agent, real traffic ---------------------------------------------------------


def zones(text: str) -> dict[str, str]:
    """peer -> peer_zone of the RTT histogram's series in a textfile."""
    return {
        s.labels["peer"]: s.labels["peer_zone"]
        for fam in text_string_to_metric_families(text)
        if fam.name == "ebpf_tcp_rtt_seconds"
        for s in fam.samples
    }


def kube_toml(tmp: Path, stub: KubeStub, extra: str = "") -> Path:
    kc = tmp / "kubeconfig"
    kc.write_text(stub.kubeconfig(TOKEN))
    return toml(
        tmp, f'node_name = "node-a"\n{extra}[kubernetes]\nenabled = true\nkubeconfig = "{kc}"\n'
    )


def test_agent_names_peers_after_nodes(
    stub: KubeStub, pin_dir: str, tmp_path: Path, agents: list[AgentProc]
) -> None:
    with Netns("a") as a, Netns("b") as b:
        # addresses of this test only: the hooks see every namespace's traffic
        v4 = ("10.246.16.1/24", "10.246.16.2/24")
        veth = veth_pair(a, b, v4, v6=None, extra_b=["10.246.16.50"])
        extra = veth.extra_b[0]
        stub.put(node_object("node-a", [veth.v4_a], "zone-a"))
        stub.put(node_object("node-b", [veth.v4_b], "zone-b"))
        stub.start()
        tf = tmp_path / "t.prom"
        agents.append(agent := AgentProc(kube_toml(tmp_path, stub), pin_dir, tf))
        agent.wait_write()
        with (
            TcpEchoServer(b, veth.v4_b) as s1,
            TcpEchoServer(b, extra) as s2,
            TcpPingPong(a, [(veth.v4_b, s1.port), (extra, s2.port)]) as pp,
        ):

            def rtt(peer: str) -> float:
                return value(tf.read_text(), "ebpf_tcp_rtt_seconds_count", peer=peer) or 0

            wait_until(lambda: "node-b" in zones(tf.read_text()), 15, 0.02, "node-b named")
            pp.run(100)
            wait_until(lambda: rtt("node-b") >= 100 and rtt("other") >= 100, 10)
            z = zones(tf.read_text())
            assert z["node-b"] == "zone-b" and z["node-a"] == "zone-a" and z["other"] == ""
            assert value(tf.read_text(), "ebpf_peer_source_last_sync_timestamp_seconds",
                         source="kubernetes")  # fmt: skip

            # a node added: named at its first traffic, counting from zero
            stub.put(node_object("node-x", [extra], "zone-x"))
            wait_until(lambda: "node-x" in zones(tf.read_text()), 10, 0.02, "node-x named")
            pp.run(50)
            wait_until(lambda: rtt("node-x") >= 50, 10)
            assert rtt("node-x") < 100  # none of `other`'s counts

            # a node deleted: its series leave the textfile
            deleted = time.time()
            stub.delete("node-b")
            wait_until(lambda: "node-b" not in zones(tf.read_text()), 10, 0.02, "node-b gone")
            gone = time.time() - deleted

            # an address that changes: node-x follows it to b's first address
            updates = agent.log.count("peer names updated")
            stub.put(node_object("node-x", [veth.v4_b], "zone-x"))
            wait_until(lambda: agent.log.count("peer names updated") > updates, 10, 0.02)
            agent.wait_write(after=time.time())
            x0, other0 = rtt("node-x"), rtt("other")
            pp.run(30)  # 30 round trips to each address
            wait_until(lambda: rtt("node-x") >= x0 + 30 and rtt("other") >= other0 + 30, 10)
            agent.wait_write(after=time.time())
            assert rtt("node-x") == x0 + 30  # v4_b's only: extra is no one's any more
        assert agent.stop() == 0
    print(f"\nNode deleted -> its series gone from the textfile: {gone * 1000:.0f} ms "
          "(interval 250 ms)")  # fmt: skip


def test_a_hung_api_server_never_delays_a_write(
    pin_dir: str, tmp_path: Path, agents: list[AgentProc]
) -> None:
    """A server that accepts connections and never answers."""
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)
        stub = KubeStub()
        stub.port = hung.getsockname()[1]
        tf = tmp_path / "t.prom"
        agents.append(agent := AgentProc(kube_toml(tmp_path, stub), pin_dir, tf))
        first = agent.wait_write()
        writes = [first]
        for _ in range(8):
            writes.append(agent.wait_write(after=writes[-1]))
        assert "node watch failed" not in agent.log  # still waiting for an answer
        assert value(tf.read_text(), "ebpf_peer_source_last_sync_timestamp_seconds") is None
        assert agent.stop() == 0
    gaps = [b - a for a, b in itertools.pairwise(writes)]
    print(f"\nhung API server: 8 writes, gaps {min(gaps):.2f}..{max(gaps):.2f} s (interval 0.25)")


def rss_kib(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {
        k: int(v.split()[0])
        for k, v in (x.split(":", 1) for x in status)
        if k in ("VmRSS", "VmHWM")
    }


def test_rss_with_5000_nodes(stub: KubeStub, pin_dir: str, tmp_path: Path,
                             agents: list[AgentProc]) -> None:  # fmt: skip
    """The agent's memory with 5,000 Node objects (30 images each, as real
    nodes carry) against the same agent without Kubernetes; both with the
    default max_peers (255): the Nodes' cost, not that of more peers' series."""
    for i in range(5000):
        addr = f"10.{100 + i // 60000}.{i // 250 % 240}.{i % 250 + 1}"
        stub.put(node_object(f"node-{i:05}", [addr], f"zone-{i % 3}", images=30))
    stub.start()
    base_tf = tmp_path / "base.prom"
    agents.append(base := AgentProc(toml(tmp_path, 'node_name = "node-a"\n', "b.toml"),
                                   pin_dir, base_tf))  # fmt: skip
    base.wait_write()
    base.wait_write(after=time.time())
    base_rss = rss_kib(base.proc.pid)
    assert base.stop() == 0
    tf = tmp_path / "t.prom"
    cfg = kube_toml(tmp_path, stub)  # max_peers 255: the rest count under `other`
    agents.append(agent := AgentProc(cfg, pin_dir, tf))
    wait_until(lambda: "nodes listed" in agent.log, 60, 0.1, "the list of 5,000")
    agent.wait_write(timeout=60)  # the list can come before the first textfile
    wait_until(lambda: (value(tf.read_text(), "ebpf_peers") or 0) >= 255, 60, 0.1, "peers")
    agent.wait_write(after=time.time())
    rss = rss_kib(agent.proc.pid)
    assert agent.stop() == 0
    assert agent.log.count("more peers than max_peers") == 1, agent.log[-2000:]
    print(
        f"\nRSS without Kubernetes {base_rss['VmRSS'] / 1024:.0f} MiB "
        f"(peak {base_rss['VmHWM'] / 1024:.0f}); with 5,000 Nodes {rss['VmRSS'] / 1024:.0f} MiB "
        f"(peak {rss['VmHWM'] / 1024:.0f})"
    )
    assert rss["VmHWM"] < 256 * 1024  # the DaemonSet's memory limit
