/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Packet drops (skb:kfree_skb) by the kernel's enum skb_drop_reason; names
 * are read from the running kernel's BTF in userspace. The peer is the one
 * the IP header's source (else destination) address belongs to, if any: a
 * drop never takes a new peer id.
 */
#ifndef __DROPS_BPF_H
#define __DROPS_BPF_H

#include "counters.bpf.h"
#include "nodes.bpf.h"
#include "events.bpf.h"

#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD

static __always_inline __u32 drop_peer(const struct settings *s, const void *skb_ptr)
{
	struct sk_buff *skb = (struct sk_buff *)skb_ptr;
	__u16 proto = bpf_ntohs(BPF_CORE_READ(skb, protocol));
	__u16 nh = BPF_CORE_READ(skb, network_header);
	unsigned char *head = BPF_CORE_READ(skb, head);
	struct peer_key key;
	__u32 node;

	if (nh == (__u16)~0U || !head)
		return NODE_HOST;
	if (proto == ETH_P_IP) {
		struct iphdr ip;

		if (bpf_probe_read_kernel(&ip, sizeof(ip), head + nh))
			return NODE_HOST;
		key_from_ipv4(&key, ip.saddr);
		node = peer_find(s, &key);
		if (node == NODE_HOST) {
			key_from_ipv4(&key, ip.daddr);
			node = peer_find(s, &key);
		}
		return node;
	}
	if (proto == ETH_P_IPV6) {
		struct ipv6hdr ip6;

		if (bpf_probe_read_kernel(&ip6, sizeof(ip6), head + nh))
			return NODE_HOST;
		key.prefixlen = 128;
		__builtin_memcpy(key.addr, &ip6.saddr, ADDR_LEN);
		node = peer_find(s, &key);
		if (node == NODE_HOST) {
			__builtin_memcpy(key.addr, &ip6.daddr, ADDR_LEN);
			node = peer_find(s, &key);
		}
		return node;
	}
	return NODE_HOST;
}

static __always_inline void record_drop(const struct settings *s, const void *skb, __u32 reason)
{
	__u32 idx = reason < MAX_DROP_REASONS ? reason : MAX_DROP_REASONS - 1;
	__u32 node = drop_peer(s, skb);
	struct node_metrics *m;
	__u64 *count;

	count = bpf_map_lookup_elem(&drop_reasons_map, &idx);
	if (count)
		*count += 1;
	m = metrics(NODE_HOST);
	if (m)
		m->drop_count += 1;
	if (node != NODE_HOST) {
		m = metrics(node);
		if (m)
			m->drop_count += 1;
	}
	emit_event(s, EVENT_DROP, node, reason, 0);
}

/* kfree_skb passes its drop reason since 5.17; the loader picks one of the
 * two (plan.py). Without it every drop counts as DROP_REASON_UNKNOWN. */
SEC("tp_btf/kfree_skb")
int BPF_PROG(drop_reason, struct sk_buff *skb, void *location, enum skb_drop_reason reason)
{
	const struct settings *s = get_settings();

	if (s)
		record_drop(s, skb, reason);
	return 0;
}

SEC("tp_btf/kfree_skb")
int BPF_PROG(drop_noreason, struct sk_buff *skb, void *location)
{
	const struct settings *s = get_settings();

	if (s)
		record_drop(s, skb, DROP_REASON_UNKNOWN);
	return 0;
}

#endif /* __DROPS_BPF_H */
