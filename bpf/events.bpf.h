/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* 1 in sample_rate events of each type to the `events` ring buffer, while a
 * consumer (`ebpf-telemetry events`) holds a fresh lease: with nobody
 * reading, nothing is sent and nothing is lost. */
#ifndef __EVENTS_BPF_H
#define __EVENTS_BPF_H

#include "maps.bpf.h"

/* wake the reader only once this much is waiting; it also polls on a timer */
#define WAKEUP_BYTES (256 * 1024)

/* a sampled event to the ring buffer, if a consumer holds a fresh lease;
 * its ktime (sent, lost, or nobody reading) */
static __always_inline __u64 send_event(__u32 type, __u32 node, __u64 value, __u32 extra)
{
	struct telemetry_event *e;
	struct events_lease *lease;
	__u32 zero = 0;
	__u64 flags, now;

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

/* the event's ktime if one was sampled (sent, lost, or nobody reading), else 0 */
static __always_inline __u64 emit_event(const struct settings *s, __u32 type, __u32 node,
					__u64 value, __u32 extra)
{
	__u32 rate = s->sample_rate;
	__u64 *ctr;

	if (!rate)
		return 0;
	ctr = bpf_map_lookup_elem(&sample_ctr, &type);
	if (!ctr)
		return 0;
	if (++*ctr < rate)
		return 0;
	*ctr = 0;
	return send_event(type, node, value, extra);
}

/* the same for a program that counts its events per CPU anyway (nth: this
 * CPU's count, this event included): the events whose count is a multiple of
 * sample_rate are sampled, 1 in sample_rate per CPU as with emit_event's
 * counter, without its look-up (a map and a line of their own, cold on a CPU
 * that switches rarely) */
static __always_inline __u64 emit_nth_event(const struct settings *s, __u64 nth, __u32 type,
					    __u32 node, __u64 value, __u32 extra)
{
	__u32 rate = s->sample_rate;

	if (!rate || nth % rate)
		return 0;
	return send_event(type, node, value, extra);
}

/* nth: the caller's per-CPU count of its events (host_metrics), NULL if it
 * has none: then (a bench variant without host_metrics) emit_event's counter */
static __always_inline __u64 emit_counted_event(const struct settings *s, const __u64 *nth,
						__u32 type, __u32 node, __u64 value, __u32 extra)
{
	if (nth)
		return emit_nth_event(s, *nth, type, node, value, extra);
	return KEEP(ABLATE_METRICS) ? 0 : emit_event(s, type, node, value, extra);
}

#endif /* __EVENTS_BPF_H */
