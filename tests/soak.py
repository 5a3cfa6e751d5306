"""Soak: the agent under sustained RTT load, checked for timeliness and leaks.

    python tests/soak.py [--duration 600] [--interval 5] [--rate 50000]

Runs ``ebpf-telemetry run`` (automatic peers, its own pin dir and textfile)
while two load processes exchange small TCP segments over loopback: 254
client sockets bound to 127.1.0.1..254 send paced segments (--send-rate in
all) to one echo server on 127.0.0.1, which sends every byte back. The kernel
takes an RTT measurement when an incoming segment acknowledges new data, so
both sides measure: the clients' sockets when the server acknowledges their
data, the server's when the clients acknowledge its echoes. Hence 255
distinct peers (254 client addresses from the server's sockets, 127.0.0.1
from the clients') and up to two RTT events (tcp_probe) per segment sent. (A
one-way stream measured only on the sending side: one peer.)

Checked, and printed whatever the outcome:
- every interval written on time: ebpf_telemetry_last_update_timestamp_seconds
  in the textfile is never more than two intervals old;
- no lost writes: the agent's writes cover the run (one per interval) and it
  reports no failed write;
- agent RSS growth after warm-up below --max-rss-growth-mb (default 5);
- RTT events per second (from the kernel's own count, node 0) >= --rate;
- the load's 255 peers (by address) appear in the textfile. The hooks see
  all the machine's TCP traffic: with --peers auto (the default) every other
  address is a peer too, and max_peers leaves room for 64 of them; with
  --peers named the 255 are named in [peers] (a full default table) and any
  other traffic counts under `other`, so what else runs cannot change the
  result (tests/test_soak.py uses this).

Exit status 0 when all hold, 1 otherwise. Root only (loads BPF). The
10-minute run is `make soak`; `make test` runs 60 s of it at a lower rate
(tests/test_soak.py).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import multiprocessing as mp
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

PEERS = 255
SERVER = "127.0.0.1"
CLIENT_FMT = "127.1.0.{}"
CHUNK = b"x" * 64
EXPECTED = {SERVER, *(CLIENT_FMT.format(i) for i in range(1, PEERS))}
# The hooks see all the machine's TCP traffic: any other address (another
# test's, a retransmitting connection's) takes an automatic peer too, so the
# table has room for this many of them beyond the load's 255.
FOREIGN_ROOM = 64
TS_RE = re.compile(rb"^ebpf_telemetry_last_update_timestamp_seconds\{[^}]*\} (\S+)$", re.M)
DUR_RE = re.compile(rb"^ebpf_telemetry_collect_duration_seconds\{[^}]*\} (\S+)$", re.M)
PEER_RE = re.compile(rb'^ebpf_tcp_rtt_seconds_count\{[^}]*peer="([^"]*)"', re.M)


def _server(port_q: mp.Queue[int], stop: Event) -> None:
    """Echo: every byte received goes back on the same socket, so the server's
    sockets send data that the clients' next segments acknowledge (an RTT
    measurement on each server socket, one peer per client address)."""
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((SERVER, 0))
    lsock.listen(1024)
    lsock.setblocking(False)
    port_q.put(lsock.getsockname()[1])
    sel = selectors.DefaultSelector()
    sel.register(lsock, selectors.EVENT_READ)
    while not stop.is_set():
        for key, _ in sel.select(0.2):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            if s is lsock:
                c, _ = lsock.accept()
                c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                c.setblocking(False)
                sel.register(c, selectors.EVENT_READ)
                continue
            try:
                data = s.recv(1 << 16)
                if not data:
                    sel.unregister(s)
                    s.close()
                    continue
                s.send(data)  # a short or refused send only costs load, not correctness
            except (BlockingIOError, ConnectionError):
                pass


def _drain(sel: selectors.BaseSelector, timeout: float) -> None:
    """Read the echoes that arrive within timeout (0: those already there)."""
    for key, _ in sel.select(timeout):
        s = key.fileobj
        assert isinstance(s, socket.socket)
        with contextlib.suppress(BlockingIOError, ConnectionError):
            s.recv(1 << 16)


def _client(port: int, clients: int, send_rate: float, stop: Event, passes: Any) -> None:
    """Paced sends on every socket in turn; the time left until the next pass
    is spent reading the server's echoes (whose segments acknowledge the
    clients' data: an RTT measurement on each client socket)."""
    socks = []
    sel = selectors.DefaultSelector()
    for i in range(1, clients + 1):
        s = socket.socket()
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.bind((CLIENT_FMT.format(i), 0))
        s.connect((SERVER, port))
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        socks.append(s)
    n, t0 = 0, time.monotonic()
    pass_s = len(socks) / send_rate if send_rate > 0 else 0.0  # paced: leave CPU to the agent
    while True:
        for s in socks:
            with contextlib.suppress(BlockingIOError, ConnectionError):  # reset at stop
                s.send(CHUNK)
        n += 1
        passes.value = n
        if n % 16 == 0 and stop.is_set():
            break
        while True:
            ahead = t0 + n * pass_s - time.monotonic()
            _drain(sel, max(ahead, 0.0))
            if ahead <= 0:
                break
    for s in socks:
        s.close()


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def host_rtt_count(pin_dir: str) -> int:
    from ebpf_telemetry.maps import Pins

    with Pins(pin_dir) as pins:
        _, metrics = pins.node_rows()
    return metrics[0].rtt_count


