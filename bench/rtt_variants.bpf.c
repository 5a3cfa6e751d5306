// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * Profiling the RTT hook (bench only): the product's tcp_probe_btf cut into
 * cumulative stages, plus "lean" rewrites of what the numbers reward. Built
 * against the product headers (bpf/ headers, read-only) so the stages run the
 * product's own code; bench/profile.py attaches one program at a time and
 * reads its bpf_stats cost under the same ping-pong.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>

#include "telemetry.h"
#include "rtt.bpf.h"

/* 1: settings + the tcp_sock */
SEC("tp_btf/tcp_probe")
int BPF_PROG(s1_settings, struct sock *sk)
{
	const struct settings *s = get_settings();
	struct tcp_sock *tp;

	if (!s)
		return 0;
	tp = bpf_skc_to_tcp_sock(sk);
	if (!tp)
		return 0;
	return tp->srtt_us >> 3 == 12345;
}

/* 2: + the peer (socket storage cache) */
SEC("tp_btf/tcp_probe")
int BPF_PROG(s2_peer, struct sock *sk)
{
	const struct settings *s = get_settings();
	struct tcp_sock *tp;
	__u32 node, overflow;

	if (!s)
		return 0;
	tp = bpf_skc_to_tcp_sock(sk);
	if (!tp)
		return 0;
	node = sock_node(s, sk, &overflow);
	return node == 12345 && tp->srtt_us;
}

/* 3: + two histogram adds (node 0 and the peer) */
SEC("tp_btf/tcp_probe")
int BPF_PROG(s3_hist, struct sock *sk)
{
	const struct settings *s = get_settings();
	struct tcp_sock *tp;
	__u32 node, overflow, slot;

	if (!s)
		return 0;
	tp = bpf_skc_to_tcp_sock(sk);
	if (!tp)
		return 0;
	node = sock_node(s, sk, &overflow);
	slot = value_to_slot(tp->srtt_us >> 3);
	hist_add(&rtt_hist_map, NODE_HOST, slot);
	hist_add(&rtt_hist_map, node, slot);
	return 0;
}

/* 4: + node_metrics for node 0 and the peer (ktime per event) */
SEC("tp_btf/tcp_probe")
int BPF_PROG(s4_metrics, struct sock *sk)
{
	const struct settings *s = get_settings();
	struct tcp_sock *tp;
	__u32 node, overflow, slot;
	__u64 us, now;

	if (!s)
		return 0;
	tp = bpf_skc_to_tcp_sock(sk);
	if (!tp)
		return 0;
	node = sock_node(s, sk, &overflow);
	us = tp->srtt_us >> 3;
	slot = value_to_slot(us);
	now = bpf_ktime_get_ns();
	hist_add(&rtt_hist_map, NODE_HOST, slot);
	hist_add(&rtt_hist_map, node, slot);
	metrics_add_rtt(NODE_HOST, us, now);
	metrics_add_rtt(node, us, now);
	return 0;
}

/* 5: the product (record_rtt: + overflow stat, 1-in-N event, debug check) */
SEC("tp_btf/tcp_probe")
int BPF_PROG(s5_product, struct sock *sk, const struct sk_buff *skb)
{
	const struct settings *s = get_settings();
	struct tcp_sock *tp;
	__u32 node, overflow;

	if (!s)
		return 0;
	tp = bpf_skc_to_tcp_sock(sk);
	if (!tp)
		return 0;
	node = sock_node(s, sk, &overflow);
	record_rtt(s, node, tp->srtt_us >> 3, overflow, bpf_ntohs(sk->__sk_common.skc_dport));
	return 0;
}

/* ---- lean rewrites ---- */

/* one per-CPU value per node: histogram and sums together, one lookup */
struct rtt_node {
	struct hist hist;
	__u64 sum;
	__u64 count;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, DEFAULT_NODES);
	__type(key, __u32);
	__type(value, struct rtt_node);
} lean_rtt_map SEC(".maps");

/* the sampling position kept in socket storage next to the node id */
struct lean_sock {
	__u32 node_id;
	__u32 generation;
	__u32 overflow;
	__u32 sample;
};

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct lean_sock);
} lean_sock_map SEC(".maps");

static __always_inline void lean_add(__u32 node, __u64 us, __u32 slot)
{
	struct rtt_node *n = bpf_map_lookup_elem(&lean_rtt_map, &node);

	asm volatile("" : "+r"(slot));
	if (!n || slot >= MAX_SLOTS)
		return;
	n->hist.slots[slot] += 1;
	n->sum += us;
	n->count += 1;
}

/* emit_event without its per-CPU sampling counter (the caller samples) */
static __always_inline void lean_emit(__u32 node, __u64 us, __u32 port)
{
	struct telemetry_event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	__u64 flags;

	if (!e) {
		stat_inc(STAT_EVENTS_LOST);
		return;
	}
	e->node_id = node;
	e->event_type = EVENT_RTT;
	e->value = us;
	e->timestamp = bpf_ktime_get_ns();
	e->extra_data = port;
	flags = bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA) >= WAKEUP_BYTES ?
		BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP;
	bpf_ringbuf_submit(e, flags);
	stat_inc(STAT_SAMPLED_BASE + EVENT_RTT);
}

