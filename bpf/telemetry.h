/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * The one definition of every value the kernel side and the Python side
 * exchange. Included by the BPF sources and, between the SHARED markers,
 * parsed by the cffi builder (python/ebpf_telemetry/_build_libbpf.py), so
 * both sides compile against the same layout. Keep this part plain C:
 * integer #defines, structs of __u8/__u32/__u64 and arrays of them.
 */
#ifndef __TELEMETRY_H
#define __TELEMETRY_H

/* SHARED BEGIN */
#define MAX_SLOTS 256          /* histogram slots, see bits.bpf.h */
#define SUB_BUCKET_BITS 3      /* 8 sub-buckets per power of two */
#define NODE_HOST 0            /* node 0: this host, aggregates everything */
#define MAX_PEERS_LIMIT 16384  /* hard ceiling for max_peers */
#define PEER_NAME_LEN 60
#define ADDR_LEN 16            /* IPv6, or IPv4 mapped as ::ffff:a.b.c.d */
#define MAX_DROP_REASONS 1024  /* drop_reasons_map index: enum skb_drop_reason (core) */
#define MAX_SUBSYS_DROP_REASONS 512 /* drop_subsys_map: reasons >= MAX_DROP_REASONS (6.4+) */
#define DROP_REASON_UNKNOWN 1022 /* kernels whose kfree_skb passes no reason (< 5.17) */

/* event_type of struct telemetry_event */
#define EVENT_RTT 1
#define EVENT_RETRANS 2
#define EVENT_DROP 3
#define EVENT_RUNQLAT 4
#define EVENT_TYPES 5          /* index 0 unused */

/* indices of stats_map, a per-CPU array of __u64 counters */
#define STAT_PEERS_EXPIRED 0   /* ids expired and freed: userspace writes it, CPU 0's row only */
#define STAT_SAMPLED_BASE 0    /* + event_type (1..4): events submitted */
#define STAT_EVENTS_LOST 5     /* ring buffer reservations that failed */
#define STAT_PEERS_OVERFLOW 6  /* events counted under `other`: table full */
#define STAT_PEER_RACE 7       /* ids lost to two CPUs adding one address */
#define STAT_MAX 8

/* flags of struct peer_info */
#define PEER_AUTO 1            /* allocated by the kernel for one address */
#define PEER_NAMED 2           /* configured by userspace */
#define PEER_OTHER 4           /* the reserved overflow node */
#define PEER_RETIRING 8        /* PEER_AUTO expired: no address maps to it, held back */

struct hist {
	__u64 slots[MAX_SLOTS];
};

struct node_metrics {
	__u64 rtt_sum;         /* microseconds */
	__u64 rtt_count;
	__u64 retrans_count;
	__u64 drop_count;
	__u64 runqlat_sum;     /* microseconds */
	__u64 runqlat_count;
	__u32 cpu_util;        /* unused since 0.2 (always 0): kept, pins of earlier
	                          releases have this layout */
	__u64 timestamp;       /* ktime (ns) of the node's last sampled RTT event */
};

struct telemetry_event {
	__u32 node_id;
	__u32 event_type;
	__u64 value;
	__u64 timestamp;       /* ns since boot */
	__u32 extra_data;      /* RTT: remote port */
};

struct settings {
	__u32 sample_rate;     /* 1 in N events to the ring buffer, 0 = none */
	__u32 debug;           /* RTT events to trace_pipe */
	__u32 auto_peers;      /* 1: one node per remote address */
	__u32 max_peers;       /* peer ids are 1..max_peers */
	__u32 other_node;      /* max_peers + 1 */
	__u32 generation;      /* bumped when the peer table changes */
	__u32 auto_prefix_v4;  /* automatic peers: addresses folded into subnets of */
	__u32 auto_prefix_v6;  /* these prefix lengths (32 / 128: one per address) */
	__u8 auto_mask_v4[ADDR_LEN]; /* the same as masks (userspace computes them): */
	__u8 auto_mask_v6[ADDR_LEN]; /* ::ffff:a.b.c.d & mask_v4, IPv6 & mask_v6 */
};

struct peer_key {              /* LPM trie key of peer_cidr_map */
	__u32 prefixlen;
	__u8 addr[ADDR_LEN];
};

struct peer_info {
	__u8 addr[ADDR_LEN];   /* PEER_AUTO: the address */
	__u32 flags;
	char name[PEER_NAME_LEN];
};

/* the `events` consumer's lease: the kernel sends events only before `until` */
struct events_lease {
	__u64 until;           /* CLOCK_MONOTONIC ns (bpf_ktime_get_ns); 0: no consumer */
};

/* SHARED END */

#endif /* __TELEMETRY_H */
