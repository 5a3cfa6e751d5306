"""Build-time cffi builder for ``ebpf_telemetry._libbpf`` (API, out-of-line).

The shared structs come from ``bpf/telemetry.h`` itself (the part between the
SHARED markers), so the compiler checks that Python and the BPF object agree.
Callbacks are ``extern "Python"``: no ``ffi.callback`` trampolines, so the
agent runs under ``MemoryDenyWriteExecute=yes``. libbpf's log callback takes a
``va_list``, which Python cannot take: a C shim formats it first.
"""

from __future__ import annotations

import re
from pathlib import Path

from cffi import FFI

ROOT = Path(__file__).resolve().parents[2]
HEADER = ROOT / "bpf" / "telemetry.h"


def shared_cdef(header: Path = HEADER) -> str:
    text = header.read_text()
    m = re.search(r"/\* SHARED BEGIN \*/(.*)/\* SHARED END \*/", text, re.S)
    if not m:
        raise SystemExit(f"{header}: no SHARED BEGIN/END block")
    body = re.sub(r"/\*.*?\*/", "", m.group(1), flags=re.S)
    return body


LIBBPF_CDEF = """
typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef int __s32;
typedef unsigned long long __u64;
typedef long long __s64;

struct bpf_object;
struct bpf_program;
struct bpf_map;
struct bpf_link;
struct btf;
struct ring_buffer;

struct bpf_object_open_opts {
    size_t sz;
    const char *pin_root_path;
    ...;
};
struct bpf_map_batch_opts {
    size_t sz;
    __u64 elem_flags;
    __u64 flags;
};
struct bpf_test_run_opts {
    size_t sz;
    const void *ctx_in;
    void *ctx_out;
    __u32 ctx_size_in;
    __u32 ctx_size_out;
    __u32 retval;
    ...;
};
struct bpf_map_info {
    __u32 type;
    __u32 id;
    __u32 key_size;
    __u32 value_size;
    __u32 max_entries;
    __u32 map_flags;
    char name[16];
    __u32 btf_id;
    __u32 btf_key_type_id;
    __u32 btf_value_type_id;
    ...;
};
struct bpf_prog_info {
    __u32 type;
    __u32 id;
    unsigned char tag[8];
    char name[16];
    __u64 run_time_ns;
    __u64 run_cnt;
    __u64 recursion_misses;
    ...;
};
struct bpf_link_info {
    __u32 type;
    __u32 id;
    __u32 prog_id;
    ...;
};
struct btf_type {
    __u32 name_off;
    __u32 info;
    __u32 size;
};
struct btf_member {
    __u32 name_off;
    __u32 type;
    __u32 offset;
};
struct btf_param {
    __u32 name_off;
    __u32 type;
};
struct btf_enum {
    __u32 name_off;
    __s32 val;
};
struct btf_array {
    __u32 type;
    __u32 index_type;
    __u32 nelems;
};

#define BPF_ANY 0
#define BPF_NOEXIST 1
#define BPF_EXIST 2

struct bpf_object *bpf_object__open_file(const char *path,
                                         const struct bpf_object_open_opts *opts);
int bpf_object__load(struct bpf_object *obj);
void bpf_object__close(struct bpf_object *obj);
struct bpf_program *bpf_object__next_program(const struct bpf_object *obj,
                                             struct bpf_program *prog);
struct bpf_map *bpf_object__next_map(const struct bpf_object *obj, const struct bpf_map *map);
struct bpf_program *bpf_object__find_program_by_name(const struct bpf_object *obj,
                                                     const char *name);
struct bpf_map *bpf_object__find_map_by_name(const struct bpf_object *obj, const char *name);

const char *bpf_program__name(const struct bpf_program *prog);
int bpf_program__set_autoload(struct bpf_program *prog, bool autoload);
bool bpf_program__autoload(const struct bpf_program *prog);
int bpf_program__fd(const struct bpf_program *prog);
struct bpf_link *bpf_program__attach(const struct bpf_program *prog);

int bpf_link__pin(struct bpf_link *link, const char *path);
int bpf_link__destroy(struct bpf_link *link);

const char *bpf_map__name(const struct bpf_map *map);
int bpf_map__fd(const struct bpf_map *map);
int bpf_map__set_max_entries(struct bpf_map *map, __u32 max_entries);
const char *bpf_map__pin_path(const struct bpf_map *map);
int bpf_map__set_pin_path(struct bpf_map *map, const char *path);
bool bpf_map__is_pinned(const struct bpf_map *map);

int bpf_obj_get(const char *pathname);
int bpf_prog_get_fd_by_id(__u32 id);
int bpf_obj_get_info_by_fd(int bpf_fd, void *info, __u32 *info_len);
int bpf_map_lookup_elem(int fd, const void *key, void *value);
int bpf_map_update_elem(int fd, const void *key, const void *value, __u64 flags);
int bpf_map_delete_elem(int fd, const void *key);
int bpf_map_lookup_and_delete_elem(int fd, const void *key, void *value);
int bpf_map_get_next_key(int fd, const void *key, void *next_key);
int bpf_map_lookup_batch(int fd, void *in_batch, void *out_batch, void *keys,
                         void *values, __u32 *count, const struct bpf_map_batch_opts *opts);
int bpf_prog_test_run_opts(int prog_fd, struct bpf_test_run_opts *opts);
int libbpf_num_possible_cpus(void);
int libbpf_strerror(int err, char *buf, size_t size);

struct btf *btf__load_vmlinux_btf(void);
struct btf *btf__load_from_kernel_by_id(__u32 id);
struct btf *btf__parse_split(const char *path, struct btf *base_btf);
void btf__free(struct btf *btf);
__u32 btf__type_cnt(const struct btf *btf);
const struct btf_type *btf__type_by_id(const struct btf *btf, __u32 id);
const char *btf__name_by_offset(const struct btf *btf, __u32 offset);
__s32 btf__find_by_name_kind(const struct btf *btf, const char *type_name, __u32 kind);

typedef int (*ring_buffer_sample_fn)(void *ctx, void *data, size_t size);
struct ring_buffer *ring_buffer__new(int map_fd, ring_buffer_sample_fn sample_cb, void *ctx,
                                     const void *opts);
int ring_buffer__poll(struct ring_buffer *rb, int timeout_ms);
int ring_buffer__consume(struct ring_buffer *rb);
void ring_buffer__free(struct ring_buffer *rb);

extern "Python" void ebt_log_cb(int level, const char *msg);
extern "Python" int ebt_ringbuf_cb(void *ctx, void *data, size_t size);
void ebt_install_log(void);
int mount(const char *source, const char *target, const char *fstype, unsigned long flags,
          const void *data);
int ebt_fs_type(const char *path, unsigned long long *type);
ring_buffer_sample_fn ebt_ringbuf_sample;
int ebt_lookup_rows(int fd, const __u32 *keys, unsigned int n, void *out, unsigned int size);
void ebt_advance_rows(const __u64 *rows, const __s64 *ids, unsigned int n, const __s64 *start,
                      __u32 *words, __u32 *out, __u8 *fits);
#define EBT_LOW_WIDTH ...
"""

