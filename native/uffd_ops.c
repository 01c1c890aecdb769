/* uffd_ops: see uffd_ops.h. */
#define _GNU_SOURCE
#include "uffd_ops.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

int pc_uffd_open_syscall(int flags)
{
#ifdef SYS_userfaultfd
	long fd = syscall(SYS_userfaultfd, flags);
	return fd < 0 ? -errno : (int)fd;
#else
	(void)flags;
	return -ENOSYS;
#endif
}

int pc_uffd_open_dev(int flags)
{
	int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
	if (dev < 0)
		return -errno;
	int fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
	int err = errno;
	close(dev);
	return fd < 0 ? -err : fd;
}

int pc_uffd_open(int nonblock, int *how)
{
	int flags = O_CLOEXEC | (nonblock ? O_NONBLOCK : 0);
	/* Full (kernel + user fault) handling first: a guest's read(2) into missing
	 * memory faults in kernel mode.  The syscall allows that with CAP_SYS_PTRACE or
	 * vm.unprivileged_userfaultfd=1, /dev/userfaultfd to whoever may open it. */
	int fd = pc_uffd_open_syscall(flags);
	if (fd >= 0) {
		if (how)
			*how = PC_UFFD_VIA_SYSCALL;
		return fd;
	}
	int first = fd;
	fd = pc_uffd_open_dev(flags);
	if (fd >= 0) {
		if (how)
			*how = PC_UFFD_VIA_DEV;
		return fd;
	}
	if (first == -EPERM) {
		fd = pc_uffd_open_syscall(flags | UFFD_USER_MODE_ONLY);
		if (fd >= 0) {
			if (how)
				*how = PC_UFFD_VIA_SYSCALL_USER_ONLY;
			return fd;
		}
	}
	return first;
}

int pc_uffd_api(int fd, uint64_t features, uint64_t *features_out, uint64_t *ioctls_out)
{
	struct uffdio_api api = { .api = UFFD_API, .features = features };
	if (ioctl(fd, UFFDIO_API, &api) < 0)
		return -errno;
	if (features_out)
		*features_out = api.features;
	if (ioctls_out)
		*ioctls_out = api.ioctls;
	return 0;
}

int pc_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls_out)
{
	struct uffdio_register reg = { .range = { .start = start, .len = len }, .mode = mode };
	if (ioctl(fd, UFFDIO_REGISTER, &reg) < 0)
		return -errno;
	if (ioctls_out)
		*ioctls_out = reg.ioctls;
	return 0;
}

int pc_uffd_open_registered(int nonblock, uint64_t features, uint64_t start, uint64_t len, uint64_t mode)
{
	int fd = pc_uffd_open(nonblock, NULL);
	if (fd < 0)
		return fd;
	uint64_t got = 0;
	int rc = pc_uffd_api(fd, features, &got, NULL);
	if (!rc && (got & features) != features)
		rc = -EOPNOTSUPP;
	if (!rc)
		rc = pc_uffd_register(fd, start, len, mode, NULL);
	if (rc) {
		close(fd);
		return rc;
	}
	return fd;
}

int pc_uffd_unregister(int fd, uint64_t start, uint64_t len)
{
	struct uffdio_range range = { .start = start, .len = len };
	return ioctl(fd, UFFDIO_UNREGISTER, &range) < 0 ? -errno : 0;
}

int pc_uffd_wake(int fd, uint64_t start, uint64_t len)
{
	struct uffdio_range range = { .start = start, .len = len };
	return ioctl(fd, UFFDIO_WAKE, &range) < 0 ? -errno : 0;
}

int pc_uffd_writeprotect(int fd, uint64_t start, uint64_t len, uint64_t mode)
{
	struct pc_uffdio_writeprotect wp = { .range = { .start = start, .len = len }, .mode = mode };
	return ioctl(fd, UFFDIO_WRITEPROTECT, &wp) < 0 ? -errno : 0;
}

/*
 * Common tail of the filling ioctls.  The kernel writes the result field (bytes
 * done or -errno) once it got past argument checks; a partial success is rc -1,
 * errno EAGAIN, field > 0.  Earlier failures leave the field at our 0.
 */
static inline int64_t fill_result(int rc, int64_t field, int *err)
{
	int e = rc < 0 ? errno : 0;
	if (err)
		*err = e;
	if (rc == 0)
		return field;
	return field != 0 ? field : -(int64_t)e;
}

int64_t pc_uffd_copy(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, int *err)
{
	struct uffdio_copy c = { .dst = dst, .src = src, .len = len, .mode = mode, .copy = 0 };
	int rc = ioctl(fd, UFFDIO_COPY, &c);
	return fill_result(rc, c.copy, err);
}

