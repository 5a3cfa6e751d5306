/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* 1 in sample_rate events of each type to the `events` ring buffer, while a
 * consumer (`ebpf-telemetry events`) holds a fresh lease: with nobody
 * reading, nothing is sent and nothing is lost. */
#ifndef __EVENTS_BPF_H
#define __EVENTS_BPF_H

#include "maps.bpf.h"

/* wake the reader only once this much is waiting; it also polls on a timer */
#define WAKEUP_BYTES (256 * 1024)

/* the event's ktime if one was sampled (sent, lost, or nobody reading), else 0 */
static __always_inline __u64 emit_event(const struct settings *s, __u32 type, __u32 node,
					__u64 value, __u32 extra)
{
	struct telemetry_event *e;
	struct events_lease *lease;
	__u32 rate = s->sample_rate, zero = 0;
	__u64 *ctr, flags, now;

	if (!rate)
		return 0;
	ctr = bpf_map_lookup_elem(&sample_ctr, &type);
	if (!ctr)
		return 0;
	if (++*ctr < rate)
		return 0;
	*ctr = 0;
	now = bpf_ktime_get_ns();
	lease = bpf_map_lookup_elem(&events_lease_map, &zero);
	if (!lease || now >= lease->until)
		return now;
	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		stat_inc(STAT_EVENTS_LOST);
		return now;
	}
	e->node_id = node;
	e->event_type = type;
	e->value = value;
	e->timestamp = now;
	e->extra_data = extra;
	flags = bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA) >= WAKEUP_BYTES ?
		BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP;
	bpf_ringbuf_submit(e, flags);
	stat_inc(STAT_SAMPLED_BASE + type);
	return now;
}

#endif /* __EVENTS_BPF_H */
