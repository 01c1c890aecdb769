/*
 * uffd_bench: the C baseline for the fault round trip.  One process, no Python:
 * npages anonymous pages registered in missing mode, a C thread serving every fault
 * with UFFDIO_COPY, the main thread reading each page once and timing it.  What the
 * Python fault server adds on top of this is its own overhead.
 */
#ifndef PC_UFFD_BENCH_H
#define PC_UFFD_BENCH_H

#include <stddef.h>
#include <stdint.h>

/*
 * Fills lat_ns[0..npages) with the nanoseconds each first touch took (fault, event
 * read, UFFDIO_COPY, wake).  Returns 0, or -errno (-EIO if a page came in with the
 * wrong content).
 */
int pc_bench_uffd_roundtrip(size_t npages, uint64_t *lat_ns);

/* Same, with flags: PC_BENCH_SPIN makes the server busy-poll (costs a CPU) instead of
 * sleeping in poll(2), which shows what waking an idle CPU adds to each fault. */
#define PC_BENCH_SPIN 1
int pc_bench_uffd_roundtrip_ex(size_t npages, uint64_t *lat_ns, int flags);

/* Same, placed: the faulting (calling) thread pinned to fault_cpu for the run, the
 * server thread to handler_cpu (-1: unpinned).  Same CPU shows the cost of the two
 * context switches; across CPUs adds waking the other CPU (an IPI, and its way out of
 * idle unless the server spins).  -EINVAL for a CPU the caller may not use.
 * rt_priority > 0: both threads run SCHED_FIFO at it for the run, as the agents'
 * demand path does (best effort: unprivileged, they run as they are). */
int pc_bench_uffd_roundtrip_at(size_t npages, uint64_t *lat_ns, int flags, int fault_cpu, int handler_cpu,
			       int rt_priority);

#endif /* PC_UFFD_BENCH_H */
