/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Kernel differences the object reads through CO-RE, in the manner of
 * libbpf-tools' core_fixes.bpf.h: one shim per renamed field, chosen by
 * bpf_core_field_exists() when the object is loaded, so one object serves
 * every kernel. Differences in tracepoint arguments cannot be bridged this
 * way (the verifier rejects reading an argument the kernel does not pass):
 * those are separate programs, chosen by userspace (python/ebpf_telemetry/plan.py).
 */
#ifndef __CORE_FIXES_BPF_H
#define __CORE_FIXES_BPF_H

#include <bpf/bpf_core_read.h>

/* task_struct::state was renamed __state in 5.14 (2f064a59a11f) */
struct task_struct___o {
	volatile long int state;
} __attribute__((preserve_access_index));

struct task_struct___x {
	unsigned int __state;
} __attribute__((preserve_access_index));

/* task is a BTF pointer (a tp_btf argument): plain loads, relocated by CO-RE;
 * the branch a kernel lacks is removed at load time */
static __always_inline __s64 get_task_state(void *task)
{
	struct task_struct___x *t = task;

	if (bpf_core_field_exists(t->__state))
		return t->__state;
	return ((struct task_struct___o *)task)->state;
}

/* sched_info.last_queued (CONFIG_SCHED_INFO, every kernel we load on):
 * non-zero while the scheduler itself counts the task's wait on a run queue;
 * schedstat's run count (/proc/<tid>/schedstat, sched_info.pcount) counts the
 * arrivals that had it set, and sched_switch fires before sched_info_arrive()
 * clears it. Without the field (CONFIG_SCHED_INFO off) every arrival counts. */
static __always_inline bool sched_counts_wait(struct task_struct *t)
{
	if (bpf_core_field_exists(t->sched_info.last_queued))
		return t->sched_info.last_queued != 0;
	return true;
}

#endif /* __CORE_FIXES_BPF_H */
