# The cffi extension (_libbpf) cannot be declared in pyproject.toml alone.
from setuptools import setup

setup(cffi_modules=["python/ebpf_telemetry/_build_libbpf.py:ffibuilder"])
