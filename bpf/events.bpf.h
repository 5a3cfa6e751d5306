/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* 1 in sample_rate events of each type to the `events` ring buffer. */
#ifndef __EVENTS_BPF_H
#define __EVENTS_BPF_H

#include "maps.bpf.h"

/* wake the reader only once this much is waiting; it also polls on a timer */
#define WAKEUP_BYTES (256 * 1024)

static __always_inline void emit_event(const struct settings *s, __u32 type, __u32 node,
				       __u64 value, __u32 extra)
{
	struct telemetry_event *e;
	__u32 rate = s->sample_rate;
	__u64 *ctr, flags;

	if (!rate)
		return;
	ctr = bpf_map_lookup_elem(&sample_ctr, &type);
	if (!ctr)
		return;
	if (++*ctr < rate)
		return;
	*ctr = 0;
	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		stat_inc(STAT_EVENTS_LOST);
		return;
	}
	e->node_id = node;
	e->event_type = type;
	e->value = value;
	e->timestamp = bpf_ktime_get_ns();
	e->extra_data = extra;
	flags = bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA) >= WAKEUP_BYTES ?
		BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP;
	bpf_ringbuf_submit(e, flags);
	stat_inc(STAT_SAMPLED_BASE + type);
}

#endif /* __EVENTS_BPF_H */
