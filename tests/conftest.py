"""Suite-wide rules.

EBPF_TELEMETRY_STRICT=1 (set by .ci/run) turns every skip into a failure:
in CI a test that cannot run is a broken machine or a missing install step,
never something to pass over.
"""

from __future__ import annotations

import os

import pytest

STRICT = os.environ.get("EBPF_TELEMETRY_STRICT") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if STRICT and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped in strict mode (EBPF_TELEMETRY_STRICT=1): {reason}"


# -- kernel fixtures -------------------------------------------------------------

import itertools  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

_pin_ids = itertools.count(1)


def require_kernel() -> None:
    if os.geteuid() != 0:
        pytest.skip("kernel tests need root")
    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        pytest.skip("kernel tests need BTF (/sys/kernel/btf/vmlinux)")


@pytest.fixture
def pin_dir() -> Iterator[str]:
    """A fresh pin dir on bpffs for one test; everything in it is unloaded after."""
    require_kernel()
    from ebpf_telemetry import loader

    d = f"/sys/fs/bpf/ebt-test-{os.getpid()}-{next(_pin_ids)}"
    yield d
    if os.path.isdir(d):
        loader.unload(d)


FULL_DETAIL = {"peer_detail": "histogram", "max_series": 10_000_000}
FULL_DETAIL_TOML = 'peer_detail = "histogram"\nmax_series = 10000000\n'


@pytest.fixture
def make_config(pin_dir: str, tmp_path: Path) -> Any:
    """make_config(**keys) -> Config with this test's pin dir and textfile."""
    from ebpf_telemetry import config

    def make(**keys: Any) -> config.Config:
        base = {
            "pin_dir": pin_dir,
            "textfile": str(tmp_path / "ebpf_telemetry.prom"),
            "node_name": "test-node",
            "interval_seconds": 1,
            # the tests before the series budget check every peer's histogram
            # (test_budget.py and test_peers.py's budget test pass their own)
            **FULL_DETAIL,
        }
        return config.from_mapping({**base, **keys}, "test")

    return make


@pytest.fixture
def agents() -> Iterator[list[Any]]:
    """Agent processes a test starts (test_reliability.AgentProc), killed after it."""
    started: list[Any] = []
    yield started
    for a in started:
        a.kill()
