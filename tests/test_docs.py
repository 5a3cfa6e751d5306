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


def test_readme_inspect_sample_is_what_inspect_prints() -> None:
    """The README's `inspect` sample is report.as_text of a real reading
    (tests/data/inspect_sample.json; tests/docsample.py records a new one).
    Drop reason names come from the running kernel's BTF, which differs
    between kernels: the recorded names stand in for that one read."""
    import json

    import docsample
    from ebpf_telemetry import report

    d = json.loads(docsample.SAMPLE.read_text())
    snap, _ = docsample.from_json(d)
    readme = (ROOT / "README.md").read_text()
    command = "$ ebpf-telemetry inspect --node 2\n"
    start = readme.index(command) + len(command)
    shown = readme[start : readme.index("```", start)].rstrip("\n")
    with docsample.recorded_kernel(d):
        assert shown == report.as_text(snap, 2), "README.md's inspect sample is stale"


def test_readme_textfile_sample_is_what_the_agent_writes() -> None:
    """The README's textfile sample is the collector's output for the same
    reading (its first interval), abridged by docsample.abridged."""
    import json

    import docsample

    d = json.loads(docsample.SAMPLE.read_text())
    readme = (ROOT / "README.md").read_text()
    head = "### The textfile (abridged: `le` buckets cut)"
    start = readme.index("```\n", readme.index(head)) + 4
    shown = readme[start : readme.index("```", start)].rstrip("\n")
    assert shown == docsample.abridged(docsample.textfile(d)), (
        "README.md's textfile sample is stale: `.venv/bin/python tests/docsample.py textfile`"
    )
