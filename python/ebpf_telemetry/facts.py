"""What the running kernel offers the BPF object, read from its BTF.

This is the only input of the plan (plan.py): which tracepoints exist and
which arguments each passes to a tp_btf program (the `btf_trace_<name>`
typedef), which map types and helpers the kernel knows (`enum bpf_map_type`,
`enum bpf_func_id`) and which of the kfuncs the object may call it has (a
FUNC of that name in its BTF). Facts are plain data with a JSON form, so the plan is
tested with the recorded facts of every kernel of the matrix
(tests/data/kernels/*.json) and a kernel without a feature is simulated by
removing it from the facts (EBPF_TELEMETRY_FACTS=<file> makes `run` and
`doctor` use a recorded file instead of this kernel's BTF).

`python -m ebpf_telemetry.facts` prints this kernel's facts as JSON.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import dataclass, field
from typing import Any

from ebpf_telemetry import btf
from ebpf_telemetry.binding import TelemetryError

# every tracepoint the object hooks (plan.py names which arguments it reads)
TRACEPOINTS = (
    "tcp_probe",
    "tcp_retransmit_skb",
    "tcp_retransmit_synack",
    "kfree_skb",
    "sched_switch",
)
# every kfunc the object may call (plan.py names the variants that do)
KFUNCS = ("bpf_rdonly_cast",)
FACTS_ENV = "EBPF_TELEMETRY_FACTS"


@dataclass(frozen=True)
class KernelFacts:
    release: str
    btf: bool
    # tracepoint -> the C types of its arguments (the tp_btf context, in order)
    tracepoints: dict[str, tuple[str, ...]] = field(default_factory=dict)
    map_types: frozenset[str] = frozenset()  # BPF_MAP_TYPE_* without the prefix
    helpers: frozenset[str] = frozenset()  # BPF_FUNC_* without the prefix
    kfuncs: frozenset[str] = frozenset()  # those of KFUNCS the kernel has

    def to_json(self) -> str:
        return json.dumps(
            {
                "release": self.release,
                "btf": self.btf,
                "tracepoints": {k: list(v) for k, v in sorted(self.tracepoints.items())},
                "map_types": sorted(self.map_types),
                "helpers": sorted(self.helpers),
                "kfuncs": sorted(self.kfuncs),
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> KernelFacts:
        d: dict[str, Any] = json.loads(text)
        return cls(
            release=str(d["release"]),
            btf=bool(d["btf"]),
            tracepoints={k: tuple(v) for k, v in d["tracepoints"].items()},
            map_types=frozenset(d["map_types"]),
            helpers=frozenset(d["helpers"]),
            # facts recorded before kfuncs were: none (the plan falls back to helpers)
            kfuncs=frozenset(d.get("kfuncs", ())),
        )

    def without(self, *features: str) -> KernelFacts:
        """These facts less some features (tests: a kernel that lacks them).

        A feature is `tracepoint:NAME`, `tracepoint:NAME:N` (only its first N
        arguments), `map_type:NAME`, `helper:NAME` or `kfunc:NAME`."""
        tps, maps, helpers = dict(self.tracepoints), set(self.map_types), set(self.helpers)
        kfuncs = set(self.kfuncs)
        for feat in features:
            kind, name, *rest = feat.split(":")
            if kind == "tracepoint" and rest:
                tps[name] = tps[name][: int(rest[0])]
            elif kind == "tracepoint":
                tps.pop(name, None)
            elif kind == "map_type":
                maps.discard(name)
            elif kind == "helper":
                helpers.discard(name)
            elif kind == "kfunc":
                kfuncs.discard(name)
            else:
                raise ValueError(f"unknown feature kind {feat!r}")
        return KernelFacts(
            self.release, self.btf, tps, frozenset(maps), frozenset(helpers), frozenset(kfuncs)
        )


def read() -> KernelFacts:
    """This kernel's facts, from its BTF (none without BTF)."""
    release = platform.release()
    if not os.path.exists(btf.btf_path()):
        return KernelFacts(release, False)
    with btf.vmlinux() as b:
        tps = {
            name: args
            for name in TRACEPOINTS
            if (args := btf.typedef_args(b, "btf_trace_" + name)) is not None
        }
        return KernelFacts(
            release,
            True,
            tps,
            frozenset(btf.enum_names(b, "bpf_map_type", "BPF_MAP_TYPE_")),
            frozenset(btf.enum_names(b, "bpf_func_id", "BPF_FUNC_")),
            frozenset(k for k in KFUNCS if btf.has_func(b, k)),
        )


def current() -> KernelFacts:
    """The facts the plan uses: EBPF_TELEMETRY_FACTS if set, else this kernel's."""
    path = os.environ.get(FACTS_ENV)
    if not path:
        return read()
    try:
        with open(path) as f:
            return KernelFacts.from_json(f.read())
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TelemetryError(f"{FACTS_ENV}={path}: not a facts file ({e})") from None


if __name__ == "__main__":
    from ebpf_telemetry import log

    log.setup()
    sys.stdout.write(read().to_json() + "\n")
