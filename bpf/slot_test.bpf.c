// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* Test-only object: runs value_to_slot() in the kernel on values from userspace
 * (bpf_prog_test_run), so tests can compare it with the Python scheme. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "bits.bpf.h"

struct slot_args {
	__u64 value;
	__u32 slot;
};

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("syscall")
int slot_of(struct slot_args *args)
{
	args->slot = value_to_slot(args->value);
	return 0;
}
