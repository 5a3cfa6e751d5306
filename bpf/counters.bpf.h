/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* Counting into the node-indexed per-CPU maps: plain adds. Each slot (a
 * histogram, a node_metrics field) is written by one program only, and the
 * kernel never nests a program in itself on one CPU (it skips the run and
 * counts it in recursion_misses: ebpf_bpf_misses_total), so no add can be
 * interrupted by another to the same slot. Slots that several programs
 * share (stats_map, retrans_count) use atomic adds. */
#ifndef __COUNTERS_BPF_H
#define __COUNTERS_BPF_H

#include "maps.bpf.h"

static __always_inline void hist_add(void *map, __u32 idx, __u32 slot)
{
	struct hist *h = bpf_map_lookup_elem(map, &idx);

	/* the compiler knows slot < MAX_SLOTS and would drop the check the
	 * verifier needs: hide what it knows */
	barrier_var(slot);
	if (h && slot < MAX_SLOTS)
		h->slots[slot] += 1;
}

static __always_inline struct node_metrics *metrics(__u32 node)
{
	return bpf_map_lookup_elem(&node_metrics_map, &node);
}

#endif /* __COUNTERS_BPF_H */
