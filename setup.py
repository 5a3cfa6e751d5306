"""What pyproject.toml cannot declare: the cffi extension (_libbpf) and the BPF object.

Every build compiles ``telemetry.bpf.o`` into the package it builds (``pip
install .``, ``pip wheel .``, ``make wheel``), through the Makefile's
``bpf-object`` target, so clang's flags have one definition (BPF_CFLAGS). A copy
left in the source tree by ``make build`` is never what a wheel ships. Without
the tools the build stops with one line saying what to install.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
OBJECT = Path("ebpf_telemetry", "data", "telemetry.bpf.o")
APT = "apt-get install make clang llvm libbpf-dev"


def build_object(out: Path) -> None:
    """Compile the CO-RE object to ``out`` (make bpf-object), or stop with one line."""
    tools = ("make", os.environ.get("CLANG", "clang"), "llvm-strip")
    missing = [t for t in tools if shutil.which(t) is None]
    if not Path("/usr/include/bpf/bpf_helpers.h").exists():
        missing.append("libbpf headers (bpf/bpf_helpers.h)")
    if missing:
        raise SystemExit(
            f"ebpf-telemetry: {', '.join(missing)} not found, needed for the BPF object: {APT}"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["make", "-s", "--no-print-directory", "-C", str(ROOT), "bpf-object", f"BPF_OUT={out}"]
    if subprocess.run(cmd).returncode != 0:
        raise SystemExit("ebpf-telemetry: clang failed on bpf/telemetry.bpf.c (its errors above)")


class BuildPy(build_py):  # type: ignore[misc]  # setuptools has no stubs here
    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            build_object(Path(self.build_lib) / OBJECT)
        elif not (ROOT / "python" / OBJECT).exists():  # editable: the source tree is the package
            build_object(ROOT / "python" / OBJECT)


setup(
    cffi_modules=["python/ebpf_telemetry/_build_libbpf.py:ffibuilder"],
    cmdclass={"build_py": BuildPy},
    # _libbpf is built on the limited API (.abi3.so): one wheel for CPython >= 3.11
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
