/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Benchmark only (`make bench` part 1c, bench/ablation.py): variants of the
 * object built with -DEBT_ABLATE=<bits>, each with one part of the hot path
 * removed, measured with bpf_stats beside the shipped build and the empty
 * program on the same events. The shipped object has EBT_ABLATE 0: every
 * KEEP() is a compile-time 1 and the code is what it would be without it.
 * An ablated variant counts wrongly on purpose; it is never shipped.
 */
#ifndef __ABLATE_BPF_H
#define __ABLATE_BPF_H

#ifndef EBT_ABLATE
#define EBT_ABLATE 0
#endif

#define ABLATE_SETTINGS   (1 << 0) /* settings from a global in .data, no map look-up */
#define ABLATE_SOCK_CAST  (1 << 1) /* tcp_probe_cast: the helper, not bpf_rdonly_cast (6.2 kfunc) */
#define ABLATE_PEER_CACHE (1 << 2) /* classify every event in the tables, no caches */
#define ABLATE_PEER       (1 << 3) /* no peer classification at all (node 0 only) */
#define ABLATE_SLOT       (1 << 4) /* slot 0, no log2 */
#define ABLATE_HOST_HIST  (1 << 5) /* no host histogram add */
#define ABLATE_PEER_ROW   (1 << 6) /* no per-peer histogram row (its atomic) */
#define ABLATE_METRICS    (1 << 7) /* no node_metrics adds (host and peer) */
#define ABLATE_EVENT      (1 << 8) /* no sampling counter / lease check */
#define ABLATE_ACK_CHECK  (1 << 9) /* tcp_probe: no "acknowledges new data" test */

#define KEEP(part) (!(EBT_ABLATE & (part)))

#endif /* __ABLATE_BPF_H */
