/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* Counting into the node-indexed per-CPU maps: plain adds. Each slot (a
 * histogram, a node_metrics field) is written by one program only, and the
 * kernel never nests a program in itself on one CPU (it skips the run and
 * counts it in recursion_misses: ebpf_bpf_misses_total), so no add can be
 * interrupted by another to the same slot. Slots that several programs
 * share (stats_map, retrans_count) use atomic adds, as do the rows all CPUs
 * share (rtt_hist_map's and node_metrics_map's peers). */
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

#ifndef EEXIST
#define EEXIST 17
#endif

/* as libbpf-tools' maps.bpf.h: the value for key, created from init if absent
 * (two CPUs creating it at once: one wins, both get the same value) */
static __always_inline void *bpf_map_lookup_or_try_init(void *map, const void *key,
							const void *init)
{
	void *val;
	long err;

	val = bpf_map_lookup_elem(map, key);
	if (val)
		return val;
	err = bpf_map_update_elem(map, key, init, BPF_NOEXIST);
	if (err && err != -EEXIST)
		return 0;
	return bpf_map_lookup_elem(map, key);
}

/* the same into a row all CPUs share */
static __always_inline void hist_add_shared(void *map, __u32 idx, __u32 slot)
{
	struct hist *h = bpf_map_lookup_elem(map, &idx);

	barrier_var(slot);
	if (h && slot < MAX_SLOTS)
		__sync_fetch_and_add(&h->slots[slot], 1);
}

/* node 0: the host's per-CPU row (plain adds); a peer: its shared row
 * (atomic adds only, see peer_metrics) */
static __always_inline struct node_metrics *host_metrics(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&host_metrics_map, &zero);
}

static __always_inline struct node_metrics *peer_metrics(__u32 node)
{
	if (node == NODE_HOST)
		return 0;
	return bpf_map_lookup_elem(&node_metrics_map, &node);
}

#endif /* __COUNTERS_BPF_H */
