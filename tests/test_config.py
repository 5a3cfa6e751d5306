"""Config parsing and CLI bad input: one clear line, non-zero exit, no traceback."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ebpf_telemetry import config
from ebpf_telemetry.config import ConfigError


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return str(p)


def test_full_config(tmp_path: Path) -> None:
    cfg = config.load(
        write(
            tmp_path,
            """
node_name = "n1"
interval_seconds = 2
sample_rate = 1
max_peers = 10
listen = "127.0.0.1:9435"
[peers]
db = ["10.0.0.0/24", "fd00::/64"]
web = "192.0.2.1/32"
""",
        )
    )
    assert cfg.node_name == "n1" and cfg.interval_seconds == 2 and cfg.max_peers == 10
    assert cfg.peers["db"] == (
        ipaddress.ip_network("10.0.0.0/24"),
        ipaddress.ip_network("fd00::/64"),
    )
    assert cfg.listen_addr == ("127.0.0.1", 9435)


def test_sources_of_peer_names(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, 'peers_file = "/etc/ebpf-telemetry/peers"\nzone = "z1"\n'))
    assert cfg.peers_file == "/etc/ebpf-telemetry/peers" and cfg.zone == "z1"
    assert not cfg.auto_peers and not cfg.kubernetes.enabled
    text = '[kubernetes]\nenabled = true\nkubeconfig = "/k"\npod_cidrs = true\n'
    cfg = config.load(write(tmp_path, text))
    assert cfg.kubernetes == config.Kubernetes(enabled=True, kubeconfig="/k", pod_cidrs=True)
    assert not cfg.auto_peers and cfg.peers_file is None
    assert config.load(write(tmp_path, "[kubernetes]\nenabled = false\n")).auto_peers


def test_flags_override_file(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, 'node_name = "a"\n'), {"node_name": "b", "textfile": None})
    assert cfg.node_name == "b" and cfg.textfile == config.DEFAULT_TEXTFILE


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("node_name = ", "invalid TOML"),
        ("colour = 1", "unknown key 'colour'"),
        ('interval_seconds = "5"', "interval_seconds must be int or float"),
        ("sample_rate = true", "sample_rate must be int"),
        ("interval_seconds = 0", "interval_seconds must be >= 1"),
        ("interval_seconds = -1", "interval_seconds must be >= 1"),
        ("interval_seconds = 0.5", "interval_seconds must be >= 1 (seconds)"),
        ("sample_rate = -1", "sample_rate must be >= 0"),
        ("max_peers = 0", "max_peers must be"),
        ('[peers]\na = ["10.0.0.0/33"]', "bad CIDR '10.0.0.0/33'"),
        ('[peers]\na = ["10.0.0.1/24"]', "bad CIDR '10.0.0.1/24'"),
        ('[peers]\na = ["10.0.0.0/24"]\nb = ["10.0.0.0/24"]', "listed under both 'a' and 'b'"),
        ('[peers]\nother = ["10.0.0.0/24"]', "not 'other'"),
        ("[peers]\na = [1]", "list of CIDR strings"),
        ('listen = "nope"', "not HOST:PORT"),
        ('max_peers = 1\n[peers]\na = ["10.0.0.0/24"]\nb = ["10.1.0.0/24"]', "2 peers configured"),
        (
            'peers_file = "/etc/p"\n[peers]\na = ["10.0.0.0/24"]',
            "and peers_file cannot be combined",
        ),
        (
            'peers_file = "/etc/p"\n[kubernetes]\nenabled = true',
            "peers_file and .kubernetes. enabled cannot be combined",
        ),
        ('peers_file = ""', "peers_file must not be empty"),
        ("peers_file = 1", "peers_file must be str"),
        ("zone = 1", "zone must be str"),
        ('[kubernetes]\nenabled = "yes"', "kubernetes.enabled must be bool"),
        ("[kubernetes]\nwatch = true", "unknown key 'kubernetes.watch'"),
        ('[kubernetes]\nkubeconfig = ""', "kubernetes.kubeconfig must not be empty"),
    ],
)
def test_bad_config_is_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config.load(write(tmp_path, text))


@given(
    st.dictionaries(
        st.text(max_size=12),
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(),
            st.floats(),
            st.text(max_size=20),
            st.lists(st.text(max_size=20), max_size=3),
            st.dictionaries(
                st.text(max_size=8), st.lists(st.text(max_size=20), max_size=3), max_size=3
            ),
        ),
        max_size=6,
    )
)
def test_any_mapping_gives_config_or_config_error(data: dict[str, object]) -> None:
    try:
        config.from_mapping(data, "fuzz")
    except ConfigError as e:
        assert "\n" not in str(e)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ebpf_telemetry", *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "--config", "/nonexistent.toml", "--once"], "No such file"),
        (["inspect", "--pin-dir", "/sys/fs/bpf/ebt-does-not-exist"], "nothing pinned"),
        (["events", "--pin-dir", "/sys/fs/bpf/ebt-does-not-exist"], "nothing pinned"),
    ],
)
def test_cli_errors_are_one_line(args: list[str], message: str) -> None:
    r = cli(*args)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    lines = [x for x in r.stderr.splitlines() if x.startswith("ebpf-telemetry: error:")]
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_cli_bad_config_file(tmp_path: Path) -> None:
    r = cli("run", "--once", "--config", write(tmp_path, "colour = 1"))
    assert r.returncode == 1 and "unknown key 'colour'" in r.stderr and "Traceback" not in r.stderr


def test_cli_usage_error() -> None:
    r = cli("run", "--interval", "0")
    assert r.returncode == 2 and "must be > 0" in r.stderr
