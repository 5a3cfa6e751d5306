// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * ebpf-telemetry: the kernel side. Counts into pinned maps; userspace only
 * reads, decodes and labels. Each collector has a tp_btf program and, where
 * a kernel lacks BTF for it, a classic tracepoint twin; the loader enables
 * one of the two with bpf_program__set_autoload().
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>

#include "telemetry.h"
#include "rtt.bpf.h"
#include "retrans.bpf.h"
#include "drops.bpf.h"
#include "sched.bpf.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";