/* L1: product minus node 0 (userspace sums the peers: node 0 = sum of 1..N+1) */
SEC("tp_btf/tcp_probe")
int BPF_PROG(l1_no_host, struct sock *sk, const struct sk_buff *skb)
{
	const struct settings *s = get_settings();
	struct tcp_sock *tp;
	__u32 node, overflow;
	__u64 us;

	if (!s)
		return 0;
	tp = bpf_skc_to_tcp_sock(sk);
	if (!tp)
		return 0;
	node = sock_node(s, sk, &overflow);
	us = tp->srtt_us >> 3;
	hist_add(&rtt_hist_map, node, value_to_slot(us));
	metrics_add_rtt(node, us, bpf_ktime_get_ns());
	if (overflow)
		stat_inc(STAT_PEERS_OVERFLOW);
	emit_event(s, EVENT_RTT, node, us, bpf_ntohs(sk->__sk_common.skc_dport));
	return 0;
}

/* L1b: L1 without bpf_ktime_get_ns (node_metrics.timestamp not written) */
SEC("tp_btf/tcp_probe")
int BPF_PROG(l1b_no_ktime, struct sock *sk, const struct sk_buff *skb)
{
	const struct settings *s = get_settings();
	struct node_metrics *m;
	struct tcp_sock *tp;
	__u32 node, overflow;
	__u64 us;

	if (!s)
		return 0;
	tp = bpf_skc_to_tcp_sock(sk);
	if (!tp)
		return 0;
	node = sock_node(s, sk, &overflow);
	us = tp->srtt_us >> 3;
	hist_add(&rtt_hist_map, node, value_to_slot(us));
	m = metrics(node);
	if (m) {
		m->rtt_sum += us;
		m->rtt_count += 1;
	}
	if (overflow)
		stat_inc(STAT_PEERS_OVERFLOW);
	emit_event(s, EVENT_RTT, node, us, bpf_ntohs(sk->__sk_common.skc_dport));
	return 0;
}

/* L2: L1 + one map value per node (hist and sums together), no ktime */
SEC("tp_btf/tcp_probe")
int BPF_PROG(l2_one_value, struct sock *sk, const struct sk_buff *skb)
{
	const struct settings *s = get_settings();
	struct tcp_sock *tp;
	__u32 node, overflow;
	__u64 us;

	if (!s)
		return 0;
	tp = bpf_skc_to_tcp_sock(sk);
	if (!tp)
		return 0;
	node = sock_node(s, sk, &overflow);
	us = tp->srtt_us >> 3;
	lean_add(node, us, value_to_slot(us));
	if (overflow)
		stat_inc(STAT_PEERS_OVERFLOW);
	emit_event(s, EVENT_RTT, node, us, bpf_ntohs(sk->__sk_common.skc_dport));
	return 0;
}

/* L3: L2 + the sampling counter in the socket's storage (no sample_ctr
 * lookup), one storage lookup for node id and sampling */
SEC("tp_btf/tcp_probe")
int BPF_PROG(l3_sock_sample, struct sock *sk, const struct sk_buff *skb)
{
	const struct settings *s = get_settings();
	struct lean_sock *c;
	struct tcp_sock *tp;
	struct peer_key key;
	__u32 node, overflow = 0;
	__u64 us;

	if (!s)
		return 0;
	tp = bpf_skc_to_tcp_sock(sk);
	if (!tp)
		return 0;
	c = bpf_sk_storage_get(&lean_sock_map, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!c)
		return 0;
	if (c->generation != s->generation) {
		if (sk->__sk_common.skc_family == AF_INET) {
			key_from_ipv4(&key, sk->__sk_common.skc_daddr);
		} else {
			key.prefixlen = 128;
			__builtin_memcpy(key.addr, &sk->__sk_common.skc_v6_daddr, ADDR_LEN);
		}
		c->node_id = peer_lookup(s, &key, &overflow);
		c->overflow = overflow;
		c->generation = s->generation;
	}
	node = c->node_id;
	us = tp->srtt_us >> 3;
	lean_add(node, us, value_to_slot(us));
	if (c->overflow)
		stat_inc(STAT_PEERS_OVERFLOW);
	if (s->sample_rate && ++c->sample >= s->sample_rate) {
		c->sample = 0;
		lean_emit(node, us, bpf_ntohs(sk->__sk_common.skc_dport));
	}
	return 0;
}

/* L4: L2 with the node from the peer_addr_map hash every time (no socket
 * storage): what the socket-storage cache saves or costs */
SEC("tp_btf/tcp_probe")
int BPF_PROG(l4_hash_peer, struct sock *sk, const struct sk_buff *skb)
{
	const struct settings *s = get_settings();
	struct tcp_sock *tp;
	struct peer_key key;
	__u32 node, overflow;
	__u64 us;

	if (!s)
		return 0;
	tp = bpf_skc_to_tcp_sock(sk);
	if (!tp)
		return 0;
	if (sk->__sk_common.skc_family == AF_INET) {
		key_from_ipv4(&key, sk->__sk_common.skc_daddr);
	} else {
		key.prefixlen = 128;
		__builtin_memcpy(key.addr, &sk->__sk_common.skc_v6_daddr, ADDR_LEN);
	}
	node = peer_lookup(s, &key, &overflow);
	us = tp->srtt_us >> 3;
	lean_add(node, us, value_to_slot(us));
	if (overflow)
		stat_inc(STAT_PEERS_OVERFLOW);
	emit_event(s, EVENT_RTT, node, us, bpf_ntohs(sk->__sk_common.skc_dport));
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
