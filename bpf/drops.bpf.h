/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Packet drops (skb:kfree_skb) by the kernel's enum skb_drop_reason; names
 * are read from the running kernel's BTF in userspace. Counted for the host
 * only: no per-peer attribution (it cost two probe reads and two peer-table
 * look-ups per drop, and nothing exported it).
 */
#ifndef __DROPS_BPF_H
#define __DROPS_BPF_H

#include "counters.bpf.h"
#include "events.bpf.h"

static __always_inline void record_drop(const struct settings *s, __u32 reason)
{
	static const __u64 zero;
	struct node_metrics *m;
	__u64 *count;

	if (reason < MAX_DROP_REASONS)
		count = bpf_map_lookup_elem(&drop_reasons_map, &reason);
	else
		count = bpf_map_lookup_or_try_init(&drop_subsys_map, &reason, &zero);
	if (count)
		*count += 1;
	m = host_metrics();
	if (m)
		m->drop_count += 1;
	emit_event(s, EVENT_DROP, NODE_HOST, reason, 0);
}

/* kfree_skb passes its drop reason since 5.17; the loader picks one of the
 * two (plan.py). Without it every drop counts as DROP_REASON_UNKNOWN. */
SEC("tp_btf/kfree_skb")
int BPF_PROG(drop_reason, struct sk_buff *skb, void *location, enum skb_drop_reason reason)
{
	const struct settings *s = get_settings();

	if (s)
		record_drop(s, reason);
	return 0;
}

SEC("tp_btf/kfree_skb")
int BPF_PROG(drop_noreason, struct sk_buff *skb, void *location)
{
	const struct settings *s = get_settings();

	if (s)
		record_drop(s, DROP_REASON_UNKNOWN);
	return 0;
}

#endif /* __DROPS_BPF_H */
