# ebpf-telemetry. `make run` and `make test` do every set-up step themselves:
# Debian packages, bpffs/tracefs mounts, the BPF build, the venv.
SHELL := /bin/bash
ARCH ?= $(shell uname -m | sed -e 's/x86_64/x86/' -e 's/aarch64/arm64/')
# the distribution's python3: the one python3-venv and python3-dev below are
# for, and the interpreter the OCI image runs (a python3 found first on PATH,
# such as pyenv's, may be built without PGO/LTO: the cycle 12-17 % slower,
# its text format ~35 %: bench part 3d). An existing .venv stays as it was
# made: `rm -rf .venv` to rebuild it on this one
PYTHON ?= $(firstword $(wildcard /usr/bin/python3) python3)
VENV := .venv
PY := $(VENV)/bin/python
CLANG ?= clang
bpf_cflags = -g -O2 -target bpf -mcpu=v3 -D__TARGET_ARCH_$(1) -Ivmlinux/$(1) -Ibpf -Wall -Werror
BPF_CFLAGS := $(call bpf_cflags,$(ARCH))
BPF_HEADERS := $(wildcard bpf/*.h)
OBJ := python/ebpf_telemetry/data/telemetry.bpf.o
TEST_OBJ := build/slot_test.bpf.o build/telemetry-reject.bpf.o build/telemetry-other.bpf.o \
	build/arm64/telemetry.bpf.o
RUN_ARGS ?=
PYTEST_ARGS ?=
SOAK_ARGS ?= --duration 600

APT_BUILD := clang llvm libbpf-dev libbpf1 bpftool libelf-dev zlib1g-dev gcc python3-venv python3-dev
APT_TEST := iproute2 nftables prometheus prometheus-node-exporter
APT_BENCH := sockperf bpftrace libbpf-tools
# virtme-ng boots Debian's kernels on the host's root: qemu, busybox for its
# initramfs, kmod (depmod, and modprobe in the guest), udev for its virtio ports
APT_KERNELS := qemu-system-x86 busybox-static kmod udev
VIRTME_NG := virtme-ng==1.42

.PHONY: all build deps deps-test deps-bench deps-kernels mounts run test test-kernels lint bench bench-fleet soak clean vmlinux docs

all: build

define apt_install
	@missing=$$(for p in $(1); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
endef

deps:
	$(call apt_install,$(APT_BUILD))

deps-test: deps
	$(call apt_install,$(APT_TEST))

# the agent mounts bpffs itself; tests and `make run` want both ready
deps-bench: deps
	$(call apt_install,$(APT_BENCH))

deps-kernels: deps-test $(VENV)/.stamp
	$(call apt_install,$(APT_KERNELS))
	$(VENV)/bin/pip install -q '$(VIRTME_NG)'

mounts:
	@mountpoint -q /sys/fs/bpf || mount -t bpf -o mode=0700 bpf /sys/fs/bpf
	@mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing

build/%.bpf.o: bpf/%.bpf.c $(BPF_HEADERS) vmlinux/$(ARCH)/vmlinux.h | deps
	@mkdir -p build
	$(CLANG) $(BPF_CFLAGS) -c $< -o $@
	llvm-strip -g $@

# tests: the object with one program that no kernel's verifier accepts, and
# another build of the same programs (upgrades)
build/telemetry-reject.bpf.o: bpf/telemetry.bpf.c $(BPF_HEADERS) vmlinux/$(ARCH)/vmlinux.h | deps
	@mkdir -p build
	$(CLANG) $(BPF_CFLAGS) -DEBT_TEST_REJECT -c $< -o $@
	llvm-strip -g $@

build/telemetry-other.bpf.o: bpf/telemetry.bpf.c $(BPF_HEADERS) vmlinux/$(ARCH)/vmlinux.h | deps
	@mkdir -p build
	$(CLANG) $(BPF_CFLAGS) -DEBT_TEST_OTHER_BUILD -c $< -o $@
	llvm-strip -g $@

# the object built for arm64 as well (vmlinux/arm64/README.md: why one header serves both)
build/arm64/telemetry.bpf.o: bpf/telemetry.bpf.c $(BPF_HEADERS) vmlinux/arm64/vmlinux.h | deps
	@mkdir -p build/arm64
	$(CLANG) $(call bpf_cflags,arm64) -c $< -o $@
	llvm-strip -g $@

$(OBJ): build/telemetry.bpf.o
	@mkdir -p $(dir $@)
	cp $< $@

$(VENV)/.stamp: pyproject.toml setup.py python/ebpf_telemetry/_build_libbpf.py bpf/telemetry.h | deps
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

build: deps $(OBJ) $(TEST_OBJ) $(VENV)/.stamp

run: build mounts
	$(VENV)/bin/ebpf-telemetry run $(RUN_ARGS)

test: build deps-test wheel image mounts
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# the kernel tests on the host and on Debian's kernels (6.1, 5.10, 6.12-rt,
# the newest of trixie-backports: tests/kernel_matrix.py), fetched into
# build/kernels/, booted with virtme-ng; prints a table
KERNELS_ARGS ?=
test-kernels: build deps-kernels mounts
	$(VENV)/bin/python tests/kernel_matrix.py $(KERNELS_ARGS)

lint: build
	$(VENV)/bin/ruff check python tests bench
	$(VENV)/bin/ruff format --check python tests bench
	$(VENV)/bin/mypy
	MYPYPATH=tests $(VENV)/bin/mypy --strict --ignore-missing-imports bench/*.py

# what it costs, against the floor, bpftrace and libbpf-tools (prints a table)
bench: build deps-bench deps-test mounts
	$(VENV)/bin/python bench/run.py --out bench-results/bench.json

# the fleet part of `make bench` alone: F synthetic nodes exported by the real
# collector to one real Prometheus (pure userspace, no kernel hooks; niced)
FLEET_ARGS ?=
bench-fleet: build deps-test
	nice -n 10 $(PY) bench/fleet.py --out bench-results/fleet.json $(FLEET_ARGS)

docs: build
	$(PY) -m ebpf_telemetry.metrics > docs/metrics.md
	$(PY) -m ebpf_telemetry.plan > docs/kernels.md

# 10 minutes at >= 50k RTT events/s across 255 peers; prints its figures.
# `make test` runs 60 s of it at a lower rate (tests/test_soak.py). Not to be
# run beside other tests (it fills peer tables and loads both CPUs).
soak: build mounts
	$(PY) tests/soak.py $(SOAK_ARGS)

# regenerate vmlinux.h from the running kernel's BTF (committed; CO-RE
# relocates against whatever kernel the object is loaded on)
vmlinux:
	bpftool btf dump file /sys/kernel/btf/vmlinux format c > vmlinux/$(ARCH)/vmlinux.h

clean:
	rm -rf build $(OBJ) $(VENV) python/ebpf_telemetry/_libbpf*.so python/*.egg-info

# -- packaging: the wheel and the OCI image (docs/deploy.md) -------------------
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
# build the image (mmdebstrap, umoci), read and push it (skopeo); tests run it
# (runc) and verify the unit (systemd-analyze)
APT_PACKAGING := mmdebstrap umoci skopeo runc systemd
PACKAGE_SRC := pyproject.toml setup.py MANIFEST.in Makefile $(wildcard python/ebpf_telemetry/*.py) \
	bpf/telemetry.bpf.c $(BPF_HEADERS) vmlinux/$(ARCH)/vmlinux.h
WHEEL_STAMP := build/wheel.stamp
IMAGE := dist/ebpf-telemetry-$(VERSION).oci.tar
BPF_OUT ?= build/pkg/telemetry.bpf.o

.PHONY: deps-packaging bpf-object wheel image

deps-packaging: deps
	$(call apt_install,$(APT_PACKAGING))

# the packaged object: setup.py's build step runs this (no apt, no copy in the tree)
bpf-object:
	@mkdir -p $(dir $(BPF_OUT))
	$(CLANG) $(BPF_CFLAGS) -c bpf/telemetry.bpf.c -o $(BPF_OUT)
	llvm-strip -g $(BPF_OUT)

# dist/ebpf_telemetry-$(VERSION)-<tags>.whl: the cffi extension and the object
# compiled in this build; installing it needs python3 and libbpf1 only
wheel: $(WHEEL_STAMP)
$(WHEEL_STAMP): $(PACKAGE_SRC) | deps $(VENV)/.stamp
	rm -rf build/lib build/lib.* build/bdist.* dist/ebpf_telemetry-$(VERSION)-*.whl
	$(PY) -m pip wheel -q --disable-pip-version-check --no-deps -w dist .
	touch $@

# dist/ebpf-telemetry-$(VERSION).oci.tar, from Debian packages (deploy/build-image.sh)
image: $(IMAGE)
$(IMAGE): $(WHEEL_STAMP) deploy/build-image.sh | deps-packaging
	PIP=$(VENV)/bin/pip bash deploy/build-image.sh dist/ebpf_telemetry-$(VERSION)-*.whl $@
