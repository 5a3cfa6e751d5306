"""Configuration: TOML file, then command-line flags on top; validated whole.

Every problem is a ConfigError with one line naming the key and the file.
"""

from __future__ import annotations

import ipaddress
import math
import socket
import tomllib
from dataclasses import dataclass, field, fields, replace
from typing import Any, cast

import structlog

from ebpf_telemetry.binding import TelemetryError, lib
from ebpf_telemetry.histogram import EDGE_SCHEMES, edge_slots
from ebpf_telemetry.maps import DEFAULT_PIN_DIR

DEFAULT_TEXTFILE = "/var/lib/prometheus/node-exporter/ebpf_telemetry.prom"
DEFAULT_CONFIG = "/etc/ebpf-telemetry/config.toml"
RESERVED_PEER = "other"

log = structlog.get_logger("config")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(TelemetryError):
    pass


@dataclass(frozen=True)
class Kubernetes:
    """[kubernetes]: name peers after the cluster's Node objects (kubenodes.py)."""

    enabled: bool = False
    kubeconfig: str | None = None  # default: in-cluster service account, then $KUBECONFIG
    pod_cidrs: bool = False  # also map each node's spec.podCIDRs to it


_KUBE_TYPES: dict[str, type] = {"enabled": bool, "kubeconfig": str, "pod_cidrs": bool}


@dataclass(frozen=True)
class Config:
    node_name: str = field(default_factory=socket.gethostname)
    interval_seconds: float = 5.0
    pin_dir: str = DEFAULT_PIN_DIR
    textfile: str = DEFAULT_TEXTFILE
    listen: str | None = None
    sample_rate: int = 100
    max_peers: int = 255
    peer_idle_seconds: float = 900.0
    auto_peer_prefix_v4: int = 32
    auto_peer_prefix_v6: int = 128
    # per-peer ebpf_tcp_rtt_seconds: which kernel bucket edges, in what range
    # (docs/metrics.md, "Buckets": lines per peer against PromQL accuracy)
    rtt_buckets: str = "pow2x2"
    rtt_bucket_range_seconds: tuple[float, float] = (0.00005, 0.5)
    debug_trace: bool = False
    # pins of another layout: replaced by `run` (False) or refused (True)
    strict_pins: bool = False
    peers: dict[str, tuple[Network, ...]] = field(default_factory=dict)
    peers_file: str | None = None  # lines `CIDR NAME [ZONE]` (peersfile.py), re-read on change
    zone: str = ""  # this node's zone (outside Kubernetes: there its Node's label says it)
    kubernetes: Kubernetes = field(default_factory=Kubernetes)
    # the series budget (budget.py): samples in the export at most, what per-peer
    # detail the worst peers get, and how many intervals a peer keeps it
    max_series: int = 1000
    peer_detail: str = "quantiles"
    peer_detail_hold_intervals: int = 12

    @property
    def auto_peers(self) -> bool:
        """No peer names from anywhere: the kernel hands out one id per address."""
        return not (self.peers or self.peers_file or self.kubernetes.enabled)

    @property
    def listen_addr(self) -> tuple[str, int] | None:
        return parse_listen(self.listen) if self.listen else None


_TYPES: dict[str, tuple[type, ...]] = {
    "node_name": (str,),
    "interval_seconds": (int, float),
    "pin_dir": (str,),
    "textfile": (str,),
    "listen": (str,),
    "sample_rate": (int,),
    "max_peers": (int,),
    "peer_idle_seconds": (int, float),
    "auto_peer_prefix_v4": (int,),
    "auto_peer_prefix_v6": (int,),
    "rtt_buckets": (str,),
    "rtt_bucket_range_seconds": (list,),
    "debug_trace": (bool,),
    "strict_pins": (bool,),
    "peers": (dict,),
    "peers_file": (str,),
    "zone": (str,),
    "kubernetes": (dict,),
    "max_series": (int,),
    "peer_detail": (str,),
    "peer_detail_hold_intervals": (int,),
}


LOOPBACK = "127.0.0.1"
MIN_INTERVAL = 1.0  # a collection reads every map: sub-second intervals cost more than they show
MAX_INTERVAL = 86400.0
MAX_SAMPLE_RATE = 2**32 - 1
PEER_DETAILS = ("quantiles", "histogram", "none")
# max_series: no config exports fewer samples than this (the host, zone and
# agent families; the exact minimum of a config is checked at start: budget.py)
MIN_MAX_SERIES = 200
MAX_MAX_SERIES = 10_000_000
MAX_HOLD_INTERVALS = 100_000


