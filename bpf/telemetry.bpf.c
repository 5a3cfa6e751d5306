// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * ebpf-telemetry: the kernel side. Counts into pinned maps; userspace only
 * reads, decodes and labels. Every program is tp_btf (BTF is required for
 * CO-RE anyway, and every kernel with BTF has tp_btf). Where kernels differ
 * in a tracepoint's arguments there is one program per argument list and
 * the loader enables the one this kernel takes (python/ebpf_telemetry/plan.py)
 * with bpf_program__set_autoload(); each collector is loaded on its own.
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
