"""The series budget with real traffic (issue 17): hundreds of automatic peers
from addresses of a namespace the test makes, a small max_series, a peer that
loses packets (nft drops a share of what reaches it: its sender retransmits)
and a slow one (DelayLine, 20 ms each way). Checked in the real textfile the
agent's own cycle writes: the sample count, the totals, the worst peers.
Zones from a peers file sum to the host."""

from __future__ import annotations

import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from ebpf_telemetry.snapshot import HOST
from netlab import DelayLine, Netns, TcpEchoServer, run_in_netns, tcp_pingpong_many, veth_pair
from test_budget import promtool_problems
from test_peers import Cycles

CROWD = [f"10.250.{40 + i // 200}.{i % 200 + 1}" for i in range(300)]
LOSSY = "10.250.45.1"  # a quarter of what reaches it is dropped
SLOW = ("10.246.0.1", "10.246.0.2")  # the DelayLine's two ends
MAX_SERIES = 400


Samples = dict[str, list[tuple[dict[str, str], float]]]


def parse(text: str) -> Samples:
    out: Samples = defaultdict(list)
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name].append((s.labels, s.value))
    return out


def sample_lines(text: str) -> int:
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


def drop_share(ns: Netns, addr: str) -> None:
    """nft in ns: drop one in four packets that reach addr."""
    rules = (
        "table inet ebtloss {\n chain input {\n  type filter hook input priority 0;\n"
        f"  ip daddr {addr} numgen random mod 4 == 0 drop\n }}\n}}\n"
    )
    run_in_netns(ns, subprocess.run, ["nft", "-f", "-"], input=rules, text=True, check=True)


def test_budget_with_hundreds_of_automatic_peers(make_config: Any) -> None:
    with Netns("a") as a, Netns("b") as b, Netns("c") as c:
        veth_pair(a, b, v6=None, extra_b=[*CROWD, LOSSY])
        drop_share(b, LOSSY)
        cfg = make_config(max_peers=512, max_series=MAX_SERIES, peer_detail="quantiles")
        cyc = Cycles(cfg)
        try:
            with (
                DelayLine(a, c, 0.02, *SLOW),
                TcpEchoServer(b, "0.0.0.0") as srv,
                TcpEchoServer(c, SLOW[1]) as slow_srv,
            ):
                cyc.cycle()  # the zones start from the maps as they are
                tcp_pingpong_many(a, [(x, srv.port) for x in CROWD], 5, timeout=30)
                tcp_pingpong_many(a, [(LOSSY, srv.port)], 60, timeout=60)
                tcp_pingpong_many(a, [(SLOW[1], slow_srv.port)], 20, timeout=30)
                snap = cyc.cycle()
                text = Path(cfg.textfile).read_text()
        finally:
            cyc.close()
    fams = parse(text)
    exported = fams["ebpf_peers_exported"][0][1]
    folded = fams["ebpf_peers_folded"][0][1]
    shown = {lb["peer"] for lb, _ in fams["ebpf_tcp_retransmits_total"]}
    lossy_id = next(i for i, p in snap.peers.items() if p == LOSSY)
    print(
        f"\nbudget: {sample_lines(text)} samples (max_series {MAX_SERIES}), peers exported "
        f"{exported:g}, folded {folded:g}; {LOSSY} retransmitted "
        f"{snap.node(lossy_id).retrans_count}"
    )
    assert sample_lines(text) <= MAX_SERIES
    assert folded > 0 and exported + folded >= len(CROWD) + 2
    assert len(shown) == exported > 0
    assert snap.node(lossy_id).retrans_count > 0
    assert {LOSSY, SLOW[1]} <= shown, "the worst peers (retransmits, then p99) are exported"
    p99 = {lb["peer"]: v for lb, v in fams["ebpf_tcp_rtt_window_seconds"]
           if lb["quantile"] == "0.99"}  # fmt: skip
    assert p99[SLOW[1]] >= 0.02  # 40 ms round trips: the slow one is slow
    # the totals are intact: the zones (here one: no zone known) are the host
    (node_count,) = [v for _, v in fams["ebpf_node_tcp_rtt_seconds_count"]]
    zone_counts = fams["ebpf_zone_tcp_rtt_seconds_count"]
    assert [lb["peer_zone"] for lb, _ in zone_counts] == [""]
    assert zone_counts[0][1] == node_count == snap.hist(HOST).count
    zone_retrans = sum(v for _, v in fams["ebpf_zone_tcp_retransmits_total"])
    assert zone_retrans == snap.node(HOST).retrans_count >= snap.node(lossy_id).retrans_count


