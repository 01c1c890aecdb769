/* bench_util: see bench_util.h. */
#define _GNU_SOURCE
#include "bench_util.h"

#include <errno.h>
#include <sched.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

_Static_assert(sizeof(((struct pc_affinity *)0)->mask) >= sizeof(cpu_set_t),
	       "pc_affinity must hold a cpu_set_t");

int pc_pin_thread(int cpu, struct pc_affinity *saved)
{
	saved->saved = 0;
	if (cpu < 0)
		return 0;
	if (cpu >= CPU_SETSIZE)
		return -EINVAL;
	if (sched_getaffinity(0, sizeof(cpu_set_t), (cpu_set_t *)saved->mask) < 0)
		return -errno;
	cpu_set_t one;
	CPU_ZERO(&one);
	CPU_SET(cpu, &one);
	if (sched_setaffinity(0, sizeof(one), &one) < 0)
		return -errno;
	saved->saved = 1;
	return 0;
}

void pc_unpin_thread(struct pc_affinity *saved)
{
	if (saved->saved)
		sched_setaffinity(0, sizeof(cpu_set_t), (cpu_set_t *)saved->mask);
	saved->saved = 0;
}

int pc_sched_fifo(int priority, struct pc_sched *saved)
{
	struct sched_param param;
	saved->saved = 0;
	if (priority <= 0)
		return 0;
	saved->policy = sched_getscheduler(0);
	if (saved->policy < 0 || sched_getparam(0, &param) < 0)
		return 0;
	saved->priority = param.sched_priority;
	param.sched_priority = priority;
	if (sched_setscheduler(0, SCHED_FIFO, &param) < 0)
		return 0;
	saved->saved = 1;
	return 1;
}

void pc_sched_restore(struct pc_sched *saved)
{
	if (saved->saved) {
		struct sched_param param = { .sched_priority = saved->priority };
		sched_setscheduler(0, saved->policy, &param);
	}
	saved->saved = 0;
}

uint64_t pc_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t tv_ns(struct timeval tv)
{
	return (uint64_t)tv.tv_sec * 1000000000ull + (uint64_t)tv.tv_usec * 1000ull;
}

void pc_thread_cpu_ns(uint64_t *user_ns, uint64_t *sys_ns)
{
	struct rusage ru;
	memset(&ru, 0, sizeof(ru));
	getrusage(RUSAGE_THREAD, &ru);
	*user_ns = tv_ns(ru.ru_utime);
	*sys_ns = tv_ns(ru.ru_stime);
}
