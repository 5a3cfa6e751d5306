"""Which programs of the object run on a kernel: a pure function of its facts.

Every kernel feature the object uses is a `Feature` here with the first
kernel that has it. Each collector lists its variants, best first; a variant
is a set of programs (one per tracepoint) and the features they need. The
plan takes, per collector, the first variant whose features the kernel has,
or none (the collector is skipped, with the features it lacks). The loader
and `doctor` both call `plan()`; docs/kernels.md is generated from here.
"""

from __future__ import annotations

from dataclasses import dataclass

from ebpf_telemetry.facts import KernelFacts

MIN_KERNEL = "5.10"  # retrans, drops and sched (the matrix boots it); rtt from 6.1


@dataclass(frozen=True)
class Feature:
    # "helper", "map_type", "tracepoint", "kfunc": as in KernelFacts.without(),
    # read from BTF; "bpf": what BTF cannot show (the load itself finds it missing)
    kind: str
    name: str
    since: str  # the first kernel that has it
    args: tuple[str, ...] = ()  # tracepoints: the argument types read, in order

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.name}" + (f":{len(self.args)}" if self.args else "")

    def __str__(self) -> str:
        if self.kind == "bpf":
            return self.name
        if self.kind == "tracepoint":
            return f"tracepoint {self.name}({', '.join(self.args)})"
        return f"{self.kind.replace('_', ' ')} {self.name}"

    def present(self, f: KernelFacts) -> bool:
        if self.kind == "bpf":
            return True  # no fact to check: a kernel without it rejects the load
        if self.kind == "helper":
            return self.name in f.helpers
        if self.kind == "map_type":
            return self.name in f.map_types
        if self.kind == "kfunc":
            return self.name in f.kfuncs
        have = f.tracepoints.get(self.name)
        return have is not None and have[: len(self.args)] == self.args


def _tp(name: str, since: str, *args: str) -> Feature:
    return Feature("tracepoint", name, since, args)


@dataclass(frozen=True)
class Hook:
    tracepoint: str
    program: str
    feature: Feature  # the tracepoint with the arguments the program reads


@dataclass(frozen=True)
class Variant:
    name: str
    hooks: tuple[Hook, ...]
    needs: tuple[Feature, ...] = ()  # besides the hooks' tracepoints
    loses: str = ""  # what it does not measure that the best variant does

    @property
    def programs(self) -> frozenset[str]:
        return frozenset(h.program for h in self.hooks)

    def features(self) -> tuple[Feature, ...]:
        return tuple(h.feature for h in self.hooks) + self.needs


@dataclass(frozen=True)
class Collector:
    name: str
    variants: tuple[Variant, ...]  # best first; all hook the same tracepoints

    @property
    def tracepoints(self) -> tuple[str, ...]:
        return tuple(h.tracepoint for h in self.variants[0].hooks)


def _same(name: str, feature: Feature) -> Hook:
    """A hook whose program is named after its tracepoint."""
    return Hook(name, name, feature)


