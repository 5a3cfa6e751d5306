/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* RTT: the socket's smoothed RTT (srtt_us >> 3) on every incoming segment
 * of an established socket (tcp:tcp_probe), per peer and in node 0. */
#ifndef __RTT_BPF_H
#define __RTT_BPF_H

#include "counters.bpf.h"
#include "nodes.bpf.h"
#include "events.bpf.h"
#include "bits.bpf.h"

extern void *bpf_rdonly_cast(const void *obj, __u32 btf_id) __ksym;

static __always_inline void metrics_add_rtt(struct node_metrics *m, __u64 us)
{
	if (!m)
		return;
	m->rtt_sum += us;
	m->rtt_count += 1;
}

static __always_inline void record_rtt(const struct settings *s, __u32 node, __u64 us,
				       __u32 overflow, __u32 port)
{
	struct node_metrics *host = metrics(NODE_HOST), *peer = metrics(node);
	__u32 slot = value_to_slot(us);
	__u64 ts;

	hist_add(&rtt_hist_map, NODE_HOST, slot);
	hist_add(&rtt_hist_map, node, slot);
	metrics_add_rtt(host, us);
	metrics_add_rtt(peer, us);
	if (overflow)
		stat_inc(STAT_PEERS_OVERFLOW);
	/* the clock is read only for sampled events: timestamp = the last one */
	ts = emit_event(s, EVENT_RTT, node, us, port);
	if (ts) {
		if (host)
			host->timestamp = ts;
		if (peer)
			peer->timestamp = ts;
	}
	if (s->debug)
		bpf_printk("RTT event - Node: %u, Value: %llu us", node, us);
}

SEC("tp_btf/tcp_probe")
int BPF_PROG(tcp_probe_btf, struct sock *sk, const struct sk_buff *skb)
{
	const struct settings *s = get_settings();
	struct tcp_sock *tp;
	__u32 node, overflow;

	if (!s)
		return 0;
	/* tcp_probe fires for TCP sockets only: a cast, not a helper call */
	tp = bpf_rdonly_cast(sk, bpf_core_type_id_kernel(struct tcp_sock));
	node = sock_node(s, sk, &overflow);
	record_rtt(s, node, tp->srtt_us >> 3, overflow, bpf_ntohs(sk->__sk_common.skc_dport));
	return 0;
}

SEC("tracepoint/tcp/tcp_probe")
int tcp_probe_tp(struct trace_event_raw_tcp_probe *ctx)
{
	const struct settings *s = get_settings();
	struct peer_key key;
	__u32 node, overflow, port;

	if (!s)
		return 0;
	/* ctx->daddr is a sockaddr_in or sockaddr_in6; copy it off the ctx */
	union {
		struct sockaddr_in in;
		struct sockaddr_in6 in6;
	} sa;

	if (bpf_probe_read_kernel(&sa, sizeof(sa), ctx->daddr))
		return 0;
	if (ctx->family == AF_INET) {
		key_from_ipv4(&key, sa.in.sin_addr.s_addr);
		port = sa.in.sin_port;
	} else {
		key.prefixlen = 128;
		__builtin_memcpy(key.addr, &sa.in6.sin6_addr, ADDR_LEN);
		port = sa.in6.sin6_port;
	}
	node = peer_lookup(s, &key, &overflow);
	/* the tracepoint's srtt is already srtt_us >> 3 */
	record_rtt(s, node, ctx->srtt, overflow, bpf_ntohs(port));
	return 0;
}

#endif /* __RTT_BPF_H */
