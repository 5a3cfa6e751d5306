/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* RTT: the socket's smoothed RTT (srtt_us >> 3) on every incoming segment
 * of an established socket (tcp:tcp_probe), per peer and in node 0. */
#ifndef __RTT_BPF_H
#define __RTT_BPF_H

#include "counters.bpf.h"
#include "nodes.bpf.h"
#include "events.bpf.h"
#include "bits.bpf.h"

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

/* tcp_probe(sk, skb): tp_btf since 5.5, this argument list since 4.16.
 * bpf_skc_to_tcp_sock (5.9) gives the tcp_sock as a BTF pointer: no kfunc
 * (bpf_rdonly_cast is 6.2+), no probe read. */
SEC("tp_btf/tcp_probe")
int BPF_PROG(tcp_probe, struct sock *sk, const struct sk_buff *skb)
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
#ifdef EBT_TEST_REJECT
	/* tests only (build/telemetry-reject.bpf.o): an argument no kernel passes,
	 * so the verifier rejects this collector after a long log */
	return ctx[7] != 0;
#endif
	return 0;
}

#endif /* __RTT_BPF_H */
