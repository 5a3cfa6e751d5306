"""The agent as Prometheus sees it: the real agent writes its textfile, the
real node_exporter serves it, the real Prometheus scrapes it every second,
while TCP runs over a delay line of known RTT."""

from __future__ import annotations

import contextlib
import http.server
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import FULL_DETAIL_TOML
from netlab import DelayLine, Netns, TcpEchoServer, TcpPingPong, wait_until
from promstack import NodeExporter, Prometheus, free_port, require

DELAY_S = 0.005  # each way: RTT about 10 ms
PEER = "far"


class Agent:
    """`ebpf-telemetry run` as a subprocess, stopped with SIGTERM."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ebpf_telemetry", "run", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    def stop(self) -> str:
        self.proc.terminate()
        _, err = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, err
        return err


@pytest.fixture
def stack(pin_dir: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    textdir = tmp_path / "textfile"
    textdir.mkdir()
    cfg = tmp_path / "agent.toml"
    peers = f'[peers]\n{PEER} = ["10.244.0.2/32"]\nnear = ["10.244.0.1/32"]\n'
    cfg.write_text(FULL_DETAIL_TOML + peers)
    port = free_port()
    prom_file = textdir / "ebpf_telemetry.prom"
    agent = Agent(
        "--config", str(cfg), "--interval", "1", "--pin-dir", pin_dir,
        "--textfile", str(prom_file), "--listen", f"127.0.0.1:{port}", "--node-name", "e2e",
    )  # fmt: skip
    try:
        wait_until(prom_file.exists, timeout=20)
        with (
            Netns("a") as a,
            Netns("b") as b,
            DelayLine(a, b, DELAY_S, "10.244.0.1", "10.244.0.2"),
            TcpEchoServer(b, "10.244.0.2") as srv,
            TcpPingPong(a, [("10.244.0.2", srv.port)]) as pp,
            NodeExporter(textdir) as ne,
            Prometheus([ne.address]) as prom,
        ):
            stop = threading.Event()
            rtts: list[int] = []

            def traffic() -> None:
                while not stop.is_set():
                    rtts.append(pp.run(20)[0].rtt_us)

            t = threading.Thread(target=traffic)
            t.start()
            try:
                yield {"prom": prom, "ne": ne, "rtts": rtts, "file": prom_file, "port": port}
            finally:
                stop.set()
                t.join()
    finally:
        agent.stop()


def test_histogram_quantile_in_prometheus_matches_true_rtt(stack: dict[str, Any]) -> None:
    """PromQL's p50 over the per-peer histogram (default rtt_buckets) within
    10% of the RTT tcp_info reports, over the host histogram within 5%."""
    prom: Prometheus = stack["prom"]
    p50 = "histogram_quantile(0.5, sum by (le) (rate({}[30s])))"
    peer = p50.format(f'ebpf_tcp_rtt_seconds_bucket{{peer="{PEER}"}}')
    host = p50.format("ebpf_node_tcp_rtt_seconds_bucket")
    prom.wait_for(f"{peer} > 0", lambda r: len(r) == 1, timeout=40)
    # after a few more seconds of steady traffic, the median of what PromQL says
    prom.wait_for(
        f'count_over_time(ebpf_tcp_rtt_seconds_count{{peer="{PEER}"}}[30s])',
        lambda r: len(r) == 1 and float(r[0]["value"][1]) >= 8,
        timeout=40,
    )
    got_peer = float(prom.query(peer)[0]["value"][1])
    got_host = float(prom.query(host)[0]["value"][1])
    rtts = sorted(stack["rtts"])
    true_s = rtts[len(rtts) // 2] / 1e6
    err_peer, err_host = (abs(x - true_s) / true_s for x in (got_peer, got_host))
    print(
        f"\ntcp_info RTT p50 {true_s * 1e3:.3f} ms; PromQL p50: per peer {got_peer * 1e3:.3f} ms "
        f"({err_peer:.1%}), host {got_host * 1e3:.3f} ms ({err_host:.1%})"
    )
    assert err_peer <= 0.10 and err_host <= 0.05
    scrape_err = prom.query("node_textfile_scrape_error")
    assert [float(s["value"][1]) for s in scrape_err] == [0.0]
    assert prom.query('ebpf_rtt_p99_milliseconds{node="e2e"}')
    window = prom.query(f'ebpf_tcp_rtt_window_seconds{{peer="{PEER}",quantile="0.5"}}')
    assert abs(float(window[0]["value"][1]) - true_s) / true_s <= 0.10


def test_metrics_endpoint_serves_the_same_families(stack: dict[str, Any]) -> None:
    wait_until(lambda: "ebpf_tcp_rtt_seconds_bucket" in stack["file"].read_text(), timeout=20)
    with urllib.request.urlopen(f"http://127.0.0.1:{stack['port']}/metrics", timeout=5) as r:
        assert r.status == 200
        served = {f.name for f in text_string_to_metric_families(r.read().decode())}
    written = {f.name for f in text_string_to_metric_families(stack["file"].read_text())}
    assert written <= served and "ebpf_tcp_rtt_seconds" in served


# The seed's two gauges keep their names (SPEC: dashboards rely on them);
# promtool's lint wants base units. These, and nothing else, are allowed.
SEED_NAMES = ("ebpf_rtt_p50_milliseconds", "ebpf_rtt_p99_milliseconds")


def test_promtool_check_metrics_on_our_textfile(stack: dict[str, Any]) -> None:
    wait_until(lambda: "ebpf_tcp_rtt_window_seconds{" in stack["file"].read_text(), timeout=20)
    text = stack["file"].read_text()
    r = subprocess.run(
        [require(("promtool",)), "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=30,
    )
    problems = [x for x in (r.stdout + r.stderr).splitlines() if x.strip()]
    unexpected = [p for p in problems if not p.startswith(SEED_NAMES)]
    assert not unexpected, problems
    assert all("base unit" in p for p in problems), problems


@pytest.mark.parametrize("buckets", ["pow2", "pow2x2", "all"])
def test_promtool_is_clean_with_each_rtt_buckets(
    pin_dir: str, tmp_path: Path, buckets: str
) -> None:
    """`run --once` with each rtt_buckets value over loopback traffic: promtool
    finds nothing but the seed's names, and every per-peer le is an edge of
    that scheme (and the host histogram's a superset)."""
    cfg = tmp_path / "agent.toml"
    edges = f'rtt_buckets = "{buckets}"\nrtt_bucket_range_seconds = [0.00001, 0.5]\n'
    cfg.write_text(FULL_DETAIL_TOML + edges)
    textfile = tmp_path / "ebpf_telemetry.prom"
    stop = threading.Event()

    def loopback(port: int) -> None:  # RTT samples for at least one automatic peer
        while not stop.is_set():
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read()

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello) as srv:
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        t = threading.Thread(target=loopback, args=(srv.server_port,))
        t.start()
        try:
            args = ["--config", str(cfg), "--pin-dir", pin_dir, "--textfile", str(textfile)]
            r = subprocess.run(
                [sys.executable, "-m", "ebpf_telemetry", "run", "--once", "--interval", "1", *args],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
        finally:
            stop.set()
            t.join()
            srv.shutdown()
    assert r.returncode == 0, r.stderr
    text = textfile.read_text()
    lint = subprocess.run(
        [require(("promtool",)), "check", "metrics"], input=text, capture_output=True, text=True
    )
    problems = [x for x in (lint.stdout + lint.stderr).splitlines() if x.strip()]
    assert not [p for p in problems if not p.startswith(SEED_NAMES)], problems
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    peer_les = {s.labels["le"] for s in fams["ebpf_tcp_rtt_seconds"].samples if "le" in s.labels}
    host_les = {
        s.labels["le"] for s in fams["ebpf_node_tcp_rtt_seconds"].samples if "le" in s.labels
    }
    # 10 us .. 0.5 s: 2^4 .. 2^18 us; pow2x2 also 12 us; all: 10..15 us, then 8 per octave
    want = {"pow2": 15, "pow2x2": 31, "all": 6 + 14 * 8 + 8}[buckets] + 1  # and +Inf
    assert len(peer_les) == want and peer_les <= host_les and len(host_les) == 127
    print(f"\n{buckets}: {len(peer_les) - 1} per-peer edges, {len(text.splitlines())} lines")


class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "5")
        self.end_headers()
        self.wfile.write(b"hello")

    def log_message(self, *args: Any) -> None:
        pass