def test_zones_from_a_peers_file_sum_to_the_host(make_config: Any, tmp_path: Path) -> None:
    zoned = {
        "x-1": ("10.250.50.0/28", "zone-x"),
        "x-2": ("10.250.50.16/28", "zone-x"),
        "y-1": ("10.250.50.32/28", "zone-y"),
        "n-1": ("10.250.50.48/28", ""),  # a peer without a zone
    }
    peers = tmp_path / "peers"
    peers.write_text("".join(f"{cidr} {name} {zone}\n" for name, (cidr, zone) in zoned.items()))
    addrs = {n: [f"10.250.50.{int(c.split('.')[3].split('/')[0]) + k}" for k in (1, 2)]
             for n, (c, _) in zoned.items()}  # fmt: skip
    unnamed = "10.250.51.1"  # counted under `other`
    with Netns("a") as a, Netns("b") as b:
        extra = [x for xs in addrs.values() for x in xs] + [unnamed]
        veth_pair(a, b, v6=None, extra_b=extra)
        drop_share(b, addrs["y-1"][0])  # retransmits towards zone-y
        cfg = make_config(peers_file=str(peers), zone="zone-a", peer_detail="quantiles",
                          max_series=1000)  # fmt: skip
        cyc = Cycles(cfg)
        try:
            with TcpEchoServer(b, "0.0.0.0") as srv:
                cyc.cycle()
                tcp_pingpong_many(a, [(x, srv.port) for x in extra], 20, timeout=60)
                snap = cyc.cycle()
                text = Path(cfg.textfile).read_text()
        finally:
            cyc.close()
    assert not promtool_problems(text)
    fams = parse(text)
    samples = {lb["peer"]: v for lb, v in fams["ebpf_tcp_rtt_samples_total"]}
    retrans = {lb["peer"]: v for lb, v in fams["ebpf_tcp_retransmits_total"]}
    zone_count = {lb["peer_zone"]: v for lb, v in fams["ebpf_zone_tcp_rtt_seconds_count"]}
    zone_retrans = {lb["peer_zone"]: v for lb, v in fams["ebpf_zone_tcp_retransmits_total"]}
    print(f"\nzones: samples {zone_count}, retransmits {zone_retrans}")
    assert {lb["zone"] for lb, _ in fams["ebpf_zone_tcp_rtt_seconds_count"]} == {"zone-a"}
    assert set(zone_count) == {"", "zone-x", "zone-y"}
    assert zone_count["zone-x"] == samples["x-1"] + samples["x-2"] >= 4 * 20
    assert zone_count["zone-y"] == samples["y-1"] >= 2 * 20
    assert zone_retrans["zone-y"] == retrans["y-1"] > 0
    (node_count,) = [v for _, v in fams["ebpf_node_tcp_rtt_seconds_count"]]
    assert sum(zone_count.values()) == node_count == snap.hist(HOST).count
    assert zone_count[""] >= samples["n-1"] + samples.get("other", 0)
    assert sum(zone_retrans.values()) == snap.node(HOST).retrans_count
    # per bucket too: the zones' +Inf buckets and sums add up to the host's
    inf = sum(v for lb, v in fams["ebpf_zone_tcp_rtt_seconds_bucket"] if lb["le"] == "+Inf")
    assert inf == node_count