C_SOURCE = """
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdbool.h>
#include <errno.h>
#include <sys/mount.h>
#include <sys/vfs.h>
#include <linux/types.h>
#include <linux/bpf.h>
#include <linux/btf.h>
#include <bpf/libbpf.h>
#include <bpf/bpf.h>
#include <bpf/btf.h>
#include "telemetry.h"

static void ebt_log_cb(int level, const char *msg);
static int ebt_ringbuf_cb(void *ctx, void *data, size_t size);

/* libbpf hands its log a va_list: format it here, pass Python a string.
 * A verifier log can be megabytes: never cut it (the rejected instruction
 * is at its end). */
static int ebt_print(enum libbpf_print_level level, const char *fmt, va_list ap)
{
    char buf[4096], *text = buf;
    va_list again;
    int n;

    va_copy(again, ap);
    n = vsnprintf(buf, sizeof(buf), fmt, ap);
    if (n >= (int)sizeof(buf)) {
        text = malloc((size_t)n + 1);
        if (text)
            vsnprintf(text, (size_t)n + 1, fmt, again);
        else
            text = buf;
    }
    va_end(again);
    ebt_log_cb((int)level, text);
    if (text != buf)
        free(text);
    return 0;
}

static void ebt_install_log(void)
{
    libbpf_set_print(ebt_print);
}

static ring_buffer_sample_fn ebt_ringbuf_sample = ebt_ringbuf_cb;

/* statfs(2)'s f_type (the filesystem's magic number) of path; 0 or -errno */
static int ebt_fs_type(const char *path, unsigned long long *type)
{
    struct statfs s;

    if (statfs(path, &s) != 0)
        return -errno;
    *type = (unsigned long long)(unsigned int)s.f_type;
    return 0;
}

/* The values of n keys of a (non-per-CPU) map, one after the other into out
 * (n x size bytes): the look-ups of the rows that moved, without a Python
 * call per row. 0, or -errno of the first that failed. */
static int ebt_lookup_rows(int fd, const __u32 *keys, unsigned int n, void *out,
                           unsigned int size)
{
    unsigned int i;

    for (i = 0; i < n; i++)
        if (bpf_map_lookup_elem(fd, &keys[i], (char *)out + (size_t)i * size) != 0)
            return -errno;
    return 0;
}

/* lowwords.py's LowWords.advance, one pass per row. rows: n rows of
 * MAX_SLOTS counts as read now, of the node ids `ids` (no repeats);
 * start[id] the first of the EBT_LOW_WIDTH slots whose low words are kept in
 * words[id] (-1: the row is kept whole, by the caller). For a row whose
 * nonzero low words all lie within its kept slots: out = its low words less
 * the kept ones (modulo 2^32: what was added since), the kept ones advanced
 * to now, and fits[j] = 1. Else out = its low words as they are and
 * fits[j] = 0: the caller subtracts the whole row it kept and keeps the row
 * anew. Loops of constant length over restrict pointers: vectorized at -O2. */
#define EBT_LOW_WIDTH 64

static void ebt_advance_rows(const __u64 *restrict rows, const __s64 *ids, unsigned int n,
                             const __s64 *start, __u32 *restrict words,
                             __u32 *restrict out, __u8 *fits)
{
    unsigned int j, s, lo;

    for (j = 0; j < n; j++) {
        const __u64 *restrict row = rows + (size_t)j * MAX_SLOTS;
        __u32 *restrict o = out + (size_t)j * MAX_SLOTS;
        __u32 *restrict kept = words + (size_t)ids[j] * EBT_LOW_WIDTH;
        __s64 first = start[ids[j]];
        __u32 stray = 0; /* the low words outside the kept slots, or'ed */

        for (s = 0; s < MAX_SLOTS; s++)
            o[s] = (__u32)row[s];
        if (first < 0 || first > MAX_SLOTS - EBT_LOW_WIDTH) {
            fits[j] = 0;
            continue;
        }
        lo = (unsigned int)first;
        for (s = 0; s < MAX_SLOTS; s++)
            stray |= o[s] & (0u - (s - lo >= EBT_LOW_WIDTH)); /* s < lo wraps: outside */
        fits[j] = stray == 0;
        if (stray)
            continue;
        for (s = 0; s < EBT_LOW_WIDTH; s++) {
            __u32 now = o[first + s];

            o[first + s] = now - kept[s];
            kept[s] = now;
        }
    }
}
"""

ffibuilder = FFI()
ffibuilder.cdef(LIBBPF_CDEF + shared_cdef())
ffibuilder.set_source(
    "ebpf_telemetry._libbpf",
    C_SOURCE,
    libraries=["bpf"],
    include_dirs=[str(HEADER.parent)],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