def parse_listen(value: str) -> tuple[str, int]:
    """HOST:PORT, [V6]:PORT; a bare PORT or :PORT means loopback (127.0.0.1):
    serving every interface takes an explicit 0.0.0.0:PORT or [::]:PORT."""
    host, _, port = value.rpartition(":")
    host = host.strip("[]") or LOOPBACK
    if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ConfigError(f"listen: {value!r} is not HOST:PORT (or PORT for loopback)")
    return host, int(port)


def peer_name_problem(name: str) -> str | None:
    """Why a peer name cannot be used (the kernel's peer_info holds it), or None."""
    if not name or name == RESERVED_PEER or "\0" in name or len(name.encode()) >= lib.PEER_NAME_LEN:
        return (
            f"peer name {name!r} must be 1..{lib.PEER_NAME_LEN - 1} bytes, "
            f"without NUL, and not '{RESERVED_PEER}'"
        )
    return None


def parse_peers(raw: dict[str, Any], where: str) -> dict[str, tuple[Network, ...]]:
    peers: dict[str, tuple[Network, ...]] = {}
    owner: dict[Network, str] = {}
    for name, cidrs in raw.items():
        problem = peer_name_problem(name)
        if problem:
            raise ConfigError(f"{where}: {problem}")
        if isinstance(cidrs, str):
            cidrs = [cidrs]
        if not isinstance(cidrs, list) or not all(isinstance(c, str) for c in cidrs) or not cidrs:
            raise ConfigError(f"{where}: peers.{name!r} must be a list of CIDR strings")
        nets = []
        for c in cidrs:
            try:
                net = ipaddress.ip_network(c, strict=True)
            except ValueError as e:
                raise ConfigError(f"{where}: peers.{name!r}: bad CIDR {c!r}: {e}") from None
            if net in owner:
                raise ConfigError(
                    f"{where}: CIDR {net} is listed under both {owner[net]!r} and {name!r}"
                )
            owner[net] = name
            nets.append(net)
        peers[name] = tuple(nets)
    return peers


def parse_kubernetes(raw: dict[str, Any], where: str) -> Kubernetes:
    for key, val in raw.items():
        want = _KUBE_TYPES.get(key)
        if want is None:
            raise ConfigError(f"{where}: unknown key 'kubernetes.{key}'")
        if not isinstance(val, want):
            raise ConfigError(
                f"{where}: kubernetes.{key} must be {want.__name__}, not {type(val).__name__}"
            )
    return Kubernetes(**raw)


def parse_range(raw: list[Any], where: str) -> tuple[float, float]:
    ok = len(raw) == 2 and all(isinstance(x, int | float) and not isinstance(x, bool) for x in raw)
    if not ok:
        raise ConfigError(f"{where}: rtt_bucket_range_seconds must be [low, high], two numbers")
    return float(raw[0]), float(raw[1])


def from_mapping(data: dict[str, Any], where: str, base: Config | None = None) -> Config:
    cfg = base or Config()
    values: dict[str, Any] = {}
    known = {f.name for f in fields(Config)}
    for key, val in data.items():
        if key not in known:
            raise ConfigError(f"{where}: unknown key {key!r}")
        if val is None:
            continue
        want = _TYPES[key]
        if (isinstance(val, bool) and bool not in want) or not isinstance(val, want):
            names = " or ".join(t.__name__ for t in want)
            raise ConfigError(f"{where}: {key} must be {names}, not {type(val).__name__}")
        if key == "peers":
            val = parse_peers(cast(dict[str, Any], val), where)
        elif key == "kubernetes":
            val = parse_kubernetes(cast(dict[str, Any], val), where)
        elif key == "rtt_bucket_range_seconds":
            val = parse_range(cast(list[Any], val), where)
        values[key] = val
    cfg = replace(cfg, **values)
    validate(cfg, where)
    return cfg


