// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* Test-only object: runs value_to_slot() in the kernel on values from userspace
 * (bpf_prog_test_run), so tests can compare it with the Python scheme. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "bits.bpf.h"

#define SLOT_TEST_N 64

struct slot_args {
	__u64 values[SLOT_TEST_N];
	__u32 slots[SLOT_TEST_N];
};

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("syscall")
int slot_of(struct slot_args *args)
{
	for (int i = 0; i < SLOT_TEST_N; i++)
		args->slots[i] = value_to_slot(args->values[i]);
	return 0;
}
