/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * The histogram bucket scheme "log2x8", shared with
 * python/ebpf_telemetry/histogram.py (tests check both give the same slots):
 *   slot(v) = v                                for v < 8
 *   slot(v) = 8*e - 24 + (v >> (e - 3))        e = floor(log2 v), v >= 8
 * Each power of two [2^e, 2^(e+1)) is cut into 8 equal sub-buckets, so a
 * bucket is at most 12.5% of its lower bound wide. Values are microseconds;
 * slot 239 ends at 2^32 us (71 min); anything larger lands in the last slot.
 */
#ifndef __BITS_BPF_H
#define __BITS_BPF_H

#include "telemetry.h"

static __always_inline __u32 log2_u32(__u32 v)
{
	__u32 r, shift;

	r = (v > 0xFFFF) << 4; v >>= r;
	shift = (v > 0xFF) << 3; v >>= shift; r |= shift;
	shift = (v > 0xF) << 2; v >>= shift; r |= shift;
	shift = (v > 0x3) << 1; v >>= shift; r |= shift;
	r |= (v >> 1);
	return r;
}

static __always_inline __u32 log2_u64(__u64 v)
{
	__u32 hi = v >> 32;

	return hi ? log2_u32(hi) + 32 : log2_u32(v);
}

static __always_inline __u32 value_to_slot(__u64 v)
{
	__u32 e, slot;

	if (v < (1 << SUB_BUCKET_BITS))
		return v;
	e = log2_u64(v);
	slot = ((e - SUB_BUCKET_BITS) << SUB_BUCKET_BITS) + (__u32)(v >> (e - SUB_BUCKET_BITS));
	return slot < MAX_SLOTS ? slot : MAX_SLOTS - 1;
}

#endif /* __BITS_BPF_H */
