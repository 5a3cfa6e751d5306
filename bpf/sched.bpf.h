/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Run-queue latency (sched_wakeup, sched_wakeup_new, sched_switch): the time
 * from a task becoming runnable (woken, or preempted while running) to it
 * running, in node 0. The enqueue time lives in task storage (5.11).
 * CPU utilisation is not counted here: userspace reads the kernel's own
 * accounting (python/ebpf_telemetry/cputime.py says why).
 */
#ifndef __SCHED_BPF_H
#define __SCHED_BPF_H

#include "counters.bpf.h"
#include "events.bpf.h"
#include "bits.bpf.h"
#include "core_fixes.bpf.h"

#define TASK_RUNNING 0

static __always_inline void record_runqlat(const struct settings *s, __u64 delta_ns, __u32 pid)
{
	__u64 us = delta_ns / 1000;
	struct node_metrics *m;

	hist_add(&runqlat_hist_map, NODE_HOST, value_to_slot(us));
	m = host_metrics();
	if (m) {
		m->runqlat_sum += us;
		m->runqlat_count += 1;
	}
	emit_event(s, EVENT_RUNQLAT, NODE_HOST, us, pid);
}

static __always_inline int enqueue_task(struct task_struct *p)
{
	__u64 *ts;

	if (!p->pid)
		return 0;
	ts = bpf_task_storage_get(&task_enqueued, p, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (ts)
		*ts = bpf_ktime_get_ns();
	return 0;
}

SEC("tp_btf/sched_wakeup")
int BPF_PROG(sched_wakeup, struct task_struct *p)
{
	return enqueue_task(p);
}

SEC("tp_btf/sched_wakeup_new")
int BPF_PROG(sched_wake_new, struct task_struct *p)
{
	return enqueue_task(p);
}

static __always_inline int on_switch(bool preempt, struct task_struct *prev,
				     struct task_struct *next, __s64 prev_state)
{
	const struct settings *s = get_settings();
	__u64 now = bpf_ktime_get_ns(), *ts;

	if (!s)
		return 0;
	/* preempted (whatever state it was about to sleep in) or still runnable */
	if (prev->pid && (preempt || prev_state == TASK_RUNNING)) {
		ts = bpf_task_storage_get(&task_enqueued, prev, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
		if (ts)
			*ts = now;
	}
	if (!next->pid)
		return 0;
	ts = bpf_task_storage_get(&task_enqueued, next, 0, 0);
	if (ts && *ts) {
		/* a wait the scheduler counts too: what it did not queue (woken
		 * while still on its run queue, preempted on its way to sleep)
		 * is no run-queue wait in schedstat, nor here */
		/* stamped on another CPU: clocks can disagree by a little, and a
		 * negative wait would add ~1.8e10 s as a u64 (libbpf-tools'
		 * runqlat guards it the same way) */
		if (sched_counts_wait(next) && (__s64)(now - *ts) >= 0)
			record_runqlat(s, now - *ts, next->pid);
		*ts = 0;
	}
	return 0;
}

/* Two programs for one tracepoint, the loader picks one (plan.py): since
 * 5.18 sched_switch passes prev's state as the scheduler saw it; before,
 * the task's own state field is read (as libbpf-tools' runqlat does). */
SEC("tp_btf/sched_switch")
int BPF_PROG(sched_switch_st, bool preempt, struct task_struct *prev, struct task_struct *next,
	     unsigned int prev_state)
{
	return on_switch(preempt, prev, next, prev_state);
}

SEC("tp_btf/sched_switch")
int BPF_PROG(sched_switch, bool preempt, struct task_struct *prev, struct task_struct *next)
{
	return on_switch(preempt, prev, next, get_task_state(prev));
}

#endif /* __SCHED_BPF_H */
