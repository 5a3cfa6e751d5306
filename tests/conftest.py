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
