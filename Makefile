# ebpf-telemetry. `make run` and `make test` do every set-up step themselves:
# Debian packages, bpffs/tracefs mounts, the BPF build, the venv.
SHELL := /bin/bash
ARCH ?= $(shell uname -m | sed -e 's/x86_64/x86/' -e 's/aarch64/arm64/')
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CLANG ?= clang
BPF_CFLAGS := -g -O2 -target bpf -mcpu=v3 -D__TARGET_ARCH_$(ARCH) -Ivmlinux/$(ARCH) -Ibpf -Wall -Werror
BPF_HEADERS := $(wildcard bpf/*.h)
OBJ := python/ebpf_telemetry/data/telemetry.bpf.o
TEST_OBJ := build/slot_test.bpf.o
RUN_ARGS ?=
PYTEST_ARGS ?=
SOAK_ARGS ?= --duration 600

APT_BUILD := clang llvm libbpf-dev libbpf1 bpftool libelf-dev zlib1g-dev gcc python3-venv python3-dev
APT_TEST := iproute2 nftables prometheus prometheus-node-exporter
APT_BENCH := sockperf bpftrace libbpf-tools

.PHONY: all build deps deps-test deps-bench mounts run test lint bench soak clean vmlinux docs

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

mounts:
	@mountpoint -q /sys/fs/bpf || mount -t bpf -o mode=0700 bpf /sys/fs/bpf
	@mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing

build/%.bpf.o: bpf/%.bpf.c $(BPF_HEADERS) vmlinux/$(ARCH)/vmlinux.h | deps
	@mkdir -p build
	$(CLANG) $(BPF_CFLAGS) -c $< -o $@
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

test: build deps-test mounts
	$(VENV)/bin/pytest $(PYTEST_ARGS)

lint: build
	$(VENV)/bin/ruff check python tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy --strict --ignore-missing-imports bench/*.py

# what it costs, against the floor, bpftrace and libbpf-tools (prints a table)
bench: build deps-bench mounts
	$(VENV)/bin/python bench/run.py --out bench-results/bench.json

docs: build
	$(PY) -m ebpf_telemetry.metrics > docs/metrics.md

# 10 minutes at >= 50k RTT events/s across 255 peers; prints its figures.
# Not part of `make test`, and not to be run beside it (it fills peer tables).
soak: build mounts
	$(PY) tests/soak.py $(SOAK_ARGS)

# regenerate vmlinux.h from the running kernel's BTF (committed; CO-RE
# relocates against whatever kernel the object is loaded on)
vmlinux:
	bpftool btf dump file /sys/kernel/btf/vmlinux format c > vmlinux/$(ARCH)/vmlinux.h

clean:
	rm -rf build $(OBJ) $(VENV) python/ebpf_telemetry/_libbpf*.so python/*.egg-info
