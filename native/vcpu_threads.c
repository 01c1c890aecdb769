/* vcpu_threads: persistent vCPU threads parked on futexes. See vcpu_threads.h. */
#define _GNU_SOURCE
#include "vcpu_threads.h"

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

struct pc_vm {
    void *ram;
    uint64_t ram_size;
    int threads;
    struct pc_vcpu_local *locals;
    int own_pause;    /* the pause word unless a runner brings its own */
    int *pause_flag;  /* futex: raised by a pause; paced vCPUs sleep on it */
    pc_vcpu_runner runner; /* NULL: pc_vcpu_run on ram */
    void *runner_ctx;
    struct pc_vcpu_pace pacing; /* run-time throttle and rate cap, read every step */
    uint32_t gen;     /* futex: bumped by every resume; parked vCPUs wait for a change */
    uint32_t running; /* futex: vCPUs not parked yet; pc_vm_wait_parked waits for 0 */
    uint32_t events;  /* futex: bumped when a run released with notify ends, or by pc_vm_notify */
    int notify;       /* the current run bumps events when its last vCPU parks */
    pc_vm_park_hook park_hook; /* run by the last vCPU to park, before the waiters wake */
    void *park_ctx;
    uint64_t resumed_ns, pause_requested_ns;
    uint64_t *limits;   /* per vCPU, written by resume before the generation moves */
    uint64_t *park_ns;  /* per vCPU: when it last parked */
    int *results;       /* per vCPU: its latest pc_vcpu_run result */
    int *tids;          /* per vCPU: gettid() */
};

struct vcpu_start {
    struct pc_vm *vm;
    int index;
    int running; /* created in its first run (pc_vm_new_running): not parked first */
};

static long futex(uint32_t *addr, int op, uint32_t val, const struct timespec *ts)
{
    return syscall(SYS_futex, addr, op | FUTEX_PRIVATE_FLAG, val, ts, NULL, 0);
}

static void parked(struct pc_vm *vm, int t)
{
    __atomic_store_n(&vm->park_ns[t], pc_monotonic_ns(), __ATOMIC_RELAXED);
    if (__atomic_sub_fetch(&vm->running, 1, __ATOMIC_ACQ_REL) == 0) {
        pc_vm_park_hook hook = __atomic_load_n(&vm->park_hook, __ATOMIC_ACQUIRE);
        if (hook)
            hook(vm->park_ctx);
        futex(&vm->running, FUTEX_WAKE, INT_MAX, NULL);
        if (__atomic_load_n(&vm->notify, __ATOMIC_RELAXED))
            pc_vm_notify(vm);
    }
}

static void *vcpu_main(void *arg)
{
    struct vcpu_start start = *(struct vcpu_start *)arg;
    free(arg);
    struct pc_vm *vm = start.vm;
    const int t = start.index;
    __atomic_store_n(&vm->tids[t], (int)syscall(SYS_gettid), __ATOMIC_RELAXED);
    /* No resume can come before the creator returns: the generation is 0 here, or 1
     * for threads created running (so they find it moved at once). */
    uint32_t seen = 0;
    if (!start.running)
        parked(vm, t); /* started: counts as parked */
    for (;;) {
        uint32_t g;
        while ((g = __atomic_load_n(&vm->gen, __ATOMIC_ACQUIRE)) == seen)
            futex(&vm->gen, FUTEX_WAIT, seen, NULL);
        seen = g;
        int rc = vm->runner ? vm->runner(vm->runner_ctx, t, vm->limits[t], &vm->locals[t])
                            : pc_vcpu_run(vm->ram, vm->ram_size, t, vm->pause_flag, vm->limits[t], &vm->locals[t],
                                          &vm->pacing);
        __atomic_store_n(&vm->results[t], rc, __ATOMIC_RELAXED);
        parked(vm, t);
    }
    return NULL;
}

static void vm_free(struct pc_vm *vm)
{
    free(vm->limits);
    free(vm->park_ns);
    free(vm->results);
    free(vm->tids);
    free(vm);
}

static struct pc_vm *vm_create(void *ram, uint64_t ram_size, int threads, struct pc_vcpu_local *locals,
                               const uint64_t *limits, int notify, int *err);

struct pc_vm *pc_vm_new(void *ram, uint64_t ram_size, int threads, struct pc_vcpu_local *locals, int *err)
{
    struct pc_vm *vm = vm_create(ram, ram_size, threads, locals, NULL, 0, err);
    if (vm)
        pc_vm_wait_parked(vm, -1);
    return vm;
}

