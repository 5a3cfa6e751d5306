/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Retransmits: segments (tcp_skb_pcount) of every data retransmit that went
 * out (err == 0), and every SYN-ACK retransmit, per peer and in node 0. The
 * kernel's TcpRetransSegs counts the same, but for the rare retransmit the
 * device layer then refused (counted there before it is sent).
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
	struct node_metrics *m = host_metrics();

	/* two programs write retrans_count (retrans_skb in task context can be
	 * interrupted by retrans_synack from a timer): atomic adds */
	if (m)
		__sync_fetch_and_add(&m->retrans_count, segs);
	m = peer_metrics(node);
	if (m)
		__sync_fetch_and_add(&m->retrans_count, segs);
	if (overflow)
		stat_inc(STAT_PEERS_OVERFLOW);
	emit_event(s, EVENT_RETRANS, node, segs, state);
}

static __always_inline int retrans_sk(const struct sock *sk, const struct sk_buff *skb,
				      const bool sk_cache)
{
	const struct settings *s = get_settings();
	__u32 node, overflow;

	if (!s)
		return 0;
	node = sock_node_cached(s, (struct sock *)sk, &overflow, sk_cache);
	record_retrans(s, node, overflow, tcp_pcount(skb), sk->__sk_common.skc_state);
	return 0;
}

/* Two programs for one tracepoint; the loader picks the one whose arguments
 * this kernel passes (plan.py). Since 6.17 the tracepoint also fires for
 * attempts that failed and passes `err`; before, it fired only for a
 * retransmit that went out. Both count the same. */
SEC("tp_btf/tcp_retransmit_skb")
int BPF_PROG(retrans_skb_err, const struct sock *sk, const struct sk_buff *skb, int err)
{
	return err ? 0 : retrans_sk(sk, skb, true);
}

SEC("tp_btf/tcp_retransmit_skb")
int BPF_PROG(retrans_skb, const struct sock *sk, const struct sk_buff *skb)
{
	return retrans_sk(sk, skb, true);
}

/* before 5.11 tracing programs have no socket storage: the peer is looked
 * up in the tables for each retransmit (rare: the cost does not matter) */
SEC("tp_btf/tcp_retransmit_skb")
int BPF_PROG(retrans_nosk, const struct sock *sk, const struct sk_buff *skb)
{
	return retrans_sk(sk, skb, false);
}

/* request sockets: classified by address, never through a socket cache */
SEC("tp_btf/tcp_retransmit_synack")
int BPF_PROG(retrans_synack, const struct sock *sk, const struct request_sock *req)
{
	const struct settings *s = get_settings();
	const struct sock_common *c = &req->__req_common;
	struct peer_key key;
	__u32 node, overflow;

	if (!s)
		return 0;
	if (c->skc_family == AF_INET) {
		key_from_ipv4(&key, c->skc_daddr);
	} else {
		key.prefixlen = 128;
		__builtin_memcpy(key.addr, &c->skc_v6_daddr, ADDR_LEN);
	}
	/* a request socket never takes a peer id: a SYN flood from spoofed
	 * addresses must not fill the table (unknown addresses: `other`) */
	node = classify(s, &key, &overflow, false);
	record_retrans(s, node, overflow, 1, TCP_SYN_RECV);
	return 0;
}

#endif /* __RETRANS_BPF_H */