# Every load creates every map of the object, and every program uses these.
OBJECT_NEEDS = (
    Feature("bpf", "tp_btf programs (BPF_TRACE_RAW_TP)", "5.5"),
    Feature("bpf", "pinned raw tracepoint links", "5.7"),
    # node_metrics_map, peer_info_map, peer_seen_map: the agent reads them in place
    Feature("bpf", "mmap-able array maps (BPF_F_MMAPABLE)", "5.5"),
    Feature("map_type", "RINGBUF", "5.8"),
    Feature("map_type", "LPM_TRIE", "4.11"),
    Feature("map_type", "PERCPU_HASH", "4.6"),  # drops of subsystem reasons
    Feature("map_type", "QUEUE", "4.20"),  # the free automatic peer ids
    Feature("map_type", "SK_STORAGE", "5.2"),
    Feature("helper", "ringbuf_query", "5.8"),
    Feature("helper", "ktime_get_ns", "4.1"),
)
SK_STORAGE_GET = Feature("helper", "sk_storage_get", "5.11")  # from tracing programs
# for every program type since 6.2 (the generic kfunc set): the socket as a
# tcp_sock without a helper call
RDONLY_CAST = Feature("kfunc", "bpf_rdonly_cast", "6.2")
# sched: the run queue's clock via next->se.cfs_rq->rq (CO-RE; a kernel
# without these fields rejects the load, and the collector is skipped)
RQ_FIELDS = Feature(
    "bpf",
    "task_struct.se.cfs_rq->rq and sched_info.last_queued "
    "(CONFIG_FAIR_GROUP_SCHED, CONFIG_SCHED_INFO)",
    "2.6.24",
)
SOCK = "struct sock *"
SKB = "struct sk_buff *"
TASK = "struct task_struct *"
TCP_PROBE = _tp("tcp_probe", "4.16", SOCK, SKB)
TCP_RETRANSMIT = _tp("tcp_retransmit_skb", "4.16", SOCK, SKB)
TCP_RETRANSMIT_ERR = _tp("tcp_retransmit_skb", "6.17", SOCK, SKB, "int")
SYNACK = Hook(
    "tcp_retransmit_synack",
    "retrans_synack",
    _tp("tcp_retransmit_synack", "4.16", SOCK, "struct request_sock *"),
)
KFREE_SKB = _tp("kfree_skb", "4.16", SKB, "void *")
KFREE_SKB_REASON = _tp("kfree_skb", "5.17", SKB, "void *", "enum skb_drop_reason")

SWITCH = _tp("sched_switch", "4.16", "bool", TASK, TASK)

COLLECTORS = (
    Collector(
        "rtt",
        (
            Variant(
                "tp_btf_cast",
                (Hook("tcp_probe", "tcp_probe_cast", TCP_PROBE),),
                (RDONLY_CAST, SK_STORAGE_GET),
            ),
            Variant(
                "tp_btf",
                (_same("tcp_probe", TCP_PROBE),),
                (Feature("helper", "skc_to_tcp_sock", "5.9"), SK_STORAGE_GET),
                "nothing: the socket is cast by a helper call (bpf_skc_to_tcp_sock), "
                "15-30 ns more per event",
            ),
        ),
    ),
    Collector(
        "retrans",
        (
            Variant(
                "tp_btf_err",
                (Hook("tcp_retransmit_skb", "retrans_skb_err", TCP_RETRANSMIT_ERR), SYNACK),
                (SK_STORAGE_GET,),
            ),
            Variant(
                "tp_btf",
                (Hook("tcp_retransmit_skb", "retrans_skb", TCP_RETRANSMIT), SYNACK),
                (SK_STORAGE_GET,),
                "nothing: these kernels fire the tracepoint only for retransmits that went out",
            ),
            # before 5.11 the helper exists but tracing programs may not call
            # it: BTF cannot tell, the verifier's rejection of `tp_btf` can
            # (the loader then takes the next variant)
            Variant(
                "tp_btf_nosk",
                (Hook("tcp_retransmit_skb", "retrans_nosk", TCP_RETRANSMIT), SYNACK),
                (),
                "nothing: the peer is looked up in the tables for each retransmit "
                "(no socket cache)",
            ),
        ),
    ),
    Collector(
        "drops",
        (
            Variant("tp_btf_reason", (Hook("kfree_skb", "drop_reason", KFREE_SKB_REASON),)),
            Variant(
                "tp_btf_noreason",
                (Hook("kfree_skb", "drop_noreason", KFREE_SKB),),
                loses='the drop reason: every drop counts as reason="unknown"',
            ),
        ),
    ),
    Collector(
        "sched",
        (Variant("rq_clock", (_same("sched_switch", SWITCH),), (RQ_FIELDS,)),),
    ),
)
BY_NAME = {c.name: c for c in COLLECTORS}

# The oldest kernel `make test-kernels` boots on which each collector passed
# its tests (tests/kernel_matrix.py; update with the matrix): "supported" from
# there. Older kernels whose BTF has the features are "expected", not booted.
PROVED = {"rtt": "6.1", "retrans": "5.10", "drops": "5.10", "sched": "5.10"}


