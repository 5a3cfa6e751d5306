"""`make test-kernels`: the kernel tests on Debian's kernels and on the host.

For each Debian series (SERIES: 6.1, 5.10, 6.12-rt, the newest of
trixie-backports; 6.12 on request) the newest matching `linux-image-*`
package is fetched with `apt-get download` into build/kernels/ (suites the
machine has no sources for through an apt state of our own under
build/kernels/apt/; extracted with `dpkg-deb -x`, never installed; since 7.x
with its linux-binary-* and linux-modules-* packages) and booted with virtme-ng under qemu, sharing
the host's root filesystem read-only. Inside (and directly on the host) this
same script runs with `--inside DIR`: it loads tun, mounts bpffs and tracefs,
runs `ebpf-telemetry doctor` and the selected tests, and writes everything
into DIR (build/kernels/results/<kernel>/, read-write in the guest). The host
then builds one table from those files and exits 1 if any kernel did not boot,
timed out, or had a test that did not pass.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "build" / "kernels"
RESULTS = CACHE / "results"
VENV_BIN = REPO / ".venv" / "bin"
PY = VENV_BIN / "python"
DEBIAN = "http://deb.debian.org/debian"
SECURITY = "http://deb.debian.org/debian-security"


@dataclass(frozen=True)
class Series:
    """A Debian kernel series: the newest `linux-image-*` package matching
    `pattern` (group 1: the kernel release) in `suites` (None: the machine's
    own apt sources; else (archive, suite) pairs, used through an apt state of
    our own under build/kernels/apt/, the machine's apt configuration
    untouched), and the tests it runs (`tier`, see TIERS)."""

    pattern: str
    tier: str
    suites: tuple[tuple[str, str], ...] | None = None
    # collector -> the variant doctor must report ("skip": skipped); the
    # matrix fails a kernel that runs anything else
    expect: tuple[tuple[str, str], ...] = ()
    deselect: str = ""  # `-k` expression of tests its collectors cannot run


# Tiers keep CI within its budget on a 2-vCPU host under TCG (a guest costs
# ~12 min for `smoke`: 7.3.4 booted in 93 s, its 5 tests took 499 s; `full`
# took ~12-20 min): `full` runs every matrix test on the oldest kernel with
# every collector's best variants of an old series (6.1) and on the host (new:
# 6.18); `smoke` proves the others load, every collector they can run
# reports, and the exact counts (run-queue arrivals against schedstat,
# retransmits against SNMP, one RTT sample per round trip); `rt` is `smoke`
# and the tests of what PREEMPT_RT changes (programs interleaving on a CPU).
TIERS = {"full": "-m matrix", "smoke": "-m smoke", "rt": "-m 'smoke or rt'"}


# what `make test-kernels` boots: Debian 12's 6.12 is left out (6.12-rt is the
# same kernel with PREEMPT_RT; `--kernels 6.12` still boots it)
DEFAULT_KERNELS = "host,6.1,5.10,6.12-rt,backports"


def _expect(**variants: str) -> tuple[tuple[str, str], ...]:
    base = {
        "rtt": "tp_btf_cast",
        "retrans": "tp_btf",
        "drops": "tp_btf_reason",
        "sched": "rq_clock",
    }
    return tuple({**base, **variants}.items())


SERIES = {
    # no bpf_rdonly_cast (6.2): rtt casts the socket with the helper
    "6.1": Series(r"linux-image-(6\.1\.0-\d+-amd64)", "full", expect=_expect(rtt="tp_btf")),
    "6.12": Series(r"linux-image-(6\.12\.\d+\+deb12-amd64)", "smoke", expect=_expect()),
    # no socket storage in tracing programs (5.11): rtt skipped, retrans
    # without the socket cache; no drop reasons (5.17)
    "5.10": Series(
        r"linux-image-(5\.10\.0-\d+-amd64)",
        "smoke",
        ((DEBIAN, "bullseye"), (SECURITY, "bullseye-security")),
        _expect(rtt="skip", retrans="tp_btf_nosk", drops="tp_btf_noreason"),
        "not test_kernel_rtt",
    ),
    "6.12-rt": Series(
        r"linux-image-(6\.12\.\d+\+deb13-rt-amd64)",
        "rt",
        ((DEBIAN, "trixie"), (SECURITY, "trixie-security")),
        _expect(),
    ),
    # the newest kernel Debian ships, whatever its version when the matrix runs
    "backports": Series(
        r"linux-image-(\d+\.\d+\.\d+\+deb13-amd64)",
        "smoke",
        ((DEBIAN, "trixie-backports"),),
        _expect(retrans="tp_btf_err"),
    ),
}
UP = "@@kernel-matrix: up"  # first line the inside run prints: the guest has booted
# pytest is interrupted this long before a kernel's timeout and then has GRACE to
# write its junit file (a BPF load the verifier rejects takes ~30 s under TCG)
INTERRUPT_BEFORE, GRACE = 150, 120
# emulated, the first pytest run is interrupted this long before the deadline,
# so that the retry of what failed has room (a retry of 2-4 tests took 60-200 s)
RETRY_RESERVE = 300
KMSG = re.compile(r"\[\s*\d+\.\d+\] ")  # a kernel console line: to console.log only
# the guest kernel crashed. Seen once in ~10 runs on 6.12 under TCG: "Oops: int3"
# in ttwu_do_activate while a tracepoint's call site was being live-patched
# (text_poke_bp); multi-threaded TCG does not make other vCPUs see a patched
# instruction at once, a real CPU does. Such a kernel is booted once more, and
# the report says so.
# Under TCG every guest instruction is emulated (~10-50x slower than a real
# CPU, unevenly): a test whose assertion depends on timing (CPU shares, run-queue
# latency, delay lines) can fail once there for reasons the host never shows.
# In a TCG guest each failed test runs once more; one that then passes is
# reported as such (with the first failure's message), not counted as passing
# silently. On the host and under KVM there is no retry.
RETRY_JUNIT = "junit-retry.xml"
OOPS = re.compile(r"\] (Oops: |BUG: |Kernel panic - )")


# -- inside: in the guest, or on the host ---------------------------------------


def save(cmd: Sequence[str], out: Path) -> int:
    """Run cmd with its stdout into the file out; return its exit code."""
    with out.open("w") as f:
        return subprocess.run(cmd, stdout=f, cwd=REPO).returncode


def prepare_kernel() -> None:
    if not Path("/dev/net/tun").exists():
        subprocess.run(["modprobe", "tun"], check=False)
    mounts = [("bpf", "/sys/fs/bpf", ["-o", "mode=0700"]), ("tracefs", "/sys/kernel/tracing", [])]
    for fs, where, opts in mounts:  # as `make mounts`
        if subprocess.run(["mountpoint", "-q", where]).returncode != 0:
            subprocess.run(["mount", "-t", fs, *opts, fs, where], check=False)


# Under TCG, keep every tracepoint we hook enabled, with two programs on it,
# for the guest's whole life: two agents' pins (`run --once` leaves its links
# pinned). The guest then never live-patches a hook's call site while the
# tests attach and detach: the static key stays on, and the tracepoint's
# static call stays on its iterator (it is re-patched whenever the count of
# programs on a tracepoint goes between one and more). Such patching
# (text_poke_bp) is what crashed 6.12 under multi-threaded TCG ("Oops: int3"
# in ttwu_do_activate, at trace_sched_wakeup), twice in one run on a busy
# host: a vCPU ran the int3 after the patch was complete.
KEEPERS = ("/sys/fs/bpf/ebt-matrix-keep-a", "/sys/fs/bpf/ebt-matrix-keep-b")


def keep_hooks_enabled(results: Path) -> None:
    for pin_dir in KEEPERS:
        textfile = results / f"{Path(pin_dir).name}.prom"
        cmd = [str(PY), "-m", "ebpf_telemetry", "run", "--once", "--interval", "1",
               "--pin-dir", pin_dir, "--textfile", str(textfile)]  # fmt: skip
        with (results / f"{Path(pin_dir).name}.log").open("w") as log:
            subprocess.run(cmd, cwd=REPO, check=False, stdout=log, stderr=log)


def pytest_until(
    cmd: Sequence[str], deadline: float | None, emulated: bool = False
) -> tuple[int, bool]:
    """Run pytest, interrupted at the deadline (epoch s); (exit code, interrupted).
    emulated: the tests are told (agentlab.EMULATED) to bound no wall-clock time."""
    env = {**os.environ, "EBPF_TELEMETRY_STRICT": "1"}
    if emulated:
        env["EBPF_TELEMETRY_EMULATED"] = "1"
    proc = subprocess.Popen(cmd, cwd=REPO, env=env)
    try:
        return proc.wait(None if deadline is None else max(deadline - time.time(), 1)), False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # pytest still writes its junit file
        try:
            return proc.wait(timeout=GRACE), True
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(), True


def inside(results: Path, pytest_args: list[str], deadline: float | None, emulated: bool) -> int:
    print(UP, flush=True)
    prepare_kernel()
    summary: dict[str, Any] = {"kernel": platform.release()}
    doctor = [str(PY), "-m", "ebpf_telemetry", "doctor"]
    save(doctor, results / "doctor.txt")
    print((results / "doctor.txt").read_text(), end="", flush=True)
    summary["doctor_json_rc"] = save([*doctor, "--json"], results / "doctor.json")
    if importlib.util.find_spec("ebpf_telemetry.facts") is not None:
        save([str(PY), "-m", "ebpf_telemetry.facts"], results / "facts.json")
    # the tests accept what doctor skips here; the host then checks that this
    # is what the series expects (check_collectors)
    skipped = [c for c, v in collector_cells_of(results).items() if v == "skip"]
    os.environ["EBPF_TELEMETRY_EXPECT_SKIPPED"] = ",".join(skipped)
    if emulated:
        keep_hooks_enabled(results)
    junit = f"--junitxml={results / 'junit.xml'}"
    pytest = [str(VENV_BIN / "pytest"), *pytest_args, "-p", "no:cacheprovider", junit]
    start = time.monotonic()
    first_deadline = deadline - RETRY_RESERVE if deadline is not None and emulated else deadline
    rc, interrupted = pytest_until(pytest, first_deadline, emulated)
    summary |= {"pytest_rc": rc, "interrupted": interrupted}
    again = not_passed(results / "junit.xml") if emulated and rc == 1 and not interrupted else []
    if again:  # tests failed (rc 1), none interrupted: each failed one runs once more
        print(f"@@kernel-matrix: retrying {len(again)} failed test(s) once", flush=True)
        junit = f"--junitxml={results / RETRY_JUNIT}"
        cmd = [str(VENV_BIN / "pytest"), *again, "-p", "no:cacheprovider", junit]
        rc, interrupted = pytest_until(cmd, deadline, emulated)
        summary |= {"retried": again, "retry_rc": rc, "interrupted": interrupted}
    summary["tests_s"] = round(time.monotonic() - start, 1)
    (results / "inside.json").write_text(json.dumps(summary, indent=1) + "\n")
    return rc


# -- fetch: Debian's kernel packages into build/kernels/ ------------------------


def apt_options(series: Series) -> list[str]:
    """apt options for the series' suites: a state of our own (sources, lists,
    cache, an empty dpkg status) under build/kernels/apt/; [] for the machine's."""
    if series.suites is None:
        return []
    state = CACHE / "apt" / "-".join(suite for _, suite in series.suites)
    (state / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (state / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
    sources = "".join(
        f"deb [signed-by={keyring}] {url} {suite} main\n" for url, suite in series.suites
    )
    (state / "sources.list").write_text(sources)
    (state / "status").touch()
    return [
        *("-o", f"Dir::Etc::SourceList={state / 'sources.list'}"),
        *("-o", "Dir::Etc::SourceParts=/nonexistent"),
        *("-o", f"Dir::State={state}"),
        *("-o", f"Dir::State::Lists={state / 'lists'}"),
        *("-o", f"Dir::State::status={state / 'status'}"),
        *("-o", f"Dir::Cache={state / 'cache'}"),
    ]


def apt_update(opts: list[str]) -> None:
    subprocess.run(["apt-get", *opts, "update", "-qq"], check=True)


def version_key(release: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", release))


def newest_package(series: Series) -> tuple[str, str]:
    """(package, release) of the newest package whose name matches the pattern."""
    opts = apt_options(series)
    for _ in range(2):  # a fresh apt state has no lists: nothing found, then update
        names = subprocess.run(
            ["apt-cache", *opts, "pkgnames", "linux-image-"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        found = [
            (version_key(m[1]), m[0], m[1]) for n in names if (m := re.fullmatch(series.pattern, n))
        ]
        if found:
            return max(found)[1:]
        apt_update(opts)
    raise SystemExit(f"kernel_matrix: no package matches {series.pattern} in apt-cache")


def download(pkg: str, opts: list[str]) -> Path:
    debs = CACHE / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    cached = sorted(debs.glob(f"{pkg}_*.deb"))
    if cached:
        return cached[-1]
    cmd = ["apt-get", *opts, "download", "-q", "-o", "APT::Sandbox::User=root", pkg]
    if subprocess.run(cmd, cwd=debs).returncode != 0:
        apt_update(opts)  # a stale list names a file the mirror no longer has
        subprocess.run(cmd, cwd=debs, check=True)
    return next(debs.glob(f"{pkg}_*.deb"))


def split_packages(image: Path, release: str) -> list[str]:
    """Since 7.x `linux-image-<release>` is a meta package: the kernel is in
    linux-binary-<release>, the modules in linux-modules-<release>."""
    depends = subprocess.run(
        ["dpkg-deb", "-f", str(image), "Depends"], capture_output=True, text=True, check=True
    ).stdout
    wanted = (f"linux-binary-{release}", f"linux-modules-{release}")
    return [w for w in wanted if re.search(rf"(^|[\s,|]){re.escape(w)}([\s,(]|$)", depends)]


def fetch(name: str) -> tuple[str, Path]:
    """The newest kernel of a series: (release, vmlinuz), its modules beside it."""
    series = SERIES[name]
    pkg, release = newest_package(series)
    root = CACHE / release
    if not (root / ".ready").exists():
        shutil.rmtree(root, ignore_errors=True)
        opts = apt_options(series)
        image = download(pkg, opts)
        for deb in [image, *(download(p, opts) for p in split_packages(image, release))]:
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        # merged /usr: modules under usr/lib/modules/, where depmod and virtme look in lib/
        if (root / "usr" / "lib" / "modules").is_dir() and not (root / "lib").exists():
            (root / "lib").symlink_to("usr/lib")
        # the .deb has no modules.dep; virtme and the guest's modprobe need it
        subprocess.run(["depmod", "-b", str(root), release], check=True)
        (root / ".ready").touch()
    for vmlinuz in (
        root / "boot" / f"vmlinuz-{release}",
        root / "lib/modules" / release / "vmlinuz",
    ):
        if vmlinuz.exists():
            return release, vmlinuz
    raise SystemExit(f"kernel_matrix: no vmlinuz in the packages of {release}")


# -- run: one kernel, in a VM or on the host ------------------------------------


@dataclass
class Run:
    kernel: str
    where: str  # host, kvm or tcg
    results: Path
    boot_s: float | None = None
    wall_s: float | None = None  # fetch, boots (a crashed guest is booted twice) and tests
    problems: list[str] = field(default_factory=list)
    counts: dict[str, float] | None = None  # passed/failure/error/skipped, after the retry
    failed: list[Outcome] = field(default_factory=list)
    flaky: list[Outcome] = field(default_factory=list)  # failed, then passed the retry
    notes: list[str] = field(default_factory=list)  # said in the result column, not failures


def use_kvm() -> bool:
    """KVM only with real VMX/SVM: the paravirtual /dev/kvm of some clouds aborts qemu."""
    cpu = Path("/proc/cpuinfo").read_text()
    return (
        Path("/dev/kvm").exists() and re.search(r"^flags\s*:.*\b(vmx|svm)\b", cpu, re.M) is not None
    )


def fresh_results(kernel: str) -> Path:
    d = RESULTS / kernel
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    return d


def selection(args: argparse.Namespace, kernel: str) -> str:
    """The tests a kernel runs: --pytest-args if given, else its tier's."""
    if args.pytest_args is not None:
        return str(args.pytest_args)
    if kernel not in SERIES:
        return TIERS["full"]
    series = SERIES[kernel]
    return TIERS[series.tier] + (f" -k '{series.deselect}'" if series.deselect else "")


def inside_cmd(results: Path, args: argparse.Namespace, emulated: bool, tests: str) -> list[str]:
    """This script inside, its tests interrupted INTERRUPT_BEFORE the kernel's timeout;
    emulated (TCG): the tests are told so, and a test that fails runs once more."""
    deadline = f"--deadline={time.time() + args.timeout - INTERRUPT_BEFORE:.0f}"
    script = str(Path(__file__).resolve())
    pytest_args = f"--pytest-args={tests}"
    again = ["--emulated"] if emulated else []
    return [str(PY), "-u", script, "--inside", str(results), pytest_args, deadline, *again]


def stream(cmd: Sequence[str], run: Run, timeout: float, env: dict[str, str]) -> int:
    """Run cmd in its own process group, its output to ours (prefixed) and to console.log.

    Sets run.boot_s when the UP line arrives; a timeout kills the whole group.
    Returns the exit code.
    """
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=REPO,
        start_new_session=True,
        text=True,
        errors="replace",
    )
    fired = threading.Event()

    def kill() -> None:
        fired.set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    timer = threading.Timer(timeout, kill)
    timer.start()
    assert proc.stdout is not None
    with (run.results / "console.log").open("w") as log:
        for line in proc.stdout:
            if line.rstrip() == UP and run.boot_s is None:
                run.boot_s = time.monotonic() - start
            log.write(line)
            if not KMSG.match(line):
                print(f"[{run.kernel}] {line}", end="", flush=True)
    proc.wait()
    timer.cancel()
    if fired.is_set():
        run.problems.append(f"timed out after {timeout:.0f} s")
    return proc.returncode


def oops(run: Run) -> str | None:
    """The first line of a guest kernel crash in the console, if any."""
    log = run.results / "console.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    m = OOPS.search(text)
    return text[m.start() + 2 : text.find("\n", m.start())].strip() if m else None


def run_vm(series: str, args: argparse.Namespace) -> Run:
    try:
        release, vmlinuz = fetch(series)
    except subprocess.CalledProcessError as e:
        return Run(series, "-", RESULTS / series, problems=[f"fetch failed: {e}"])
    run = boot(release, vmlinuz, args, selection(args, series))
    crash = oops(run)
    if crash is not None and run.where == "tcg":
        print(f"[{release}] guest kernel crashed ({crash}); booting it once more", flush=True)
        kept = RESULTS / f"{release}.crashed-console.log"
        shutil.copyfile(run.results / "console.log", kept)
        run = boot(release, vmlinuz, args, selection(args, series))
        run.notes.append(f"booted twice: the first run crashed ({crash}, {kept.name})")
    if (crash := oops(run)) is not None:
        run.problems.append(f"guest kernel crashed: {crash}")
    check_collectors(run, series)
    return run


def boot(release: str, vmlinuz: Path, args: argparse.Namespace, tests: str) -> Run:
    kvm = use_kvm()
    run = Run(release, "kvm" if kvm else "tcg", fresh_results(release))
    cmd = [
        str(VENV_BIN / "vng"),
        "--run", str(vmlinuz),
        "--cpus", str(os.cpu_count() or 1),
        "--memory", args.memory,
        "--force-9p",  # no probing for virtiofsd: Debian 12's is qemu's old C one
        "--verbose",  # the guest kernel's console too, into console.log
        "--rwdir", str(run.results),
        # writable in the guest, writes thrown away: the checkout, root's home
        "--overlay-rwdir", str(REPO),
        "--overlay-rwdir", "/root",
        *([] if kvm else ["--disable-kvm"]),
        "--exec", shlex.join(inside_cmd(run.results, args, not kvm, tests)),
    ]  # fmt: skip
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    rc = stream(cmd, run, args.timeout, env)
    if run.boot_s is None and not run.problems:
        run.problems.append(f"did not boot (vng exited {rc}, see console.log)")
    return run


def timed(fn: Any, *args: Any) -> Run:
    start = time.monotonic()
    run: Run = fn(*args)
    run.wall_s = time.monotonic() - start
    return run


def run_host(args: argparse.Namespace) -> Run:
    run = Run(platform.release(), "host", fresh_results(platform.release()))
    stream(
        inside_cmd(run.results, args, False, selection(args, "host")),
        run,
        args.timeout,
        dict(os.environ),
    )
    run.boot_s = None  # no boot: UP came from a process start
    return run


# -- report ---------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    test: str  # pytest node id
    result: str  # passed, failure, error or skipped
    message: str = ""  # first line of the failure's message


def outcomes(path: Path) -> dict[str, Outcome]:
    """Each test case of a junit file by node id; {} when there is no file."""
    if not path.exists():
        return {}
    out = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        module = (case.get("classname") or "").replace(".", "/")
        test = f"{module}.py::{case.get('name')}"
        bad = next((x for x in case if x.tag in ("failure", "error", "skipped")), None)
        if bad is None:
            out[test] = Outcome(test, "passed")
        else:
            lines = (bad.get("message") or bad.tag).strip().splitlines() or [bad.tag]
            out[test] = Outcome(
                test, "failure" if bad.tag == "failure" else bad.tag, lines[0][:200]
            )
    return out


def not_passed(path: Path) -> list[str]:
    return [o.test for o in outcomes(path).values() if o.result != "passed"]


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check(run: Run) -> None:
    """Reads the result files into run.counts, run.problems, run.flaky and run.failed.

    A test that failed and then passed its one retry (TCG only) is flaky: a
    note, not a failure; both its runs stay in junit.xml / junit-retry.xml."""
    first = outcomes(run.results / "junit.xml")
    retry = outcomes(run.results / RETRY_JUNIT)
    summary = read_json(run.results / "inside.json") or {}
    if summary.get("interrupted"):
        run.problems.append("tests interrupted at the deadline")
    if not first:
        if not run.problems:
            run.problems.append(f"no junit.xml (pytest exited {summary.get('pytest_rc', '?')})")
        return
    final = {**first, **retry}
    run.flaky = [first[t] for t, o in retry.items() if o.result == "passed" and t in first]
    run.failed = [o for o in final.values() if o.result != "passed"]
    results = [o.result for o in final.values()]
    run.counts = {k: float(results.count(k)) for k in ("passed", "failure", "error", "skipped")}
    for k in ("failure", "error", "skipped"):
        if n := results.count(k):
            run.problems.append(f"{n} {k}{'' if k == 'skipped' else 's'}")
    if run.flaky:
        run.notes.append(f"{len(run.flaky)} passed on retry (TCG timing)")
    rc = summary.get("retry_rc", summary.get("pytest_rc", 1))
    if rc != 0 and not run.problems:
        run.problems.append(f"pytest exited {rc}")


def check_collectors(run: Run, series: str) -> None:
    """The collectors a kernel of the matrix runs are what the series expects."""
    want = dict(SERIES[series].expect)
    have = collector_cells(run)
    if want and have != want:
        wrong = ", ".join(
            f"{c} {have.get(c, '?')} (expected {v})" for c, v in want.items() if have.get(c) != v
        )
        run.problems.append(f"collectors: {wrong}")


def collector_cells(run: Run) -> dict[str, str]:
    return collector_cells_of(run.results)


def collector_cells_of(results: Path) -> dict[str, str]:
    doctor = read_json(results / "doctor.json")
    cols = (doctor or {}).get("collectors")
    if not isinstance(cols, dict):
        return {}
    return {name: c.get("variant") or "skip" for name, c in cols.items()}


def skip_notes(runs: Sequence[Run]) -> list[str]:
    notes = []
    for run in runs:
        cols = (read_json(run.results / "doctor.json") or {}).get("collectors")
        for name, c in (cols or {}).items():
            if not c.get("variant"):
                notes.append(f"  {run.kernel} {name}: {c.get('why') or '?'}")
    return notes


def table(runs: Sequence[Run]) -> str:
    cells = [collector_cells(r) for r in runs]
    collectors = list(dict.fromkeys(k for c in cells for k in c)) or ["collectors"]
    head = ["kernel", "vm", "boot s", "tests s", "wall s", "pass", "fail", "err", "skip"]
    head += collectors
    rows = [[*head, "result"]]
    for run, cell in zip(runs, cells, strict=True):
        c = run.counts
        n = [str(int(c[k])) for k in ("passed", "failure", "error", "skipped")] if c else ["-"] * 4
        tests_s = (read_json(run.results / "inside.json") or {}).get("tests_s")
        rows.append([
            run.kernel,
            run.where,
            f"{run.boot_s:.1f}" if run.boot_s is not None else "-",
            f"{tests_s:.1f}" if tests_s is not None else "-",
            f"{run.wall_s:.0f}" if run.wall_s is not None else "-",
            *n,
            *(cell.get(k, "?") for k in collectors),
            "; ".join(run.problems or ["ok", *run.notes]),
        ])  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [
        "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=False)) + "  " + r[-1] for r in rows
    ]
    notes = skip_notes(runs)
    flaky = [f"  {r.kernel} {o.test}: {o.message}" for r in runs for o in r.flaky]
    failed = [f"  {r.kernel} {o.test}: {o.result}: {o.message}" for r in runs for o in r.failed]
    return "\n".join(
        lines
        + (["collectors skipped:", *notes] if notes else [])
        + (["failed once, passed the retry:", *flaky] if flaky else [])
        + (["tests that did not pass:", *failed] if failed else [])
    )


# -- main -----------------------------------------------------------------------


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument(
        "--pytest-args",
        default=None,
        help="test selection for every kernel, one string: --pytest-args='-k rtt' "
        "(default: each kernel's tier, " + ", ".join(f"{t} `{a}`" for t, a in TIERS.items()) + ")",
    )
    p.add_argument(
        "--kernels",
        default=DEFAULT_KERNELS,
        help="host and/or Debian series (%(default)s)",
    )
    p.add_argument(
        "--timeout", type=float, default=1800, help="seconds per kernel boot (%(default)s)"
    )
    p.add_argument("--memory", default="3G", help="guest memory (%(default)s)")
    p.add_argument("--inside", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    p.add_argument("--emulated", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if args.inside:
        tests = shlex.split(args.pytest_args or TIERS["full"])
        return inside(args.inside, tests, args.deadline, args.emulated)
    kernels = args.kernels.split(",")
    unknown = [k for k in kernels if k != "host" and k not in SERIES]
    if unknown:
        raise SystemExit(f"kernel_matrix: unknown kernel series {', '.join(unknown)}")
    runs = [timed(run_host, args) if k == "host" else timed(run_vm, k, args) for k in kernels]
    for run in runs:
        check(run)
    report = table(runs)
    print("\n" + report)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "summary.txt").write_text(report + "\n")
    return 1 if any(r.problems for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
