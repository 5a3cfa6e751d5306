// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* The floor: empty tp_btf programs on the hooks ebpf-telemetry uses, and on
 * sched_wakeup, where runqlat runs and ebpf-telemetry does not (since its
 * sched collector is one sched_switch program). The benchmark attaches them
 * beside ours; their bpf_stats per-event cost is the dispatch + stats
 * overhead every program on that hook pays. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

SEC("tp_btf/tcp_probe")
int BPF_PROG(empty_tcp_probe, struct sock *sk, const struct sk_buff *skb)
{
	return 0;
}

SEC("tp_btf/sched_wakeup")
int BPF_PROG(empty_sched_wakeup, struct task_struct *p)
{
	return 0;
}

SEC("tp_btf/sched_switch")
int BPF_PROG(empty_sched_switch, bool preempt, struct task_struct *prev, struct task_struct *next)
{
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