@dataclass(frozen=True)
class Choice:
    collector: Collector
    variant: Variant | None  # None: skipped
    why: str = ""  # skipped: what the kernel lacks; degraded: what the variant loses
    # the later variants the facts allow too: the loader tries them in turn
    # when the kernel rejects `variant` (what BTF cannot show)
    rest: tuple[Variant, ...] = ()

    def candidates(self) -> tuple[Variant, ...]:
        return ((self.variant,) if self.variant else ()) + self.rest

    def taking(self, v: Variant) -> Choice:
        """This choice with v, the variant the kernel took."""
        return Choice(self.collector, v, v.loses)

    @property
    def name(self) -> str:
        return self.collector.name


def missing(features: tuple[Feature, ...], f: KernelFacts) -> list[Feature]:
    return [x for x in features if not x.present(f)]


def _choose(c: Collector, f: KernelFacts) -> Choice:
    if not f.btf:
        return Choice(c, None, "no kernel BTF (CONFIG_DEBUG_INFO_BTF)")
    lacking: list[Feature] = []
    ok: list[Variant] = []
    for v in c.variants:
        lacks = missing(OBJECT_NEEDS + v.features(), f)
        if not lacks:
            ok.append(v)
        elif not ok:
            lacking = lacks
    if ok:
        return Choice(c, ok[0], ok[0].loses, tuple(ok[1:]))
    text = ", ".join(f"{x} (Linux {x.since})" for x in lacking)
    return Choice(c, None, f"this kernel lacks {text}")


def plan(f: KernelFacts) -> tuple[Choice, ...]:
    """Per collector, the best variant this kernel can run, or why none."""
    return tuple(_choose(c, f) for c in COLLECTORS)


def markdown() -> str:
    """docs/kernels.md, from the plan's own tables."""
    lines = [
        "# Kernels",
        "",
        "Generated from `python/ebpf_telemetry/plan.py` "
        "(`python -m ebpf_telemetry.plan > docs/kernels.md`); a test keeps them equal.",
        "",
        "Every collector needs BTF (`CONFIG_DEBUG_INFO_BTF=y`). "
        "The loader plans from what the kernel's BTF says it has, not from its version: "
        "a feature backported to an older kernel is used, a feature missing skips only the "
        "collectors that need it (`doctor` shows the plan; `ebpf_collector_up` what runs).",
        "",
        "## Every kernel feature the object uses",
        "",
        "| feature | first kernel | used by |",
        "| --- | --- | --- |",
    ]
    users: dict[Feature, list[str]] = {f: ["every collector"] for f in OBJECT_NEEDS}
    for c in COLLECTORS:
        for v in c.variants:
            for f in v.features():
                users.setdefault(f, []).append(f"{c.name} `{v.name}`")
    for f, who in sorted(users.items(), key=lambda x: _version(x[0].since)):
        lines.append(f"| {f} | {f.since} | {', '.join(dict.fromkeys(who))} |")
    lines += [
        "",
        "## Minimum kernel per collector",
        "",
        "Supported: the oldest kernel the matrix (`make test-kernels`) boots and the "
        "collector passes its tests on. Expected: the first kernel with every feature "
        "of one of its variants (not booted: a backport or a config can differ).",
        "",
        "| collector | supported from | expected from |",
        "| --- | --- | --- |",
    ]
    for c in COLLECTORS:
        expected = min((_runs_from(v) for v in c.variants), key=_version)
        lines.append(f"| {c.name} | {PROVED[c.name]} | {expected} |")
    lines += [
        "",
        "## Collectors and their variants (best first)",
        "",
        "| collector | variant | programs | runs from | loses |",
        "| --- | --- | --- | --- | --- |",
    ]
    for c in COLLECTORS:
        for v in c.variants:
            since = _runs_from(v)
            progs = ", ".join(f"`{p}`" for p in sorted(v.programs))
            lines.append(f"| {c.name} | `{v.name}` | {progs} | {since} | {v.loses or '-'} |")
    return "\n".join(lines) + "\n"


def _runs_from(v: Variant) -> str:
    return max((f.since for f in OBJECT_NEEDS + v.features()), key=_version)


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


if __name__ == "__main__":
    print(markdown(), end="")
