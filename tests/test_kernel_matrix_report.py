"""The kernel matrix's report (tests/kernel_matrix.py) from junit files: a test
that fails under TCG and passes its one retry is reported, never hidden; one
that fails both times fails the run. Files written here, no VM booted."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import kernel_matrix as km


def junit(path: Path, cases: dict[str, str]) -> None:
    body = []
    for name, result in cases.items():
        mod, test = name.split("::")
        cls = mod.removesuffix(".py").replace("/", ".")
        inner = "" if result == "passed" else f'<{result} message="{test} went wrong&#10;more"/>'
        body.append(f'<testcase classname="{cls}" name="{test}">{inner}</testcase>')
    suite = f'<testsuite name="pytest">{"".join(body)}</testsuite>'
    path.write_text(f"<testsuites>{suite}</testsuites>")


def run_with(tmp_path: Path, first: dict[str, str], retry: dict[str, str] | None) -> km.Run:
    run = km.Run("6.1.0-test", "tcg", tmp_path)
    junit(tmp_path / "junit.xml", first)
    summary = {"pytest_rc": 0 if "failure" not in first.values() else 1, "interrupted": False}
    if retry is not None:
        junit(tmp_path / km.RETRY_JUNIT, retry)
        summary["retry_rc"] = 0 if "failure" not in retry.values() else 1
    (tmp_path / "inside.json").write_text(json.dumps(summary))
    km.check(run)
    return run


A, B = "tests/test_a.py::test_one", "tests/test_a.py::test_two[x]"


def test_a_test_that_passes_its_retry_is_a_note_with_its_first_failure(tmp_path: Path) -> None:
    run = run_with(tmp_path, {A: "passed", B: "failure"}, {B: "passed"})
    assert not run.problems and run.counts == {"passed": 2, "failure": 0, "error": 0, "skipped": 0}
    assert [o.test for o in run.flaky] == [B]
    report = km.table([run])
    assert "1 passed on retry" in report and f"{B}: test_two[x] went wrong" in report


def test_a_test_that_fails_its_retry_fails_the_run(tmp_path: Path) -> None:
    run = run_with(tmp_path, {A: "failure", B: "passed"}, {A: "failure"})
    assert run.problems == ["1 failures"] and [o.test for o in run.failed] == [A]
    assert f"{A}: failure: test_one went wrong" in km.table([run])


def test_a_skip_is_a_problem_and_not_retried(tmp_path: Path) -> None:
    run = run_with(tmp_path, {A: "skipped"}, None)
    assert run.problems == ["1 skipped"]


def test_a_guest_oops_is_found_in_the_console(tmp_path: Path) -> None:
    run = km.Run("6.12-test", "tcg", tmp_path)
    (tmp_path / "console.log").write_text(
        "tests/x.py ..[  239.781633] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI\n[  1.0] more\n"
    )
    assert km.oops(run) == "Oops: int3: 0000 [#1] PREEMPT SMP NOPTI"
    (tmp_path / "console.log").write_text("[    0.1] Booting\nall fine\n")
    assert km.oops(run) is None