struct pc_vm *pc_vm_new_running(void *ram, uint64_t ram_size, int threads, struct pc_vcpu_local *locals,
                                const uint64_t *limits, int notify, int *err)
{
    return vm_create(ram, ram_size, threads, locals, limits, notify, err);
}

static struct pc_vm *vm_create(void *ram, uint64_t ram_size, int threads, struct pc_vcpu_local *locals,
                               const uint64_t *limits, int notify, int *err)
{
    *err = 0;
    if (threads < 1 || threads > PC_GUEST_MAX_THREADS) {
        *err = -EINVAL;
        return NULL;
    }
    struct pc_vm *vm = calloc(1, sizeof(*vm));
    if (!vm) {
        *err = -ENOMEM;
        return NULL;
    }
    vm->ram = ram;
    vm->ram_size = ram_size;
    vm->threads = threads;
    vm->locals = locals;
    vm->pause_flag = &vm->own_pause;
    vm->limits = calloc((size_t)threads, sizeof(uint64_t));
    vm->park_ns = calloc((size_t)threads, sizeof(uint64_t));
    vm->results = calloc((size_t)threads, sizeof(int));
    vm->tids = calloc((size_t)threads, sizeof(int));
    if (!vm->limits || !vm->park_ns || !vm->results || !vm->tids) {
        vm_free(vm);
        *err = -ENOMEM;
        return NULL;
    }
    vm->running = (uint32_t)threads;
    if (limits) { /* the first run, as pc_vm_resume sets it up, before any thread exists */
        memcpy(vm->limits, limits, (size_t)threads * sizeof(uint64_t));
        vm->notify = notify;
        vm->resumed_ns = pc_monotonic_ns();
        vm->gen = 1;
    }
    /* Block every signal in the vCPUs (they inherit the creator's mask). */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 256 << 10);
    int started = 0, rc = 0;
    for (; started < threads; started++) {
        struct vcpu_start *s = malloc(sizeof(*s));
        if (!s) {
            rc = ENOMEM;
            break;
        }
        s->vm = vm;
        s->index = started;
        s->running = limits != NULL;
        pthread_t handle;
        rc = pthread_create(&handle, &attr, vcpu_main, s);
        if (rc) {
            free(s);
            break;
        }
        char name[16];
        snprintf(name, sizeof(name), "vcpu%d", started);
        pthread_setname_np(handle, name);
    }
    pthread_attr_destroy(&attr);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc) {
        /* The threads that did start wait for a generation that never comes (or, created
         * running, park at their next step boundary): leak the vm to them rather than
         * free memory they read. */
        if (limits)
            pc_vm_request_pause(vm);
        *err = -rc;
        return NULL;
    }
    return vm;
}

int pc_vm_resume(struct pc_vm *vm, const uint64_t *limits, int notify)
{
    if (__atomic_load_n(&vm->running, __ATOMIC_ACQUIRE))
        return -EBUSY;
    __atomic_store_n(&vm->notify, notify, __ATOMIC_RELAXED);
    memcpy(vm->limits, limits, (size_t)vm->threads * sizeof(uint64_t));
    __atomic_store_n(vm->pause_flag, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&vm->resumed_ns, pc_monotonic_ns(), __ATOMIC_RELAXED);
    __atomic_store_n(&vm->running, (uint32_t)vm->threads, __ATOMIC_RELAXED);
    __atomic_add_fetch(&vm->gen, 1, __ATOMIC_RELEASE);
    futex(&vm->gen, FUTEX_WAKE, INT_MAX, NULL);
    return 0;
}

void pc_vm_request_pause(struct pc_vm *vm)
{
    __atomic_store_n(&vm->pause_requested_ns, pc_monotonic_ns(), __ATOMIC_RELAXED);
    __atomic_store_n(vm->pause_flag, 1, __ATOMIC_RELEASE);
    futex((uint32_t *)vm->pause_flag, FUTEX_WAKE, INT_MAX, NULL);
}

int pc_vm_set_runner(struct pc_vm *vm, pc_vcpu_runner runner, void *ctx, int *pause_flag)
{
    if (__atomic_load_n(&vm->running, __ATOMIC_ACQUIRE))
        return -EBUSY;
    int *flag = pause_flag ? pause_flag : &vm->own_pause;
    __atomic_store_n(flag, __atomic_load_n(vm->pause_flag, __ATOMIC_RELAXED), __ATOMIC_RELAXED);
    /* The vCPUs read these after the next resume's generation bump (release/acquire). */
    vm->pause_flag = flag;
    vm->runner = runner;
    vm->runner_ctx = ctx;
    return 0;
}

