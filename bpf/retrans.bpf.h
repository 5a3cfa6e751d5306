/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Retransmits, counted as the kernel's TcpRetransSegs counts them: segments
 * (tcp_skb_pcount) of every data retransmit that went out (err == 0), and
 * every SYN-ACK retransmit, per peer and in node 0.
 */
#ifndef __RETRANS_BPF_H
#define __RETRANS_BPF_H

#include "counters.bpf.h"
#include "nodes.bpf.h"
#include "events.bpf.h"

#define TCP_SYN_RECV 3

static __always_inline __u32 tcp_pcount(const void *skb)
{
	struct tcp_skb_cb *cb = (void *)&((struct sk_buff *)skb)->cb[0];
	__u16 segs = BPF_CORE_READ(cb, tcp_gso_segs);

	return segs ? segs : 1;
}

static __always_inline void record_retrans(const struct settings *s, __u32 node, __u32 overflow,
					   __u32 segs, __u32 state)
{
	struct node_metrics *m = metrics(NODE_HOST);

	if (m)
		m->retrans_count += segs;
	m = metrics(node);
	if (m)
		m->retrans_count += segs;
	if (overflow)
		stat_inc(STAT_PEERS_OVERFLOW);
	emit_event(s, EVENT_RETRANS, node, segs, state);
}

static __always_inline void key_from_raw(struct peer_key *key, __u16 family, const void *v4,
					 const void *v6)
{
	__u32 a4 = 0;

	if (family == AF_INET) {
		bpf_probe_read_kernel(&a4, 4, v4);
		key_from_ipv4(key, a4);
	} else {
		key->prefixlen = 128;
		bpf_probe_read_kernel(key->addr, ADDR_LEN, v6);
	}
}

/* the paths without a socket cache: classify the remote address, count */
static __always_inline int retrans_to(const void *v4, const void *v6, __u16 family, __u32 segs,
				      __u32 state, int err)
{
	const struct settings *s = get_settings();
	struct peer_key key;
	__u32 node, overflow;

	if (!s || err)
		return 0;
	key_from_raw(&key, family, v4, v6);
	node = peer_lookup(s, &key, &overflow);
	record_retrans(s, node, overflow, segs, state);
	return 0;
}

SEC("tp_btf/tcp_retransmit_skb")
int BPF_PROG(tcp_retransmit_skb_btf, const struct sock *sk, const struct sk_buff *skb, int err)
{
	const struct settings *s = get_settings();
	__u32 node, overflow;

	if (!s || err)
		return 0;
	node = sock_node(s, (struct sock *)sk, &overflow);
	record_retrans(s, node, overflow, tcp_pcount(skb), sk->__sk_common.skc_state);
	return 0;
}

SEC("tracepoint/tcp/tcp_retransmit_skb")
int tcp_retransmit_skb_tp(struct trace_event_raw_tcp_retransmit_skb *ctx)
{
	return retrans_to(ctx->daddr, ctx->daddr_v6, ctx->family, tcp_pcount(ctx->skbaddr),
			  ctx->state, ctx->err);
}

SEC("tp_btf/tcp_retransmit_synack")
int BPF_PROG(tcp_retransmit_synack_btf, const struct sock *sk, const struct request_sock *req)
{
	const struct sock_common *c = &req->__req_common;

	return retrans_to(&c->skc_daddr, &c->skc_v6_daddr, c->skc_family, 1, TCP_SYN_RECV, 0);
}

SEC("tracepoint/tcp/tcp_retransmit_synack")
int tcp_retransmit_synack_tp(struct trace_event_raw_tcp_retransmit_synack *ctx)
{
	return retrans_to(ctx->daddr, ctx->daddr_v6, ctx->family, 1, TCP_SYN_RECV, 0);
}

#endif /* __RETRANS_BPF_H */
