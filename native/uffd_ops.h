/*
 * uffd_ops: thin userfaultfd(2) layer for postcopy.
 *
 * Every function maps to one syscall or ioctl; policy (which features to ask for,
 * what an error means, retries) lives in postcopy/uffd.py.  Functions return 0 or a
 * non-negative result on success and -errno on failure, so they are safe to call from
 * several threads (no shared errno handling in Python).
 *
 * The system headers on the build host may predate the running kernel: every uapi
 * constant or struct newer than Linux 5.x is defined here under #ifndef guards, with
 * pc_-prefixed struct names so that a newer <linux/userfaultfd.h> never collides.
 */
#ifndef PC_UFFD_OPS_H
#define PC_UFFD_OPS_H

#include <stddef.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <linux/types.h>
#include <linux/userfaultfd.h>

/* ---- uapi constants missing from older headers ---- */
#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif
#ifndef USERFAULTFD_IOC
#define USERFAULTFD_IOC 0xAA
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(USERFAULTFD_IOC, 0x00)
#endif

#ifndef UFFD_EVENT_REMOVE
#define UFFD_EVENT_REMOVE 0x15
#endif
#ifndef UFFD_EVENT_UNMAP
#define UFFD_EVENT_UNMAP 0x16
#endif
#ifndef UFFD_PAGEFAULT_FLAG_MINOR
#define UFFD_PAGEFAULT_FLAG_MINOR (1 << 2)
#endif

#ifndef UFFD_FEATURE_THREAD_ID
#define UFFD_FEATURE_THREAD_ID (1 << 8)
#endif
#ifndef UFFD_FEATURE_MINOR_HUGETLBFS
#define UFFD_FEATURE_MINOR_HUGETLBFS (1 << 9)
#endif
#ifndef UFFD_FEATURE_MINOR_SHMEM
#define UFFD_FEATURE_MINOR_SHMEM (1 << 10)
#endif
#ifndef UFFD_FEATURE_EXACT_ADDRESS
#define UFFD_FEATURE_EXACT_ADDRESS (1 << 11)
#endif
#ifndef UFFD_FEATURE_WP_HUGETLBFS_SHMEM
#define UFFD_FEATURE_WP_HUGETLBFS_SHMEM (1 << 12)
#endif
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_POISON
#define UFFD_FEATURE_POISON (1 << 14)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif
#ifndef UFFD_FEATURE_MOVE
#define UFFD_FEATURE_MOVE (1 << 16)
#endif

#ifndef UFFDIO_REGISTER_MODE_MINOR
#define UFFDIO_REGISTER_MODE_MINOR ((__u64)1 << 2)
#endif
#ifndef UFFDIO_COPY_MODE_WP
#define UFFDIO_COPY_MODE_WP ((__u64)1 << 1)
#endif
#ifndef UFFDIO_CONTINUE_MODE_DONTWAKE
#define UFFDIO_CONTINUE_MODE_DONTWAKE ((__u64)1 << 0)
#endif
#ifndef UFFDIO_CONTINUE_MODE_WP
#define UFFDIO_CONTINUE_MODE_WP ((__u64)1 << 1)
#endif
#ifndef UFFDIO_WRITEPROTECT_MODE_WP
#define UFFDIO_WRITEPROTECT_MODE_WP ((__u64)1 << 0)
#endif
#ifndef UFFDIO_WRITEPROTECT_MODE_DONTWAKE
#define UFFDIO_WRITEPROTECT_MODE_DONTWAKE ((__u64)1 << 1)
#endif
#ifndef UFFDIO_MOVE_MODE_DONTWAKE
#define UFFDIO_MOVE_MODE_DONTWAKE ((__u64)1 << 0)
#endif
#ifndef UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES
#define UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES ((__u64)1 << 1)
#endif
#ifndef UFFDIO_POISON_MODE_DONTWAKE
#define UFFDIO_POISON_MODE_DONTWAKE ((__u64)1 << 0)
#endif

/* Layout-identical copies of the newer ioctl argument structs (the ioctl number
 * encodes only the size, so these produce the kernel's numbers). */
struct pc_uffdio_range {
	uint64_t start;
	uint64_t len;
};

struct pc_uffdio_writeprotect {
	struct pc_uffdio_range range;
	uint64_t mode;
};

struct pc_uffdio_continue {
	struct pc_uffdio_range range;
	uint64_t mode;
	int64_t mapped;
};

struct pc_uffdio_move {
	uint64_t dst;
	uint64_t src;
	uint64_t len;
	uint64_t mode;
	int64_t move;
};

struct pc_uffdio_poison {
	struct pc_uffdio_range range;
	uint64_t mode;
	int64_t updated;
};

