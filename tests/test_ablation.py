"""The ablation variants of `make bench` part 1c (bench/ablation.py): every
part the header defines is measured, and every variant builds. Building is
all a test can check here; what each variant costs is the benchmark's job."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import ablation  # noqa: E402
import probes  # noqa: E402


def _header_bits() -> dict[str, int]:
    text = (ROOT / "bpf" / "ablate.bpf.h").read_text()
    return {
        m[1]: 1 << int(m[2]) for m in re.finditer(r"#define (ABLATE_\w+)\s+\(1 << (\d+)\)", text)
    }


def test_every_part_of_the_header_is_measured_once() -> None:
    bits = sorted(b for _, b in ablation.PARTS)
    assert bits == sorted(_header_bits().values())
    assert sum(bits) == ablation.ALL_BUT_FLOOR


def test_each_alone_variant_keeps_what_it_names() -> None:
    """A variant with everything but one part removed keeps that part's bits
    only: the histogram add (with its slot and the ack check), the ack check."""
    h = _header_bits()
    kept = {part: ablation.ALL_BUT_FLOOR & ~bits for part, bits in ablation.ALONE}
    assert (
        kept[ablation.HIST_ALONE]
        == h["ABLATE_HOST_HIST"] | h["ABLATE_SLOT"] | h["ABLATE_ACK_CHECK"]
    )
    assert kept[ablation.ACK_ALONE] == h["ABLATE_ACK_CHECK"]


@pytest.mark.parametrize(
    "bits",
    [b for _, b in ablation.PARTS] + [ablation.ALL_BUT_FLOOR] + [b for _, b in ablation.ALONE],
)
def test_each_variant_builds(bits: int, tmp_path: Path) -> None:
    out = probes.compile_bpf(ablation.SRC, str(tmp_path / "v.bpf.o"), [f"-DEBT_ABLATE={bits}"])
    assert os.path.getsize(out) > 0
