"""Documentation that is generated from the code stays equal to it."""

from __future__ import annotations

from pathlib import Path

from ebpf_telemetry import metrics, plan

ROOT = Path(__file__).resolve().parents[1]


def test_metrics_md_is_generated_from_the_code() -> None:
    assert (ROOT / "docs" / "metrics.md").read_text() == metrics.markdown(), (
        "docs/metrics.md is stale: run `make docs`"
    )


def test_readme_lists_every_metric() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [name for name in metrics.METRICS if name not in readme]
    assert not missing, f"README.md does not mention {missing}"


def test_kernels_md_is_generated_from_the_plan() -> None:
    assert (ROOT / "docs" / "kernels.md").read_text() == plan.markdown(), (
        "docs/kernels.md is stale: run `make docs`"
    )
