"""What we ship, installed and run as docs/deploy.md says (issue 13).

`make wheel` and `make image` are prerequisites of `make test`; the fixtures run
them again (nothing to do when they are up to date), so this file run alone
also tests what the sources build now.

The wheel is installed with Debian's python3 into a fresh venv outside the
tree and run from another directory: `doctor`, `run --once` and `unload` work
from that install alone, and `systemd-analyze verify` (usable here although
systemd is not PID 1) accepts the unit with ExecStart on it. A copy of the
sources with no object in it (a fresh clone) builds a wheel with the object,
or stops with one line when the compiler is missing.

The image is read by skopeo (as `skopeo copy ... docker://` does to push it),
unpacked by umoci into an OCI runtime bundle and run by runc the way the
DaemonSet runs it: root with only CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN, a
read-only root file system, the host's network, bpffs bind-mounted, the
ConfigMap's config and the container's args. runc runs here: umoci's spec
only lowers RLIMIT_NOFILE (to 1024), which needs no CAP_SYS_RESOURCE (this
machine has none), and the capability sets are given whole (inheritable too,
or runc cannot raise the ambient ones). So no chroot stands in for it. The
agent's liveness probe runs there as the manifest says, and
deploy/uninstall.yaml's unload as root with no capability, twice.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import require_kernel

ROOT = Path(__file__).resolve().parents[1]
VERSION: str = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
VENV = "/opt/ebpf-telemetry/venv"  # where the unit and the image expect the install
CAPS = ["CAP_BPF", "CAP_PERFMON", "CAP_SYS_ADMIN"]
EM_BPF = 247


def sh(cmd: list[str], timeout: float = 300, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kw
    )


def ok(cmd: list[str], timeout: float = 300, **kw: Any) -> str:
    r = sh(cmd, timeout, **kw)
    assert r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout}{r.stderr}"
    return r.stdout


def make(target: str) -> None:
    ok(["make", "-s", "--no-print-directory", "-C", str(ROOT), target], timeout=900)


def user_env() -> dict[str, str]:
    """The environment of a shell on the host: nothing pointing into this tree."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    return env


def unique_pin_dir(name: str) -> str:
    return f"/sys/fs/bpf/ebt-pkg-{os.getpid()}-{name}"


def unload_leftover(pin_dir: str) -> None:
    if os.path.isdir(pin_dir):
        from ebpf_telemetry import loader

        loader.unload(pin_dir)


def wheel_object(whl: Path) -> bytes:
    with zipfile.ZipFile(whl) as z:
        return z.read("ebpf_telemetry/data/telemetry.bpf.o")


