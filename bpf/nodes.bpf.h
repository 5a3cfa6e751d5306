/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Which node a remote address belongs to. Configured peers: longest-prefix
 * match in peer_cidr_map, unmatched addresses go to the `other` node.
 * Automatic peers (no peers configured): one node per distinct address (or
 * subnet: auto_peer_prefix_v4/_v6), handed out by the kernel itself from a
 * pool of free ids that userspace refills with the ids of peers idle for
 * peer_idle_seconds; with the pool empty, new addresses count under `other`
 * and in STAT_PEERS_OVERFLOW.
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

/* automatic peers: an address folded into its subnet (auto_peer_prefix_v4/_v6):
 * four ANDs with a mask userspace computed, no branch per bit (the 6.1
 * verifier gives up on a loop over the prefix length) */
static __always_inline void fold(const struct settings *s, struct peer_key *key)
{
	__u32 *w = (__u32 *)key->addr;
	const __u32 *m = (w[0] | w[1]) == 0 && w[2] == bpf_htonl(0xffff) ?
				 (const __u32 *)s->auto_mask_v4 : (const __u32 *)s->auto_mask_v6;

	w[0] &= m[0];
	w[1] &= m[1];
	w[2] &= m[2];
	w[3] &= m[3];
}

/* a new address takes an id from the free pool; none left: `other`.
 * The address is claimed first (BPF_NOEXIST): of two CPUs adding one address
 * at once, the loser has written nothing when it gives its id back, so an id
 * is never both in the pool and described in peer_info_map (peertable.py
 * checks that invariant every cycle, with the others). The winner describes
 * its id right after; until then the id has no label, which userspace takes
 * as an allocation in progress. */
static __noinline __u32 peer_alloc(const struct settings *s, struct peer_key *key, __u32 *overflow)
{
	struct peer_info info = {};
	__u32 nid, *id;

	if (bpf_map_pop_elem(&peer_free_map, &nid) || nid == 0 || nid > s->max_peers)
		goto full;
	if (bpf_map_update_elem(&peer_addr_map, key, &nid, BPF_NOEXIST) == 0) {
		__builtin_memcpy(info.addr, key->addr, ADDR_LEN);
		info.flags = PEER_AUTO;
		bpf_map_update_elem(&peer_info_map, &nid, &info, BPF_ANY);
		return nid;
	}
	/* another CPU added this address first: use its id, give ours back */
	stat_inc(STAT_PEER_RACE);
	bpf_map_push_elem(&peer_free_map, &nid, 0);
	id = bpf_map_lookup_elem(&peer_addr_map, key);
	if (id)
		return *id;
full:
	*overflow = 1;
	return s->other_node;
}

/* the node of a remote address; allocate: whether a new address may take an id */
static __always_inline __u32 classify(const struct settings *s, struct peer_key *key,
				      __u32 *overflow, bool allocate)
{
	__u32 *id;

	*overflow = 0;
	if (!s->auto_peers) {
		id = bpf_map_lookup_elem(&peer_cidr_map, key);
		return id ? *id : s->other_node;
	}
	fold(s, key);
	id = bpf_map_lookup_elem(&peer_addr_map, key);
	if (id)
		return *id;
	return allocate ? peer_alloc(s, key, overflow) : s->other_node;
}

static __always_inline __u32 peer_lookup(const struct settings *s, struct peer_key *key, __u32 *overflow)
{
	return classify(s, key, overflow, true);
}

/* an existing peer of this address, or NODE_HOST; never allocates (drops) */
static __always_inline __u32 peer_find(const struct settings *s, struct peer_key *key)
{
	__u32 overflow, id = classify(s, key, &overflow, false);

	return id == s->other_node ? NODE_HOST : id;
}

/* the socket's node id. First the CPU's last address (a run of
 * one connection's segments costs two compares), then the socket's storage
 * (sk_cache: tracing programs may use it since 5.11), then the tables; every
 * cache is valid for one generation of the table. */
static __always_inline __u32 sock_node_cached(const struct settings *s, struct sock *sk,
					      __u32 *overflow, const bool sk_cache)
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
	if (!KEEP(ABLATE_PEER_CACHE)) {
		struct peer_key folded = key;

		return peer_lookup(s, &folded, overflow);
	}
	last = bpf_map_lookup_elem(&last_peer_cache, &zero);
	if (last && last->generation == gen &&
	    *(__u64 *)&last->addr[0] == *(__u64 *)&key.addr[0] &&
	    *(__u64 *)&last->addr[8] == *(__u64 *)&key.addr[8]) {
		*overflow = last->overflow;
		return last->node_id;
	}
	c = sk_cache ? bpf_sk_storage_get(&sock_peer_cache, sk, 0, BPF_SK_STORAGE_GET_F_CREATE) :
		       NULL;
	if (c && c->generation == gen) {
		id = c->node_id;
		*overflow = c->overflow;
	} else {
		struct peer_key folded = key;  /* the caches keep the address as is */

		id = peer_lookup(s, &folded, overflow);
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

static __always_inline __u32 sock_node(const struct settings *s, struct sock *sk, __u32 *overflow)
{
	return sock_node_cached(s, sk, overflow, true);
}

#endif /* __NODES_BPF_H */
