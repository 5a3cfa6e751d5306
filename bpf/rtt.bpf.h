/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* RTT: the socket's smoothed RTT (srtt_us >> 3), once for every RTT
 * measurement the kernel takes on an established socket (tcp:tcp_probe on a
 * segment that acknowledges new data), per peer and in node 0. */
#ifndef __RTT_BPF_H
#define __RTT_BPF_H

#include "counters.bpf.h"
#include "nodes.bpf.h"
#include "events.bpf.h"
#include "bits.bpf.h"

/* 6.2 (a kfunc for every program type). Weak: on a kernel without it the
 * call stays unresolved in tcp_probe_cast, which the planner does not load
 * there (plan.py: variant tp_btf_cast needs it), and the object loads. */
extern void *bpf_rdonly_cast(const void *obj, __u32 btf_id) __ksym __weak;

static __always_inline void metrics_add_rtt(struct node_metrics *m, __u64 us)
{
	if (!m)
		return;
	m->rtt_sum += us;
	m->rtt_count += 1;
}

/* the same into a peer's row, which all CPUs share */
static __always_inline void metrics_add_rtt_shared(struct node_metrics *m, __u64 us)
{
	if (!m)
		return;
	__sync_fetch_and_add(&m->rtt_sum, us);
	__sync_fetch_and_add(&m->rtt_count, 1);
}

static __always_inline void record_rtt(const struct settings *s, __u32 node, __u64 us,
				       __u32 overflow, __u32 port)
{
	struct node_metrics *host = KEEP(ABLATE_METRICS) ? host_metrics() : NULL;
	struct node_metrics *peer = KEEP(ABLATE_METRICS) ? peer_metrics(node) : NULL;
	__u32 slot = KEEP(ABLATE_SLOT) ? value_to_slot(us) : 0;
	__u64 ts = 0;

	if (KEEP(ABLATE_HOST_HIST))
		hist_add(&rtt_host_hist_map, 0, slot);
	if (KEEP(ABLATE_PEER_ROW) && node != NODE_HOST)
		hist_add_shared(&rtt_hist_map, node, slot);
	metrics_add_rtt(host, us);
	metrics_add_rtt_shared(peer, us);
	if (overflow)
		stat_inc(STAT_PEERS_OVERFLOW);
	/* the clock is read only for sampled events: timestamp = the last one;
	 * the host's per-CPU sample count is the sampling counter */
	if (KEEP(ABLATE_EVENT))
		ts = emit_counted_event(s, host ? &host->rtt_count : NULL, EVENT_RTT, node, us, port);
	if (ts) {
		if (host)
			host->timestamp = ts;
		if (peer)
			peer->timestamp = ts;
	}
	if (s->debug)
		bpf_printk("RTT event - Node: %u, Value: %llu us", node, us);
}

/* Does this segment let the kernel take an RTT measurement? tcp_probe fires
 * for every segment at the start of tcp_rcv_established(), before tcp_ack();
 * the kernel measures when a segment acknowledges new data (its ack_seq is
 * after snd_una: tcp_ack -> tcp_clean_rtx_queue -> tcp_ack_update_rtt). A
 * socket that only receives acknowledges nothing new and measures nothing.
 * skb->cb holds struct tcp_skb_cb here (tcp_v4/v6_fill_cb ran before). */
static __always_inline bool acks_new_data(const struct tcp_sock *tp, const struct sk_buff *skb)
{
	const struct tcp_skb_cb *cb = (const void *)skb->cb;

	return (__s32)(cb->ack_seq - tp->snd_una) > 0;
}

/* One RTT sample per measurement: the smoothed RTT as it stands when the
 * kernel is about to fold the new measurement in. tp: sk as a tcp_sock
 * (tcp_probe fires only from tcp_rcv_established(): always one). */
static __always_inline int probe_rtt(const struct settings *s, struct sock *sk,
				     const struct tcp_sock *tp, const struct sk_buff *skb)
{
	__u32 node, overflow;

	if (!tp || (KEEP(ABLATE_ACK_CHECK) && !acks_new_data(tp, skb)))
		return 0;
	if (KEEP(ABLATE_PEER)) {
		node = sock_node(s, sk, &overflow);
	} else {
		node = NODE_HOST;
		overflow = 0;
	}
	record_rtt(s, node, tp->srtt_us >> 3, overflow, bpf_ntohs(sk->__sk_common.skc_dport));
	return 0;
}

/* tcp_probe(sk, skb): tp_btf since 5.5, this argument list since 4.16.
 * The socket as a tcp_sock, two ways (the planner loads one):
 * - tcp_probe_cast: bpf_rdonly_cast (6.2), a read-only BTF pointer without
 *   a helper call (15-30 ns less per event here: `make bench` part 1c,
 *   `bench/versus.py`);
 * - tcp_probe: bpf_skc_to_tcp_sock (5.9), for the kernels before it.
 * No probe reads either way. */
SEC("tp_btf/tcp_probe")
int BPF_PROG(tcp_probe_cast, struct sock *sk, const struct sk_buff *skb)
{
	const struct settings *s = get_settings();
	const struct tcp_sock *tp;

	if (!s)
		return 0;
	if (KEEP(ABLATE_SOCK_CAST))
		tp = bpf_rdonly_cast(sk, bpf_core_type_id_kernel(struct tcp_sock));
	else /* ablation: the helper's cost in this program */
		tp = bpf_skc_to_tcp_sock(sk);
	probe_rtt(s, sk, tp, skb);
#ifdef EBT_TEST_REJECT
	/* tests only (build/telemetry-reject.bpf.o): an argument no kernel passes,
	 * so the verifier rejects this collector after a long log */
	return ctx[7] != 0;
#endif
	return 0;
}

SEC("tp_btf/tcp_probe")
int BPF_PROG(tcp_probe, struct sock *sk, const struct sk_buff *skb)
{
	const struct settings *s = get_settings();

	if (!s)
		return 0;
	probe_rtt(s, sk, bpf_skc_to_tcp_sock(sk), skb);
#ifdef EBT_TEST_REJECT
	return ctx[7] != 0;
#endif
	return 0;
}

#endif /* __RTT_BPF_H */