def read_ts(path: Path) -> tuple[float, float, float] | None:
    """(last update timestamp, collect duration, mtime) of the textfile."""
    try:
        with path.open("rb") as f:
            mtime = os.fstat(f.fileno()).st_mtime
            data = f.read()
    except FileNotFoundError:
        return None
    m, d = TS_RE.search(data), DUR_RE.search(data)
    return (float(m.group(1)), float(d.group(1)) if d else 0.0, mtime) if m else None


# every peer's histogram: the soak counts peers by ebpf_tcp_rtt_seconds_count
FULL = 'peer_detail = "histogram"\nmax_series = 10000000\n'


def agent_config(mode: str) -> str:
    """auto: automatic peers, max_peers with room for foreign addresses;
    named: each of the load's addresses a peer named after it, in a table of
    exactly 255 (the default max_peers), deterministic whatever else runs."""
    if mode == "auto":
        return f"{FULL}sample_rate = 100\nmax_peers = {PEERS + FOREIGN_ROOM}\n"
    lines = [f'"{addr}" = ["{addr}/32"]' for addr in sorted(EXPECTED)]
    return FULL + "sample_rate = 100\nmax_peers = 255\n[peers]\n" + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=600.0, help="seconds under load")
    p.add_argument("--interval", type=float, default=5.0, help="agent interval, seconds")
    p.add_argument("--rate", type=float, default=50_000.0, help="minimum RTT events/s")
    p.add_argument(
        "--send-rate", type=float, default=40_000.0, help="segments/s the load sends (0: flat out)"
    )
    p.add_argument("--warmup", type=float, default=10.0, help="seconds before the RSS baseline")
    p.add_argument("--max-rss-growth-mb", type=float, default=5.0)
    p.add_argument(
        "--peers", choices=("auto", "named"), default="auto",
        help="auto: every address a peer (room for 64 foreign ones); named: the load's "
        "255 addresses in [peers], any other traffic under `other`",
    )  # fmt: skip
    p.add_argument("--pin-dir", help="on bpffs (default: /sys/fs/bpf/ebt-soak-PID)")
    a = p.parse_args(argv)
    if os.geteuid() != 0:
        print("soak: needs root (loads BPF)", file=sys.stderr)
        return 1

    from ebpf_telemetry import loader

    pin_dir = a.pin_dir or f"/sys/fs/bpf/ebt-soak-{os.getpid()}"
    work = Path(tempfile.mkdtemp(prefix="ebt-soak-"))
    textfile = work / "ebpf_telemetry.prom"
    cfg = work / "config.toml"
    cfg.write_text(agent_config(a.peers))
    log = (work / "agent.log").open("wb")
    agent = subprocess.Popen(
        [sys.executable, "-m", "ebpf_telemetry", "run", "--config", str(cfg),
         "--pin-dir", pin_dir, "--textfile", str(textfile), "--interval", str(a.interval),
         "--node-name", "soak"],
        stdout=log, stderr=log,
    )  # fmt: skip
    stop = mp.Event()
    port_q: mp.Queue[int] = mp.Queue()
    procs: list[mp.Process] = []
    ok = False
    try:
        t_end = time.monotonic() + 30
        while read_ts(textfile) is None:
            if agent.poll() is not None or time.monotonic() > t_end:
                raise RuntimeError(f"agent did not start: see {work / 'agent.log'}")
            time.sleep(0.05)
        server = mp.Process(target=_server, args=(port_q, stop), daemon=True)
        server.start()
        procs.append(server)
        port = port_q.get(timeout=10)
        passes = mp.Value("Q", 0, lock=False)
        client = mp.Process(
            target=_client, args=(port, PEERS - 1, a.send_rate, stop, passes), daemon=True
        )
        client.start()
        procs.append(client)

        start = time.monotonic()
        c0, rss0, rss_base = host_rtt_count(pin_dir), rss_kb(agent.pid), None
        p0 = passes.value
        max_age, stamps, last_ts, max_collect, max_lag = 0.0, set(), None, 0.0, 0.0
        while (now := time.monotonic()) < start + a.duration:
            if agent.poll() is not None:
                raise RuntimeError(f"agent exited {agent.returncode}: see {work / 'agent.log'}")
            got = read_ts(textfile)
            if got is not None:
                last_ts, collect, mtime = got
                max_lag = max(max_lag, mtime - last_ts)
                stamps.add(last_ts)
                max_collect = max(max_collect, collect)
            if last_ts is not None:
                max_age = max(max_age, time.time() - last_ts)
            if rss_base is None and now - start >= a.warmup:
                rss_base = rss_kb(agent.pid)
            time.sleep(min(0.05, a.interval / 10))
        elapsed = time.monotonic() - start
        c1, rss1 = host_rtt_count(pin_dir), rss_kb(agent.pid)
        sent = (passes.value - p0) * (PEERS - 1)
        stop.set()
        for pr in procs:
            pr.join(10)
        peers = {p.decode() for p in PEER_RE.findall(textfile.read_bytes())}
        missing = sorted(EXPECTED - peers)
        agent.send_signal(signal.SIGTERM)
        agent.wait(30)
        log.close()
        stopped = [
            json.loads(line)
            for line in (work / "agent.log").read_text().splitlines()
            if line.startswith("{") and '"stopped"' in line
        ]
        writes = stopped[-1]["writes"] if stopped else -1
        failed = stopped[-1].get("failed_writes", -1) if stopped else -1
        rate = (c1 - c0) / elapsed
        base = rss_base if rss_base is not None else rss0
        growth_mb = (rss1 - base) / 1024
        expected = elapsed / a.interval
        ordered = sorted(stamps)
        max_gap = max((b - a_ for a_, b in itertools.pairwise(ordered)), default=0.0)
        figures = {
            "duration_s": round(elapsed, 1),
            "interval_s": a.interval,
            "rtt_events_per_s": round(rate),
            "load_segments_per_s": round(sent / elapsed),
            "peers_mode": a.peers,
            "peers_in_textfile": len(peers),
            "load_peers_missing": missing[:10],
            "other_peers": sorted(peers - EXPECTED)[:10],
            "writes_total": writes,
            "writes_seen_during_load": len(stamps),
            "writes_expected_during_load": round(expected),
            "failed_writes": failed,
            "max_textfile_age_s": round(max_age, 3),
            "max_gap_between_writes_s": round(max_gap, 3),
            "max_collect_duration_s": round(max_collect, 3),
            "max_snapshot_to_file_s": round(max_lag, 3),
            "load_average_1_5_15": os.getloadavg(),
            "rss_start_kb": rss0,
            "rss_after_warmup_kb": base,
            "rss_end_kb": rss1,
            "rss_growth_mb": round(growth_mb, 2),
            "agent_exit": agent.returncode,
        }
        checks = {
            "on time (age <= 2 intervals)": max_age <= 2 * a.interval,
            "no lost writes": failed == 0 and len(stamps) >= expected - 2,
            f"rss growth < {a.max_rss_growth_mb} MB": growth_mb < a.max_rss_growth_mb,
            f"rate >= {a.rate:g}/s": rate >= a.rate,
            f"the load's {PEERS} peers in the textfile": not missing,
            "clean exit": agent.returncode == 0,
        }
        print(json.dumps(figures, indent=1))
        for name, good in checks.items():
            print(f"{'ok  ' if good else 'FAIL'} {name}")
        ok = all(checks.values())
    finally:
        stop.set()
        for pr in procs:
            pr.join(5)
            if pr.is_alive():
                pr.kill()
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        with contextlib.suppress(Exception):
            loader.unload(pin_dir)
        print(f"soak: {'PASS' if ok else 'FAIL'} (logs in {work})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
