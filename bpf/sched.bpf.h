/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Run-queue latency, at sched_switch only, exactly as the scheduler's own
 * accounting (schedstat's run_delay and pcount, /proc/<tid>/schedstat):
 * sched_info_arrive(), called from prepare_task_switch() after the
 * tracepoint, adds rq->clock - next->sched_info.last_queued when
 * last_queued != 0 and clears it. The tracepoint fires after
 * update_rq_clock() and before that call, so this program reads the very
 * same two values: one event per arrival schedstat counts, of the same
 * length. No task storage, no sched_wakeup programs.
 *
 * The run queue: next->se.cfs_rq->rq (CONFIG_FAIR_GROUP_SCHED, set by
 * set_task_rq() for a task of any class to its CPU's group run queue; next
 * was picked from this CPU's rq). Not the per-CPU ksym `runqueues` with
 * bpf_this_cpu_ptr() (5.10): the kernel finds a ksym's address in kallsyms,
 * which holds no data symbols without CONFIG_KALLSYMS_ALL (the host of our
 * CI, a Firecracker kernel, has it off). Plain BTF pointer loads (5.5).
 * Without FAIR_GROUP_SCHED or SCHED_INFO the CO-RE relocation fails and the
 * collector is skipped with that verdict.
 * Before 5.14, sched_info_arrive() counted arrivals with no wait recorded
 * too (pcount); those are no run-queue wait and are not counted here.
 * CPU utilisation is not counted here: userspace reads the kernel's own
 * accounting (python/ebpf_telemetry/cputime.py says why).
 */
#ifndef __SCHED_BPF_H
#define __SCHED_BPF_H

#include "counters.bpf.h"
#include "events.bpf.h"
#include "bits.bpf.h"

static __always_inline void record_runqlat(const struct settings *s, __u64 delta_ns, __u32 pid)
{
	__u64 us = delta_ns / 1000;
	struct node_metrics *m;

	if (KEEP(ABLATE_HOST_HIST))
		hist_add(&runqlat_hist_map, NODE_HOST, KEEP(ABLATE_SLOT) ? value_to_slot(us) : 0);
	m = KEEP(ABLATE_METRICS) ? host_metrics() : NULL;
	if (m) {
		m->runqlat_sum += us;
		m->runqlat_count += 1;
	}
	/* this CPU's count is the sampling counter: no look-up of one */
	if (KEEP(ABLATE_EVENT))
		emit_counted_event(s, m ? &m->runqlat_count : NULL, EVENT_RUNQLAT, NODE_HOST, us,
				   pid);
}

SEC("tp_btf/sched_switch")
int BPF_PROG(sched_switch, bool preempt, struct task_struct *prev, struct task_struct *next)
{
	const struct settings *s = get_settings();
	__u64 queued, now;

	if (!s || !next->pid)
		return 0;
	queued = next->sched_info.last_queued;
	if (!queued)
		return 0; /* no wait the scheduler counts (nor does schedstat) */
	now = next->se.cfs_rq->rq->clock;
	/* the scheduler stamps and reads one run queue's clock: never negative
	 * there; guarded all the same, a negative u64 would add ~1.8e10 s */
	if ((__s64)(now - queued) >= 0)
		record_runqlat(s, now - queued, next->pid);
	return 0;
}

#endif /* __SCHED_BPF_H */