int64_t pc_uffd_zeropage(int fd, uint64_t start, uint64_t len, uint64_t mode, int *err)
{
	struct uffdio_zeropage z = { .range = { .start = start, .len = len }, .mode = mode, .zeropage = 0 };
	int rc = ioctl(fd, UFFDIO_ZEROPAGE, &z);
	return fill_result(rc, z.zeropage, err);
}

int64_t pc_uffd_continue(int fd, uint64_t start, uint64_t len, uint64_t mode, int *err)
{
	struct pc_uffdio_continue c = { .range = { .start = start, .len = len }, .mode = mode, .mapped = 0 };
	int rc = ioctl(fd, UFFDIO_CONTINUE, &c);
	return fill_result(rc, c.mapped, err);
}

int64_t pc_uffd_move(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, int *err)
{
	struct pc_uffdio_move m = { .dst = dst, .src = src, .len = len, .mode = mode, .move = 0 };
	int rc = ioctl(fd, UFFDIO_MOVE, &m);
	return fill_result(rc, m.move, err);
}

int64_t pc_uffd_poison(int fd, uint64_t start, uint64_t len, uint64_t mode, int *err)
{
	struct pc_uffdio_poison p = { .range = { .start = start, .len = len }, .mode = mode, .updated = 0 };
	int rc = ioctl(fd, UFFDIO_POISON, &p);
	return fill_result(rc, p.updated, err);
}

int pc_uffd_read_events(int fd, struct pc_uffd_event *out, int max, int timeout_ms)
{
	struct uffd_msg msgs[PC_UFFD_MAX_EVENTS_PER_READ];

	if (max <= 0)
		return -EINVAL;
	if (max > PC_UFFD_MAX_EVENTS_PER_READ)
		max = PC_UFFD_MAX_EVENTS_PER_READ;

	if (timeout_ms != 0) {
		struct pollfd pfd = { .fd = fd, .events = POLLIN };
		int r = poll(&pfd, 1, timeout_ms < 0 ? -1 : timeout_ms);
		if (r < 0)
			return -errno;
		if (r == 0)
			return 0;
		if (!(pfd.revents & POLLIN)) {
			/* POLLERR: API not done, or a blocking descriptor (see header). */
			return (pfd.revents & POLLNVAL) ? -EBADF : -EINVAL;
		}
	}

	ssize_t n = read(fd, msgs, (size_t)max * sizeof(msgs[0]));
	if (n < 0)
		return errno == EAGAIN ? 0 : -errno;

	int count = (int)(n / (ssize_t)sizeof(msgs[0]));
	for (int i = 0; i < count; i++) {
		const struct uffd_msg *m = &msgs[i];
		struct pc_uffd_event *e = &out[i];
		memset(e, 0, sizeof(*e));
		e->kind = m->event;
		e->fd = -1;
		switch (m->event) {
		case UFFD_EVENT_PAGEFAULT:
			e->flags = m->arg.pagefault.flags;
			e->address = m->arg.pagefault.address;
			e->ptid = m->arg.pagefault.feat.ptid;
			break;
		case UFFD_EVENT_FORK:
			e->fd = (int64_t)m->arg.fork.ufd;
			break;
		case UFFD_EVENT_REMAP:
			e->address = m->arg.remap.from;
			e->end = m->arg.remap.to;
			e->len = m->arg.remap.len;
			break;
		case UFFD_EVENT_REMOVE:
		case UFFD_EVENT_UNMAP:
			e->address = m->arg.remove.start;
			e->end = m->arg.remove.end;
			break;
		default:
			break;
		}
	}
	return count;
}

uint64_t pc_mem_read_sum(uint64_t addr, uint64_t len, uint64_t stride)
{
	const volatile uint8_t *p = (const volatile uint8_t *)(uintptr_t)addr;
	uint64_t sum = 0;
	if (stride == 0)
		stride = 1;
	for (uint64_t off = 0; off < len; off += stride)
		sum += p[off];
	return sum;
}

void pc_mem_fill(uint64_t addr, uint64_t len, uint64_t stride, uint8_t value)
{
	if (stride <= 1) {
		memset((void *)(uintptr_t)addr, value, len);
		return;
	}
	volatile uint8_t *p = (volatile uint8_t *)(uintptr_t)addr;
	for (uint64_t off = 0; off < len; off += stride)
		p[off] = value;
}

void pc_mem_copy(uint64_t dst, uint64_t src, uint64_t len)
{
	memmove((void *)(uintptr_t)dst, (const void *)(uintptr_t)src, len);
}