# -- the wheel -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def wheel() -> Path:
    require_kernel()
    make("wheel")
    found = sorted((ROOT / "dist").glob(f"ebpf_telemetry-{VERSION}-*.whl"))
    assert len(found) == 1, found
    return found[0]


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The deploy steps: copy the wheel, a venv from Debian's python3, pip install it."""
    host = tmp_path_factory.mktemp("host")
    shutil.copy(wheel, host)
    venv = host / "venv"
    ok(["/usr/bin/python3", "-m", "venv", str(venv)], cwd=host, env=user_env())
    pip = [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check"]
    ok([*pip, f"./{wheel.name}"], cwd=host, env=user_env())
    return venv


def test_wheel_holds_the_extension_and_the_object_built_now(wheel: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    assert any(n.startswith("ebpf_telemetry/_libbpf") and n.endswith(".so") for n in names)
    obj = wheel_object(wheel)
    assert obj[:4] == b"\x7fELF" and int.from_bytes(obj[18:20], "little") == EM_BPF
    assert b".BTF.ext" in obj, "no CO-RE relocations: built without -g?"
    # the same flags as the Makefile's rule: its bpf-object target, from today's sources
    fresh = tmp_path / "telemetry.bpf.o"
    make_obj = ["make", "-s", "--no-print-directory", "-C", str(ROOT), "bpf-object"]
    ok([*make_obj, f"BPF_OUT={fresh}"])
    assert obj == fresh.read_bytes(), "the wheel's object is not what the sources build"


def test_installed_wheel_runs_on_its_own(installed: Path, tmp_path: Path) -> None:
    env, bin_ = user_env(), installed / "bin"
    where = ok(
        [str(bin_ / "python"), "-c", "import ebpf_telemetry; print(ebpf_telemetry.__file__)"],
        cwd=tmp_path,
        env=env,
    ).strip()
    assert Path(where).is_relative_to(installed) and not Path(where).is_relative_to(ROOT), where
    doctor = ok([str(bin_ / "ebpf-telemetry"), "doctor"], cwd=tmp_path, env=env)
    assert any(line.startswith("ok") and "bpf object" in line for line in doctor.splitlines())

    config = tmp_path / "config.toml"
    shutil.copy(ROOT / "deploy" / "config.toml", config)
    textfile, pin_dir = tmp_path / "ebpf_telemetry.prom", unique_pin_dir("wheel")
    agent = [str(bin_ / "ebpf-telemetry")]
    try:
        ok(
            [
                *agent,
                "run",
                "--once",
                "--config",
                str(config),
                "--node-name",
                "pkg-wheel",
                "--pin-dir",
                pin_dir,
                "--textfile",
                str(textfile),
            ],
            cwd=tmp_path,
            env=env,
        )
        text = textfile.read_text()
        assert f'version="{VERSION}"' in text and "ebpf_collector_up{" in text, text[:2000]
        assert 'node="pkg-wheel"' in text
        ok([*agent, "unload", "--pin-dir", pin_dir], cwd=tmp_path, env=env)
        assert not os.path.exists(pin_dir)
    finally:
        unload_leftover(pin_dir)


def test_unit_verifies_against_the_install(installed: Path, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze not found (Debian package systemd, in APT_PACKAGING)"
    text = (ROOT / "deploy" / "ebpf-telemetry.service").read_text()
    assert f"ExecStart={VENV}/bin/ebpf-telemetry " in text
    unit = tmp_path / "ebpf-telemetry.service"
    unit.write_text(text.replace(f"{VENV}/", f"{installed}/"))
    r = sh([analyze, "verify", "--man=no", str(unit)], cwd=tmp_path)
    ours = [line for line in (r.stdout + r.stderr).splitlines() if "ebpf-telemetry" in line]
    assert r.returncode == 0 and not ours, r.stdout + r.stderr


@pytest.fixture(scope="module")
def clean_copy(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sources as a fresh clone has them: no object, no extension, no build/."""
    files = ok(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT)
    copy = tmp_path_factory.mktemp("clone") / "ebpf-telemetry"
    for name in filter(None, files.split("\0")):
        if (ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, copy / name)
    assert not list(copy.glob("python/ebpf_telemetry/data/*.bpf.o"))
    return copy


def pip_wheel(src: Path, out: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    cmd = [str(Path(ROOT / ".venv" / "bin" / "python")), "-m", "pip", "wheel", "-q", "--no-deps"]
    return sh(
        [*cmd, "--disable-pip-version-check", "-w", str(out), str(src)], cwd=out.parent, env=env
    )


def test_a_fresh_clone_builds_the_object_into_the_wheel(clean_copy: Path, tmp_path: Path) -> None:
    r = pip_wheel(clean_copy, tmp_path / "dist", user_env())
    assert r.returncode == 0, r.stdout + r.stderr
    (whl,) = (tmp_path / "dist").glob("ebpf_telemetry-*.whl")
    assert wheel_object(whl)[:4] == b"\x7fELF"


def test_a_build_without_clang_stops_with_one_line(clean_copy: Path, tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    r = pip_wheel(clean_copy, tmp_path / "dist", {**user_env(), "PATH": str(empty)})
    assert r.returncode != 0
    said = [
        line.strip()
        for line in (r.stdout + r.stderr).splitlines()
        if line.strip().startswith("ebpf-telemetry:")
    ]
    assert len(said) == 1 and "clang" in said[0] and "apt-get install" in said[0], said
    assert not list((tmp_path / "dist").glob("*.whl"))


# -- the image -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def image() -> Path:
    require_kernel()
    make("image")
    archive = ROOT / "dist" / f"ebpf-telemetry-{VERSION}.oci.tar"
    assert archive.is_file()
    return archive


@pytest.fixture(scope="module")
def bundle(image: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The archive copied by skopeo (what pushing it does), unpacked by umoci."""
    work = tmp_path_factory.mktemp("image")
    layout = f"{work / 'layout'}:{VERSION}"
    ok(["skopeo", "copy", "--quiet", f"oci-archive:{image}", f"oci:{layout}"])
    ok(["umoci", "unpack", "--image", layout, str(work / "bundle")])
    return work / "bundle"


def daemonset() -> tuple[dict[str, Any], str]:
    """The agent container of deploy/daemonset.yaml, and its ConfigMap's config.toml."""
    docs = {
        d["kind"]: d for d in yaml.safe_load_all((ROOT / "deploy" / "daemonset.yaml").read_text())
    }
    pod = docs["DaemonSet"]["spec"]["template"]["spec"]
    agent = next(c for c in pod["containers"] if c["name"] == "ebpf-telemetry")
    return agent, docs["ConfigMap"]["data"]["config.toml"]


def uninstall_command() -> list[str]:
    """The command and args of deploy/uninstall.yaml's init container."""
    (ds,) = yaml.safe_load_all((ROOT / "deploy" / "uninstall.yaml").read_text())
    (init,) = ds["spec"]["template"]["spec"]["initContainers"]
    return [*init["command"], *init["args"]]


_runs = iter(range(1_000_000))


def runc(
    bundle: Path, args: list[str], binds: dict[str, str], rw: set[str], caps: list[str] = CAPS
) -> str:
    """Run args in the image as the DaemonSet runs its agent (with caps: its
    capabilities by default); binds: host -> container path."""
    spec = json.loads((bundle / "config.json").read_text())  # umoci's, as unpacked
    proc = spec["process"]
    proc.update(args=args, terminal=False, cwd="/")
    sets = ("bounding", "effective", "permitted", "inheritable", "ambient")
    proc["capabilities"] = dict.fromkeys(sets, caps)
    spec["root"] = {"path": str(bundle / "rootfs"), "readonly": True}
    namespaces = spec["linux"]["namespaces"]
    spec["linux"]["namespaces"] = [n for n in namespaces if n["type"] != "network"]
    mounts = [
        {
            "destination": inside,
            "type": "bind",
            "source": host,
            "options": ["rbind", "rw" if inside in rw else "ro"],
        }
        for host, inside in binds.items()
    ]
    tmp = {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["size=16m"]}
    spec["mounts"] += [*mounts, tmp]
    name = f"ebt-pkg-{os.getpid()}-{next(_runs)}"
    run_dir = bundle.parent / name
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(spec))
    try:
        return ok(["runc", "run", "--bundle", str(run_dir), name], timeout=120)
    finally:
        sh(["runc", "delete", "--force", name])


def test_image_config_and_contents(image: Path, bundle: Path) -> None:
    config = json.loads(ok(["skopeo", "inspect", "--config", f"oci-archive:{image}"]))["config"]
    assert config["Entrypoint"] == ["ebpf-telemetry"] and config["Cmd"] == ["run"]
    assert f"PATH={VENV}/bin:" in " ".join(config["Env"])
    rootfs = bundle / "rootfs"
    for needed in (f"{VENV}/bin/ebpf-telemetry", "usr/bin/mount", "usr/bin/mountpoint", "bin/sh"):
        assert (rootfs / needed.lstrip("/")).exists(), needed
    assert list(rootfs.glob("usr/lib/*/libbpf.so.1"))
    # what a user's machine needs no more of: compilers, headers, apt, perl, pip
    absent = [
        "usr/bin/clang*",
        "usr/bin/gcc*",
        "usr/include/*",
        "usr/bin/apt*",
        "usr/lib/*/libperl*",
    ]
    for pattern in [*absent, f"{VENV.lstrip('/')}/bin/pip*"]:
        assert not list(rootfs.glob(pattern)), f"{pattern} in the image"
    # numpy (the 16,384-peer reads) and libstdc++ took it from about 45 to 63 MiB
    assert image.stat().st_size < 72 * 2**20, f"the image grew: {image.stat().st_size} bytes"


def test_image_runs_as_the_daemonset_does(bundle: Path, tmp_path: Path) -> None:
    agent, config_toml = daemonset()
    assert agent["image"] == f"REGISTRY/ebpf-telemetry:{VERSION}"
    config_dir, textfile_dir = tmp_path / "config", tmp_path / "textfile"
    config_dir.mkdir()
    textfile_dir.mkdir()
    (config_dir / "config.toml").write_text(config_toml)
    textfile_mount = next(m["mountPath"] for m in agent["volumeMounts"] if m["name"] == "textfile")
    binds = {
        "/sys/fs/bpf": "/sys/fs/bpf",
        "/sys/kernel/tracing": "/sys/kernel/tracing",
        str(config_dir): "/etc/ebpf-telemetry",
        str(textfile_dir): textfile_mount,
    }
    rw = {"/sys/fs/bpf", textfile_mount}

    # the init container's command, in this image: bpffs is there, so nothing to mount
    init = ["sh", "-c", "mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf"]
    runc(bundle, init, binds, rw)
    doctor = runc(bundle, ["ebpf-telemetry", "doctor"], binds, rw)
    assert "run can work here" in doctor, doctor

    args = [a.replace("$(NODE_NAME)", "pkg-image") for a in agent["args"]]
    pin_dir = unique_pin_dir("image")
    try:
        runc(bundle, [*agent["command"], *args, "--once", "--pin-dir", pin_dir], binds, rw)
        textfile = Path(tomllib.loads(config_toml)["textfile"])
        assert textfile.parent == Path(textfile_mount)
        text = (textfile_dir / textfile.name).read_text()
        assert f'version="{VERSION}"' in text and 'node="pkg-image"' in text, text[:2000]
        assert "ebpf_collector_up{" in text
        # the liveness probe, as is: the ConfigMap's config names this textfile
        probe = runc(bundle, agent["livenessProbe"]["exec"]["command"], binds, rw)
        assert probe.startswith("ok: /var/lib/prometheus/node-exporter/ebpf_telemetry.prom"), probe
        # deploy/uninstall.yaml's unload (its pin dir this test's), root with no
        # capability as it runs there; twice: a second run finds nothing
        unload = [*uninstall_command()[:-1], f"--pin-dir={pin_dir}"]
        assert runc(bundle, unload, binds, rw, caps=[]).startswith("removed ")
        assert not os.path.exists(pin_dir)
        assert runc(bundle, unload, binds, rw, caps=[]).startswith("nothing to unload")
    finally:
        unload_leftover(pin_dir)


# -- the docs say what make builds ------------------------------------------------


def test_deploy_docs_name_what_make_builds(wheel: Path) -> None:
    deploy = (ROOT / "docs" / "deploy.md").read_text()
    readme = (ROOT / "README.md").read_text()
    push = (
        f"skopeo copy oci-archive:dist/ebpf-telemetry-{VERSION}.oci.tar "
        f"docker://REGISTRY/ebpf-telemetry:{VERSION}"
    )
    for needle in (
        "make wheel",
        "make image",
        push,
        "apt-get install -y python3-venv libbpf1",
        f"{VENV}/bin/pip install ./{wheel.name.replace(platform.machine(), 'x86_64')}",
    ):
        assert needle in deploy, needle
    for needle in ("make wheel", "make image", f"{VENV}/bin/pip install ./ebpf_telemetry-"):
        assert needle in readme, needle
    assert "pip install ebpf-telemetry" not in deploy + readme, "no index has that package"
