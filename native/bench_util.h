/*
 * bench_util: what the C baselines share: pinning the calling thread to one CPU and
 * back, a monotonic clock, and the calling thread's own CPU time.
 */
#ifndef PC_BENCH_UTIL_H
#define PC_BENCH_UTIL_H

#include <stdint.h>

/* A thread's saved CPU affinity (a cpu_set_t of 1024 CPUs, kept opaque so this
 * header needs no _GNU_SOURCE). */
struct pc_affinity {
	uint64_t mask[16];
	int saved;
};

/* Pin the calling thread to cpu, saving its affinity in saved; cpu < 0: do nothing.
 * Returns 0 or -errno (-EINVAL for a CPU this thread may not run on). */
int pc_pin_thread(int cpu, struct pc_affinity *saved);

/* Restore what pc_pin_thread saved (nothing if it saved nothing). */
void pc_unpin_thread(struct pc_affinity *saved);

/* A thread's saved scheduling policy. */
struct pc_sched {
	int policy;
	int priority;
	int saved;
};

/* Make the calling thread SCHED_FIFO at priority (the agents' demand and bulk threads
 * run so), saving its policy; priority <= 0: do nothing.  Returns 1 if it took
 * effect, 0 if not (not permitted: the agents go on unprioritized then too). */
int pc_sched_fifo(int priority, struct pc_sched *saved);

/* Restore what pc_sched_fifo saved (nothing if it saved nothing). */
void pc_sched_restore(struct pc_sched *saved);

uint64_t pc_now_ns(void);

/* User and system CPU nanoseconds the calling thread has used (RUSAGE_THREAD). */
void pc_thread_cpu_ns(uint64_t *user_ns, uint64_t *sys_ns);

#endif /* PC_BENCH_UTIL_H */
