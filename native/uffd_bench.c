/* uffd_bench: see uffd_bench.h. */
#define _GNU_SOURCE
#include "uffd_bench.h"
#include "uffd_ops.h"
#include "bench_util.h"

#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

struct server {
	int uffd;
	int stop_fd; /* eventfd: the main thread is done */
	uint64_t page_size;
	uint64_t src;  /* one page of content to copy */
	int spin;      /* busy-poll the uffd instead of sleeping in poll(2) */
	volatile int stop; /* spin mode: the main thread is done */
	int error;     /* first -errno seen by the server */
};

static void *serve(void *arg)
{
	struct server *s = arg;
	struct pc_uffd_event ev[16];
	for (;;) {
		if (s->spin) {
			/* Nonblocking read in a loop: no wakeup of an idle CPU per fault. */
			if (__atomic_load_n(&s->stop, __ATOMIC_ACQUIRE))
				return NULL;
			goto read;
		}
		struct pollfd pfd[2] = {
			{ .fd = s->uffd, .events = POLLIN },
			{ .fd = s->stop_fd, .events = POLLIN },
		};
		if (poll(pfd, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			s->error = -errno;
			return NULL;
		}
		if (pfd[1].revents & POLLIN)
			return NULL;
read:;
		int n = pc_uffd_read_events(s->uffd, ev, 16, 0);
		if (n < 0) {
			s->error = n;
			return NULL;
		}
		for (int i = 0; i < n; i++) {
			if (ev[i].kind != UFFD_EVENT_PAGEFAULT)
				continue;
			uint64_t page = ev[i].address & ~(s->page_size - 1);
			int64_t r = pc_uffd_copy(s->uffd, page, s->src, s->page_size, 0, NULL);
			if (r == -EEXIST) /* installed already: just release the waiter */
				r = pc_uffd_wake(s->uffd, page, s->page_size);
			if (r < 0 && !s->error)
				s->error = (int)r;
		}
	}
}

/* Start the server thread, placed on cpu from its first instruction (cpu < 0: free),
 * so that a CPU it may not use fails here rather than leave the faults unserved. */
static int start_server(pthread_t *thread, struct server *s, int cpu)
{
	pthread_attr_t attr;
	int r = pthread_attr_init(&attr);
	if (r)
		return -r;
	if (cpu >= 0) {
		cpu_set_t one;
		CPU_ZERO(&one);
		if (cpu >= CPU_SETSIZE) {
			pthread_attr_destroy(&attr);
			return -EINVAL;
		}
		CPU_SET(cpu, &one);
		r = pthread_attr_setaffinity_np(&attr, sizeof(one), &one);
	}
	if (!r)
		r = pthread_create(thread, &attr, serve, s);
	pthread_attr_destroy(&attr);
	return -r;
}

int pc_bench_uffd_roundtrip(size_t npages, uint64_t *lat_ns)
{
	return pc_bench_uffd_roundtrip_ex(npages, lat_ns, 0);
}

int pc_bench_uffd_roundtrip_ex(size_t npages, uint64_t *lat_ns, int flags)
{
	return pc_bench_uffd_roundtrip_at(npages, lat_ns, flags, -1, -1, 0);
}

int pc_bench_uffd_roundtrip_at(size_t npages, uint64_t *lat_ns, int flags, int fault_cpu, int handler_cpu,
			       int rt_priority)
{
	struct server s = { .uffd = -1, .stop_fd = -1, .spin = !!(flags & PC_BENCH_SPIN) };
	uint8_t *dst = MAP_FAILED, *src = MAP_FAILED;
	struct pc_affinity saved = { .saved = 0 };
	struct pc_sched sched = { .saved = 0 };
	pthread_t thread;
	int started = 0, ret = 0;

	if (npages == 0)
		return -EINVAL;
	if ((ret = pc_pin_thread(fault_cpu, &saved)) < 0)
		return ret;
	pc_sched_fifo(rt_priority, &sched); /* the server thread inherits it */
	s.page_size = (uint64_t)sysconf(_SC_PAGESIZE);
	size_t len = npages * s.page_size;

	src = mmap(NULL, s.page_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	dst = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (src == MAP_FAILED || dst == MAP_FAILED) {
		ret = -errno;
		goto out;
	}
	/* One fault per 4 KiB page, as the migrated guest sees them. */
	madvise(dst, len, MADV_NOHUGEPAGE);
	memset(src, 0xA5, s.page_size);
	s.src = (uint64_t)(uintptr_t)src;

	s.uffd = pc_uffd_open_registered(1, 0, (uint64_t)(uintptr_t)dst, len, UFFDIO_REGISTER_MODE_MISSING);
	if (s.uffd < 0) {
		ret = s.uffd;
		goto out;
	}
	s.stop_fd = eventfd(0, EFD_CLOEXEC);
	if (s.stop_fd < 0) {
		ret = -errno;
		goto out;
	}
	if ((ret = start_server(&thread, &s, handler_cpu)) < 0)
		goto out;
	started = 1;

	for (size_t i = 0; i < npages; i++) {
		const volatile uint8_t *p = dst + i * s.page_size;
		uint64_t t0 = pc_now_ns();
		uint8_t v = *p; /* read fault on a missing page */
		lat_ns[i] = pc_now_ns() - t0;
		if (v != 0xA5 && !ret)
			ret = -EIO;
	}

out:
	if (started) {
		uint64_t one = 1;
		__atomic_store_n(&s.stop, 1, __ATOMIC_RELEASE);
		if (write(s.stop_fd, &one, sizeof(one)) < 0 && !ret)
			ret = -errno;
		pthread_join(thread, NULL);
		if (s.error && !ret)
			ret = s.error;
	}
	if (s.stop_fd >= 0)
		close(s.stop_fd);
	if (s.uffd >= 0)
		close(s.uffd);
	if (dst != MAP_FAILED)
		munmap(dst, len);
	if (src != MAP_FAILED)
		munmap(src, s.page_size);
	pc_sched_restore(&sched);
	pc_unpin_thread(&saved);
	return ret;
}
