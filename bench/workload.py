"""Loopback load: sockperf (ping-pong, paced throughput) and TCP to many peers."""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def sockperf_server() -> Iterator[int]:
    """`sockperf sr` on 127.0.0.1; yields its port."""
    port = free_port()
    argv = ["sockperf", "sr", "--tcp", "-i", HOST, "-p", str(port)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex((HOST, port)) == 0:
                    break
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait()


def _sockperf(args: list[str], timeout: float) -> str:
    out = subprocess.run(
        ["sockperf", *args], capture_output=True, text=True, timeout=timeout, check=True
    )
    return out.stdout + out.stderr


@dataclass(frozen=True)
class PingPong:
    median_us: float  # one-way latency (RTT/2), the valid duration's median
    round_trips: int  # replies received over the whole run, warm-up included


def ping_pong_run(port: int, seconds: float, msg_size: int = 64) -> PingPong:
    """`sockperf pp`: its median one-way latency and every round trip it made."""
    text = _sockperf(
        ["pp", "--tcp", "-i", HOST, "-p", str(port), "-t", str(seconds), "-m", str(msg_size)],
        seconds + 30,
    )
    m = re.search(r"percentile 50\.000 =\s*([\d.]+)", text)
    n = re.search(r"\[Total Run\].*ReceivedMessages=(\d+)", text)
    if not m or not n:
        raise RuntimeError(f"no median or message count in sockperf output:\n{text[-500:]}")
    return PingPong(float(m.group(1)), int(n.group(1)))


def ping_pong(port: int, seconds: float, msg_size: int = 64) -> float:
    """`sockperf pp`: median one-way latency (RTT/2), microseconds."""
    return ping_pong_run(port, seconds, msg_size).median_us


def paced(port: int, seconds: float, mps: int, msg_size: int = 16) -> int:
    """`sockperf tp --mps`: messages sent at a fixed rate; how many were sent."""
    text = _sockperf(
        [
            "tp",
            "--tcp",
            "-i",
            HOST,
            "-p",
            str(port),
            "-t",
            str(seconds),
            "-m",
            str(msg_size),
            "--mps",
            str(mps),
        ],
        seconds + 30,
    )
    m = re.search(r"Total of (\d+) messages sent", text)
    return int(m.group(1)) if m else 0


# -- many peers: one connection per 127.0.0.x -------------------------------------------


@dataclass
class Peers:
    """Connections from 127.0.0.2.. to 127.0.0.1; in automatic peer mode the
    kernel gives each remote address a node (and 127.0.0.1 one, the accepted
    sides' remote), so n connections make n + 1 peers."""

    listener: socket.socket
    pairs: list[tuple[socket.socket, socket.socket]] = field(default_factory=list)

    def grow(self, total_peers: int) -> None:
        port = self.listener.getsockname()[1]
        while len(self.pairs) + 1 < total_peers:
            addr = f"127.0.0.{len(self.pairs) + 2}"
            c = socket.create_connection((HOST, port), source_address=(addr, 0))
            s, _ = self.listener.accept()
            for x in (c, s):
                x.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.pairs.append((c, s))

    def touch(self) -> None:
        """One round trip on every connection: an RTT sample for every peer."""
        for c, s in self.pairs:
            c.sendall(b"x")
            s.recv(16)
            s.sendall(b"y")
            c.recv(16)

    def close(self) -> None:
        for c, s in self.pairs:
            c.close()
            s.close()
        self.listener.close()


@contextlib.contextmanager
def peers(total: int) -> Iterator[Peers]:
    lst = socket.socket()
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind((HOST, 0))
    lst.listen(512)
    p = Peers(lst)
    try:
        p.grow(total)
        yield p
    finally:
        p.close()


@contextlib.contextmanager
def touching(p: Peers, every: float) -> Iterator[None]:
    """A thread that touches every peer each `every` seconds."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every):
            p.touch()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()


__all__ = [
    "Peers",
    "PingPong",
    "paced",
    "peers",
    "ping_pong",
    "ping_pong_run",
    "sockperf_server",
    "touching",
]