def validate(cfg: Config, where: str) -> None:
    if not (math.isfinite(cfg.interval_seconds) and cfg.interval_seconds >= MIN_INTERVAL):
        raise ConfigError(f"{where}: interval_seconds must be >= {MIN_INTERVAL:g} (seconds)")
    if cfg.interval_seconds > MAX_INTERVAL:
        raise ConfigError(f"{where}: interval_seconds must be <= {MAX_INTERVAL:g}")
    if cfg.sample_rate < 0:
        raise ConfigError(f"{where}: sample_rate must be >= 0 (0 turns events off)")
    if cfg.sample_rate > MAX_SAMPLE_RATE:
        raise ConfigError(f"{where}: sample_rate must be <= {MAX_SAMPLE_RATE}")
    for key in ("pin_dir", "textfile"):
        if not getattr(cfg, key):
            raise ConfigError(f"{where}: {key} must not be empty")
    for key in ("node_name", "pin_dir", "textfile", "listen", "peers_file", "zone"):
        if "\0" in (getattr(cfg, key) or ""):
            raise ConfigError(f"{where}: {key} must not contain a NUL character")
    if not 1 <= cfg.max_peers <= lib.MAX_PEERS_LIMIT:
        raise ConfigError(f"{where}: max_peers must be 1..{lib.MAX_PEERS_LIMIT}")
    if not (math.isfinite(cfg.peer_idle_seconds) and cfg.peer_idle_seconds > 0):
        raise ConfigError(f"{where}: peer_idle_seconds must be > 0")
    for key, top in (("auto_peer_prefix_v4", 32), ("auto_peer_prefix_v6", 128)):
        if not 0 <= getattr(cfg, key) <= top:
            raise ConfigError(f"{where}: {key} must be 0..{top}")
    if cfg.rtt_buckets not in EDGE_SCHEMES:
        raise ConfigError(f"{where}: rtt_buckets must be one of {', '.join(EDGE_SCHEMES)}")
    low, high = cfg.rtt_bucket_range_seconds
    if not (math.isfinite(high) and 0 <= low < high):
        raise ConfigError(f"{where}: rtt_bucket_range_seconds must be [low, high], 0 <= low < high")
    if not edge_slots(cfg.rtt_buckets, low, high):
        raise ConfigError(
            f"{where}: rtt_bucket_range_seconds [{low:g}, {high:g}] holds no {cfg.rtt_buckets} edge"
        )
    validate_budget(cfg, where)
    if len(cfg.peers) > cfg.max_peers:
        raise ConfigError(f"{where}: {len(cfg.peers)} peers configured, max_peers {cfg.max_peers}")
    if not cfg.node_name:
        raise ConfigError(f"{where}: node_name must not be empty")
    validate_sources(cfg, where)
    if cfg.listen:
        try:
            parse_listen(cfg.listen)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None


def validate_budget(cfg: Config, where: str) -> None:
    if not MIN_MAX_SERIES <= cfg.max_series <= MAX_MAX_SERIES:
        raise ConfigError(f"{where}: max_series must be {MIN_MAX_SERIES}..{MAX_MAX_SERIES}")
    if cfg.peer_detail not in PEER_DETAILS:
        raise ConfigError(f"{where}: peer_detail must be one of {', '.join(PEER_DETAILS)}")
    if not 0 <= cfg.peer_detail_hold_intervals <= MAX_HOLD_INTERVALS:
        raise ConfigError(f"{where}: peer_detail_hold_intervals must be 0..{MAX_HOLD_INTERVALS}")


def validate_sources(cfg: Config, where: str) -> None:
    """One source of peer names: [peers], peers_file or [kubernetes]."""
    if cfg.peers_file == "":
        raise ConfigError(f"{where}: peers_file must not be empty")
    if cfg.kubernetes.kubeconfig == "":
        raise ConfigError(f"{where}: kubernetes.kubeconfig must not be empty")
    used = [
        name
        for name, on in (
            ("[peers]", bool(cfg.peers)),
            ("peers_file", cfg.peers_file is not None),
            ("[kubernetes] enabled", cfg.kubernetes.enabled),
        )
        if on
    ]
    if len(used) > 1:
        raise ConfigError(
            f"{where}: {' and '.join(used)} cannot be combined: peers are named by one of them"
        )


def load(path: str | None, overrides: dict[str, Any] | None = None) -> Config:
    """The config file (if any) with flags (non-None overrides) on top."""
    data: dict[str, Any] = {}
    where = path or "defaults"
    if path:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"{path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}): TOML is UTF-8") from None
        if not data:  # a truncated or mistyped file reads as "all defaults": say so
            log.warning("config file holds no settings; running on the defaults", config=path)
    cfg = from_mapping(data, where)
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    return from_mapping(flags, "command line", cfg) if flags else cfg