#ifndef _UFFDIO_WRITEPROTECT
#define _UFFDIO_WRITEPROTECT (0x06)
#endif
#ifndef _UFFDIO_CONTINUE
#define _UFFDIO_CONTINUE (0x07)
#endif
#ifndef _UFFDIO_MOVE
#define _UFFDIO_MOVE (0x05)
#endif
#ifndef _UFFDIO_POISON
#define _UFFDIO_POISON (0x08)
#endif
#ifndef UFFDIO_WRITEPROTECT
#define UFFDIO_WRITEPROTECT _IOWR(UFFDIO, _UFFDIO_WRITEPROTECT, struct pc_uffdio_writeprotect)
#endif
#ifndef UFFDIO_CONTINUE
#define UFFDIO_CONTINUE _IOWR(UFFDIO, _UFFDIO_CONTINUE, struct pc_uffdio_continue)
#endif
#ifndef UFFDIO_MOVE
#define UFFDIO_MOVE _IOWR(UFFDIO, _UFFDIO_MOVE, struct pc_uffdio_move)
#endif
#ifndef UFFDIO_POISON
#define UFFDIO_POISON _IOWR(UFFDIO, _UFFDIO_POISON, struct pc_uffdio_poison)
#endif

/* ---- flattened fault event (one per struct uffd_msg) ---- */
struct pc_uffd_event {
	uint32_t kind;    /* UFFD_EVENT_* (0x12 pagefault .. 0x16 unmap) */
	uint32_t ptid;    /* pagefault: faulting thread id (UFFD_FEATURE_THREAD_ID) */
	uint64_t flags;   /* pagefault: UFFD_PAGEFAULT_FLAG_* */
	uint64_t address; /* pagefault: address; remove/unmap: start; remap: from */
	uint64_t end;     /* remove/unmap: end; remap: to */
	uint64_t len;     /* remap: length */
	int64_t fd;       /* fork: the child's new userfaultfd; otherwise -1 */
};

/* How pc_uffd_open() got its descriptor. */
#define PC_UFFD_VIA_SYSCALL 1
#define PC_UFFD_VIA_DEV 2
#define PC_UFFD_VIA_SYSCALL_USER_ONLY 3

/* Maximum number of events one pc_uffd_read_events() call returns. */
#define PC_UFFD_MAX_EVENTS_PER_READ 256

/* Open: flags are O_CLOEXEC|O_NONBLOCK|UFFD_USER_MODE_ONLY as for userfaultfd(2). */
int pc_uffd_open_syscall(int flags);
int pc_uffd_open_dev(int flags);
/* syscall, then /dev/userfaultfd, then syscall with UFFD_USER_MODE_ONLY; *how says which. */
int pc_uffd_open(int nonblock, int *how);

int pc_uffd_api(int fd, uint64_t features, uint64_t *features_out, uint64_t *ioctls_out);
int pc_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls_out);
/* A userfaultfd (opened as pc_uffd_open) with every one of `features` granted (else
 * -EOPNOTSUPP), registered over [start, start + len) in `mode`: its descriptor, or -errno. */
int pc_uffd_open_registered(int nonblock, uint64_t features, uint64_t start, uint64_t len, uint64_t mode);
int pc_uffd_unregister(int fd, uint64_t start, uint64_t len);
int pc_uffd_wake(int fd, uint64_t start, uint64_t len);
int pc_uffd_writeprotect(int fd, uint64_t start, uint64_t len, uint64_t mode);

/*
 * The filling ioctls return the kernel's result field: bytes done (> 0, possibly less
 * than len: a partial operation, errno EAGAIN) or -errno (e.g. -EEXIST when the first
 * page is already mapped).  If the kernel failed before writing the field, -errno of
 * the ioctl.  *err (may be NULL) receives the ioctl's errno, 0 on full success.
 */
int64_t pc_uffd_copy(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, int *err);
int64_t pc_uffd_zeropage(int fd, uint64_t start, uint64_t len, uint64_t mode, int *err);
int64_t pc_uffd_continue(int fd, uint64_t start, uint64_t len, uint64_t mode, int *err);
int64_t pc_uffd_move(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, int *err);
int64_t pc_uffd_poison(int fd, uint64_t start, uint64_t len, uint64_t mode, int *err);

/*
 * Read up to max events (at most PC_UFFD_MAX_EVENTS_PER_READ) in one read(2).
 * timeout_ms > 0: poll that long first; < 0: poll without limit; 0: read at once (on a
 * blocking descriptor this blocks; the kernel rejects poll on those with POLLERR).
 * Returns the number of events (0 on timeout or EAGAIN) or -errno (-EINTR included,
 * so the caller can run signal handlers and retry).
 */
int pc_uffd_read_events(int fd, struct pc_uffd_event *out, int max, int timeout_ms);

/*
 * Memory helpers that run with the GIL released: a Python thread must never touch
 * uffd-registered memory itself while a Python handler thread needs the GIL.
 */
uint64_t pc_mem_read_sum(uint64_t addr, uint64_t len, uint64_t stride);
void pc_mem_fill(uint64_t addr, uint64_t len, uint64_t stride, uint8_t value);
void pc_mem_copy(uint64_t dst, uint64_t src, uint64_t len);

#endif /* PC_UFFD_OPS_H */
