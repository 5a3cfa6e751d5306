/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Which node a remote address belongs to. Configured peers: longest-prefix
 * match in peer_cidr_map, unmatched addresses go to the `other` node.
 * Automatic peers (no peers configured): one node per distinct address,
 * handed out by the kernel itself; once max_peers are taken, new addresses
 * count under `other` and in STAT_PEERS_OVERFLOW.
 * Addresses are 16 bytes; IPv4 is mapped as ::ffff:a.b.c.d.
 */
#ifndef __NODES_BPF_H
#define __NODES_BPF_H

#include "maps.bpf.h"

#define AF_INET 2
#define AF_INET6 10

static __always_inline void key_from_ipv4(struct peer_key *key, __u32 addr_be)
{
	__builtin_memset(key, 0, sizeof(*key));
	key->prefixlen = 128;
	key->addr[10] = 0xff;
	key->addr[11] = 0xff;
	__builtin_memcpy(&key->addr[12], &addr_be, 4);
}

static __noinline __u32 peer_alloc(const struct settings *s, struct peer_key *key, __u32 *overflow)
{
	struct peer_info info = {};
	struct peer_alloc *a;
	__u32 zero = 0, nid, *id;

	a = bpf_map_lookup_elem(&peer_alloc_map, &zero);
	if (!a || a->next_id >= s->max_peers)
		goto full;
	nid = __sync_fetch_and_add(&a->next_id, 1) + 1;
	if (nid > s->max_peers)
		goto full;
	__builtin_memcpy(info.addr, key->addr, ADDR_LEN);
	info.flags = PEER_AUTO;
	bpf_map_update_elem(&peer_info_map, &nid, &info, BPF_ANY);
	if (bpf_map_update_elem(&peer_addr_map, key, &nid, BPF_NOEXIST) == 0)
		return nid;
	/* another CPU added this address first: use its id, nid stays unused */
	stat_inc(STAT_PEER_RACE);
	info.flags = 0;
	bpf_map_update_elem(&peer_info_map, &nid, &info, BPF_ANY);
	id = bpf_map_lookup_elem(&peer_addr_map, key);
	if (id)
		return *id;
full:
	*overflow = 1;
	return s->other_node;
}

static __always_inline __u32 peer_lookup(const struct settings *s, struct peer_key *key, __u32 *overflow)
{
	__u32 *id;

	*overflow = 0;
	if (!s->auto_peers) {
		id = bpf_map_lookup_elem(&peer_cidr_map, key);
		return id ? *id : s->other_node;
	}
	id = bpf_map_lookup_elem(&peer_addr_map, key);
	if (id)
		return *id;
	return peer_alloc(s, key, overflow);
}

/* an existing peer of this address, or NODE_HOST; never allocates (drops) */
static __always_inline __u32 peer_find(const struct settings *s, struct peer_key *key)
{
	__u32 *id;

	if (s->auto_peers)
		id = bpf_map_lookup_elem(&peer_addr_map, key);
	else
		id = bpf_map_lookup_elem(&peer_cidr_map, key);
	return id ? *id : NODE_HOST;
}

/* the socket's node id. First the CPU's last address (a run of
 * one connection's segments costs two compares), then the socket's storage,
 * then the tables; every cache is valid for one generation of the table. */
static __always_inline __u32 sock_node(const struct settings *s, struct sock *sk, __u32 *overflow)
{
	/* one reading of the table's generation for the whole event: a cache
	 * stamped with it holds an id looked up in that generation or later */
	__u32 gen = *(volatile const __u32 *)&s->generation;
	struct last_peer *last;
	struct sock_peer *c;
	struct peer_key key;
	__u32 zero = 0, id;

	if (sk->__sk_common.skc_family == AF_INET) {
		key_from_ipv4(&key, sk->__sk_common.skc_daddr);
	} else {
		key.prefixlen = 128;
		__builtin_memcpy(key.addr, &sk->__sk_common.skc_v6_daddr, ADDR_LEN);
	}
	last = bpf_map_lookup_elem(&last_peer_cache, &zero);
	if (last && last->generation == gen &&
	    *(__u64 *)&last->addr[0] == *(__u64 *)&key.addr[0] &&
	    *(__u64 *)&last->addr[8] == *(__u64 *)&key.addr[8]) {
		*overflow = last->overflow;
		return last->node_id;
	}
	c = bpf_sk_storage_get(&sock_peer_cache, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (c && c->generation == gen) {
		id = c->node_id;
		*overflow = c->overflow;
	} else {
		id = peer_lookup(s, &key, overflow);
		if (c) {
			c->node_id = id;
			c->overflow = *overflow;
			c->generation = gen;
		}
	}
	if (last) {
		__builtin_memcpy(last->addr, key.addr, ADDR_LEN);
		last->node_id = id;
		last->overflow = *overflow;
		last->generation = gen;
	}
	return id;
}

#endif /* __NODES_BPF_H */
