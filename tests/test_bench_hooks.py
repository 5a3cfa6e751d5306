"""`make bench` part 1's arithmetic (bench/hooks.py), on figures given here:
the sched comparison with runqlat is of totals per context switch, and a hook
none of our programs is on counts as 0 ns, not as a missing figure. What the
programs cost is the benchmark's job; no BPF is loaded here."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import ablation  # noqa: E402
import hooks  # noqa: E402
from hooks import HookCost, HookResult  # noqa: E402


def _result() -> HookResult:
    switches, wakeups = 1000, 600
    costs = [
        HookCost("sched_switch", "ours", "bulk", 150.0, switches, 150 * switches),
        HookCost("sched_switch", "empty", "bulk", 75.0, switches, 75 * switches),
        HookCost("sched_switch", "runqlat", "bulk", 500.0, switches, 500 * switches),
        HookCost("sched_wakeup", "runqlat", "bulk", 400.0, wakeups, 400 * wakeups),
        HookCost("sched_wakeup_new", "runqlat", "bulk", 2000.0, 5, 2000 * 5),
        HookCost("sched_wakeup", "ours", "bulk", 0.0, 0, 0, attached=False),
    ]
    return HookResult(costs, 5.0, [], {"bulk": 1.0})


def test_runqlat_total_adds_its_wakeup_programs_per_switch() -> None:
    r = _result()
    assert r.sched_total("runqlat", "bulk") == (500 * 1000 + 400 * 600 + 2000 * 5) / 1000
    assert r.sched_total("ours", "bulk") == 150.0  # one program, on sched_switch
    assert r.sched_total("ours", "ping-pong") is None  # nothing measured there


def test_a_hook_without_our_program_is_zero_not_missing() -> None:
    assert _result().ns("sched_wakeup", "ours", "bulk") == 0.0


def test_runqlat_programs_map_to_their_hooks_despite_15_char_names() -> None:
    assert hooks.hook_of("sched_wakeup_ne") == "sched_wakeup_new"  # as bpf_prog_info has it
    assert hooks.hook_of("sched_wakeup") == "sched_wakeup"
    assert hooks.hook_of("sched_switch") == "sched_switch"
    assert hooks.hook_of("handle_sched_sw") is None


def test_sched_ablation_parts_are_parts_of_the_header() -> None:
    bits = {b for _, b in ablation.PARTS}
    assert set(ablation.SCHED_PARTS) <= bits
    for part, bit in ablation.PARTS:
        assert (ablation.sched_label(part) is None) == (bit not in ablation.SCHED_PARTS)
