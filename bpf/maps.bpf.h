/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Every map of the object. Maps with LIBBPF_PIN_BY_NAME live under the pin
 * directory the loader sets (default /sys/fs/bpf/ebpf_telemetry/) and are
 * reused, counters intact, by the next load. Node-indexed maps hold node 0
 * (this host), the peers 1..max_peers and the reserved `other` node; the
 * loader sizes them from max_peers before load (DEFAULT_NODES here).
 */
#ifndef __MAPS_BPF_H
#define __MAPS_BPF_H

#include "telemetry.h"
#include "ablate.bpf.h"

#define DEFAULT_NODES 257      /* max_peers 255 + host + other */

/* RTT per peer: one row per node id shared by all CPUs (atomic adds), as
 * per-CPU rows would cost max_peers x 2 KiB per CPU (128 MiB at 256 CPUs);
 * node 0's row stays empty: the host's histogram is rtt_host_hist_map */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, DEFAULT_NODES);
	__type(key, __u32);
	__type(value, struct hist);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} rtt_hist_map SEC(".maps");

/* RTT of node 0 (every sample of the host): per-CPU, plain adds, as every
 * CPU adds to it */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct hist);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} rtt_host_hist_map SEC(".maps");

/* counters per peer: one row per node id shared by all CPUs (atomic adds),
 * as per-CPU rows would cost (max_peers + 2) x 64 B per CPU (268 MiB at
 * 16,384 peers and 256 CPUs); mmap-able, so userspace reads it in place.
 * Node 0's row stays empty: the host's counters are host_metrics_map */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, DEFAULT_NODES);
	__type(key, __u32);
	__type(value, struct node_metrics);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} node_metrics_map SEC(".maps");

/* counters of node 0 (this host): per-CPU, as every CPU adds to it */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct node_metrics);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} host_metrics_map SEC(".maps");

/* run-queue latency: node 0 only (a per-node array to match rtt_hist_map) */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct hist);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} runqlat_hist_map SEC(".maps");

/* packet drops by enum skb_drop_reason value (the core reasons, < 1024) */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_DROP_REASONS);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} drop_reasons_map SEC(".maps");

/* packet drops of subsystem reasons ((subsystem << 16) | code, 6.4+:
 * mac80211, openvswitch, ...), by their full value */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, MAX_SUBSYS_DROP_REASONS);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} drop_subsys_map SEC(".maps");

/* configured peers: CIDR -> node id, longest prefix wins */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 16384);
	__type(key, struct peer_key);
	__type(value, __u32);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} peer_cidr_map SEC(".maps");

/* automatic peers: remote address (prefixlen 128) -> node id */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, DEFAULT_NODES);
	__type(key, struct peer_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} peer_addr_map SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, DEFAULT_NODES);
	__type(key, __u32);
	__type(value, struct peer_info);
	__uint(map_flags, BPF_F_MMAPABLE); /* userspace reads it in place */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} peer_info_map SEC(".maps");

/* automatic peers: the ids free to hand out; userspace fills it with
 * 1..max_peers and gives expired ids back after holding them back */
struct {
	__uint(type, BPF_MAP_TYPE_QUEUE);
	__uint(max_entries, DEFAULT_NODES);
	__uint(value_size, sizeof(__u32));
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} peer_free_map SEC(".maps");

/* node id -> last activity (CLOCK_REALTIME ns), or when it was retired;
 * written by userspace only */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, DEFAULT_NODES);
	__type(key, __u32);
	__type(value, __u64);
	__uint(map_flags, BPF_F_MMAPABLE); /* userspace reads it in place */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} peer_seen_map SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct settings);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} settings_map SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} stats_map SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct events_lease);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} events_lease_map SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 24);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} events SEC(".maps");

/* not pinned: per-CPU position in the 1-in-N sampling cycle, per type */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, EVENT_TYPES);
	__type(key, __u32);
	__type(value, __u64);
} sample_ctr SEC(".maps");

/* not pinned: per CPU, the last remote address classified and its node; the
 * segments a CPU sees mostly come in runs of one connection */
struct last_peer {
	__u8 addr[ADDR_LEN];
	__u32 node_id;
	__u32 generation;
	__u32 overflow;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct last_peer);
} last_peer_cache SEC(".maps");

/* not pinned: a socket's node id, valid while generation matches */
struct sock_peer {
	__u32 node_id;
	__u32 generation;
	__u32 overflow;
};

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct sock_peer);
} sock_peer_cache SEC(".maps");

/* stats slots are shared by programs that can interrupt each other on one
 * CPU (tcp_probe in task context, a retransmit from a softirq timer): an
 * atomic add (lock xadd), not a read-modify-write that a nested run would undo */
static __always_inline void stat_inc(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&stats_map, &idx);

	if (v)
		__sync_fetch_and_add(v, 1);
}

#if EBT_ABLATE & ABLATE_SETTINGS
/* bench only: settings as a global (a direct load), automatic peers /32 /128 */
struct settings ablate_settings = {
	.sample_rate = 100, .auto_peers = 1, .max_peers = 255, .other_node = 256,
	.generation = 1, .auto_prefix_v4 = 32, .auto_prefix_v6 = 128,
	.auto_mask_v4 = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
			  0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff },
	.auto_mask_v6 = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
			  0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff },
};
#endif

/* NULL until userspace has written the peer table and settings (generation 0) */
static __always_inline const struct settings *get_settings(void)
{
	__u32 zero = 0;
	const struct settings *s;

#if EBT_ABLATE & ABLATE_SETTINGS
	return &ablate_settings;
#endif
	s = bpf_map_lookup_elem(&settings_map, &zero);

#ifdef EBT_TEST_OTHER_BUILD
	/* tests only (build/telemetry-other.bpf.o): another build of the same
	 * programs, for the upgrade test; this never holds */
	if (s && s->sample_rate == 0xffffffff)
		return NULL;
#endif
	return s && s->generation ? s : NULL;
}

#endif /* __MAPS_BPF_H */