int pc_vm_set_park_hook(struct pc_vm *vm, pc_vm_park_hook hook, void *ctx)
{
    if (__atomic_load_n(&vm->running, __ATOMIC_ACQUIRE))
        return -EBUSY;
    vm->park_ctx = ctx;
    __atomic_store_n(&vm->park_hook, hook, __ATOMIC_RELEASE);
    return 0;
}

int pc_vm_set_throttle(struct pc_vm *vm, int percent)
{
    if (percent < 0 || percent > 99)
        return -EINVAL;
    __atomic_store_n(&vm->pacing.throttle_pct, (uint32_t)percent, __ATOMIC_RELAXED);
    return 0;
}

int pc_vm_set_rate_cap(struct pc_vm *vm, double steps_per_s)
{
    if (!(steps_per_s >= 0.0) || steps_per_s > 1e18)
        return -EINVAL;
    /* Below 1 step per 1000 s the cap is 1 step per 1000 s (and 1e9 / x cannot overflow). */
    const uint64_t interval = steps_per_s <= 0.0 ? 0 : steps_per_s < 1e-3 ? 1000000000000ULL
                                                                            : (uint64_t)(1e9 / steps_per_s);
    __atomic_store_n(&vm->pacing.cap_interval_ns, interval, __ATOMIC_RELAXED);
    return 0;
}

int pc_vm_throttle(struct pc_vm *vm) { return (int)__atomic_load_n(&vm->pacing.throttle_pct, __ATOMIC_RELAXED); }

int pc_vm_wait_parked(struct pc_vm *vm, int64_t timeout_ns)
{
    const uint64_t deadline = timeout_ns < 0 ? 0 : pc_monotonic_ns() + (uint64_t)timeout_ns;
    uint32_t r;
    while ((r = __atomic_load_n(&vm->running, __ATOMIC_ACQUIRE)) != 0) {
        if (timeout_ns < 0) {
            futex(&vm->running, FUTEX_WAIT, r, NULL);
            continue;
        }
        uint64_t now = pc_monotonic_ns();
        if (now >= deadline)
            return 0;
        struct timespec ts = {.tv_sec = (time_t)((deadline - now) / 1000000000ULL),
                              .tv_nsec = (long)((deadline - now) % 1000000000ULL)};
        futex(&vm->running, FUTEX_WAIT, r, &ts);
    }
    return 1;
}

int pc_vm_running(struct pc_vm *vm) { return (int)__atomic_load_n(&vm->running, __ATOMIC_ACQUIRE); }

int pc_vm_result(struct pc_vm *vm, int t)
{
    return t >= 0 && t < vm->threads ? __atomic_load_n(&vm->results[t], __ATOMIC_RELAXED) : PC_GUEST_EPARAM;
}

int pc_vm_thread_id(struct pc_vm *vm, int t)
{
    return t >= 0 && t < vm->threads ? __atomic_load_n(&vm->tids[t], __ATOMIC_RELAXED) : -1;
}

uint64_t pc_vm_resumed_ns(struct pc_vm *vm) { return __atomic_load_n(&vm->resumed_ns, __ATOMIC_RELAXED); }

uint64_t pc_vm_pause_requested_ns(struct pc_vm *vm)
{
    return __atomic_load_n(&vm->pause_requested_ns, __ATOMIC_RELAXED);
}

uint64_t pc_vm_parked_ns(struct pc_vm *vm)
{
    uint64_t latest = 0;
    for (int t = 0; t < vm->threads; t++) {
        uint64_t p = __atomic_load_n(&vm->park_ns[t], __ATOMIC_RELAXED);
        if (p > latest)
            latest = p;
    }
    return latest;
}

void pc_vm_notify(struct pc_vm *vm)
{
    __atomic_add_fetch(&vm->events, 1, __ATOMIC_RELEASE);
    futex(&vm->events, FUTEX_WAKE, INT_MAX, NULL);
}

uint32_t pc_vm_events(struct pc_vm *vm) { return __atomic_load_n(&vm->events, __ATOMIC_ACQUIRE); }

int pc_vm_wait_event(struct pc_vm *vm, uint32_t seen, int64_t timeout_ns)
{
    struct timespec ts = {.tv_sec = (time_t)(timeout_ns / 1000000000LL), .tv_nsec = (long)(timeout_ns % 1000000000LL)};
    if (__atomic_load_n(&vm->events, __ATOMIC_ACQUIRE) == seen)
        futex(&vm->events, FUTEX_WAIT, seen, &ts);
    return __atomic_load_n(&vm->events, __ATOMIC_ACQUIRE) != seen;
}
