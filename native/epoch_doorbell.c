/* epoch_doorbell: checkpoint epochs through shared memory (see epoch_doorbell.h). */
#define _GNU_SOURCE
#include "epoch_doorbell.h"

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "dirtylog_ops.h"

_Static_assert(PC_GUEST_MAX_THREADS == 56, "epoch_doorbell.cdef spells steps_done[56]");

#define VEC_LEN 512

struct pc_doorbell_server {
    pthread_t thread;
    struct pc_vm *vm;
    struct pc_doorbell *db;
    struct pc_vcpu_local *locals;
    int threads, pagemap_fd;
    uint32_t seen;    /* the request word when the session started: requests come after it */
    uint32_t current; /* the request of the epoch under way */
    int harvest, over; /* over: a final answer was given (set by the park hook) */
    uint64_t target, ram, ram_size;
    uint64_t limits[PC_GUEST_MAX_THREADS];
    struct pc_page_region vec[VEC_LEN];
};

/* Shared futexes: the two sides are different processes. */
static long futex(uint32_t *addr, int op, uint32_t val, const struct timespec *ts)
{
    return syscall(SYS_futex, addr, op, val, ts, NULL, 0);
}

uint64_t pc_doorbell_bytes(uint64_t runs_cap) { return sizeof(struct pc_doorbell) + 16 * runs_cap; }

uint32_t pc_doorbell_ring(struct pc_doorbell *db, uint32_t cmd, uint64_t steps, uint32_t harvest)
{
    db->cmd = cmd;
    db->steps = steps;
    db->harvest = harvest;
    const uint32_t req = __atomic_add_fetch(&db->req, 1, __ATOMIC_RELEASE);
    futex(&db->req, FUTEX_WAKE, INT_MAX, NULL);
    return req;
}

int pc_doorbell_wait(struct pc_doorbell *db, uint32_t req, int64_t timeout_ns)
{
    const uint64_t deadline = timeout_ns < 0 ? 0 : pc_monotonic_ns() + (uint64_t)timeout_ns;
    uint32_t d;
    while ((d = __atomic_load_n(&db->done, __ATOMIC_ACQUIRE)) != req) {
        if (timeout_ns < 0) {
            futex(&db->done, FUTEX_WAIT, d, NULL);
            continue;
        }
        const uint64_t now = pc_monotonic_ns();
        if (now >= deadline)
            return 0;
        struct timespec ts = {.tv_sec = (time_t)((deadline - now) / 1000000000ULL),
                              .tv_nsec = (long)((deadline - now) % 1000000000ULL)};
        futex(&db->done, FUTEX_WAIT, d, &ts);
    }
    return 1;
}

static void answer(struct pc_doorbell *db, uint32_t req, int state, int error)
{
    db->state = state;
    db->error = error;
    __atomic_store_n(&db->done, req, __ATOMIC_RELEASE);
    futex(&db->done, FUTEX_WAKE, INT_MAX, NULL);
}

/* The epoch's end, on the last vCPU to park (its park hook): steps, results, harvest.
 * Returns the answer's state (PC_DB_*), *error set on ERROR. */
static int epoch_end(struct pc_doorbell_server *s, int *error)
{
    struct pc_doorbell *db = s->db;
    int finished = s->target != 0;
    for (int t = 0; t < s->threads; t++) {
        const int result = pc_vm_result(s->vm, t);
        if (result < 0) {
            *error = result;
            return PC_DB_ERROR;
        }
        db->steps_done[t] = __atomic_load_n(&s->locals[t].steps_done, __ATOMIC_RELAXED);
        finished &= db->steps_done[t] >= s->target;
    }
    db->paused_ns = pc_vm_parked_ns(s->vm);
    db->nruns = 0;
    db->harvest_ns = 0;
    if (s->harvest) {
        uint64_t next;
        const uint64_t t0 = pc_monotonic_ns();
        const int64_t n = pc_wp_harvest(s->pagemap_fd, s->ram, s->ram + s->ram_size, s->ram, s->vec, VEC_LEN,
                                        db->runs, db->runs_cap, &next);
        db->harvest_ns = pc_monotonic_ns() - t0;
        if (n < 0 || next < s->ram + s->ram_size) {
            *error = n < 0 ? (int)n : -ENOSPC; /* the runs did not fit: never a partial epoch */
            return PC_DB_ERROR;
        }
        db->nruns = (uint64_t)n;
    }
    return finished ? PC_DB_FINISHED : PC_DB_PARKED;
}

/* The vCPUs' park hook: the answer goes to the primary straight from the last vCPU to
 * park, with no hop through the server thread. A final answer unhooks first (the
 * vCPUs are parked: no other run is under way) and tells the server to end. */
static void on_parked(void *ctx)
{
    struct pc_doorbell_server *s = ctx;
    int error = 0;
    const int state = epoch_end(s, &error);
    if (state != PC_DB_PARKED) {
        pc_vm_set_park_hook(s->vm, NULL, NULL);
        __atomic_store_n(&s->over, 1, __ATOMIC_RELEASE);
    }
    answer(s->db, s->current, state, error);
}

/* Releases the vCPUs for request req; 0 or -errno. */
static int epoch_start(struct pc_doorbell_server *s, uint32_t req)
{
    struct pc_doorbell *db = s->db;
    const uint64_t steps = db->steps;
    s->current = req;
    s->harvest = db->harvest; /* a STOP of the guest's own may overwrite the request mid-epoch */
    for (int t = 0; t < s->threads; t++) {
        const uint64_t done = __atomic_load_n(&s->locals[t].steps_done, __ATOMIC_RELAXED);
        const uint64_t want = steps > UINT64_MAX - done ? UINT64_MAX : done + steps;
        s->limits[t] = s->target && want > s->target ? s->target : want;
    }
    return pc_vm_resume(s->vm, s->limits, 0);
}

static void *serve(void *arg)
{
    struct pc_doorbell_server *s = arg;
    struct pc_doorbell *db = s->db;
    uint32_t seen = s->seen;
    /* A final answer from the park hook comes without a request: look for it between
     * waits (only the session's end waits for the slice). */
    const struct timespec slice = {.tv_sec = 0, .tv_nsec = 50 * 1000 * 1000};
    while (!__atomic_load_n(&s->over, __ATOMIC_ACQUIRE)) {
        const uint32_t req = __atomic_load_n(&db->req, __ATOMIC_ACQUIRE);
        if (req == seen) {
            futex(&db->req, FUTEX_WAIT, seen, &slice);
            continue;
        }
        seen = req;
        if (db->cmd != PC_DB_RUN) {
            pc_vm_wait_parked(s->vm, -1); /* a run under way is answered by its park first */
            pc_vm_set_park_hook(s->vm, NULL, NULL);
            answer(db, req, PC_DB_ENDED, 0);
            break;
        }
        const int rc = epoch_start(s, req);
        if (rc) {
            pc_vm_set_park_hook(s->vm, NULL, NULL);
            answer(db, req, PC_DB_ERROR, rc);
            break;
        }
    }
    pc_vm_wait_parked(s->vm, -1); /* the last park hook has returned */
    return NULL;
}

struct pc_doorbell_server *pc_doorbell_start(struct pc_vm *vm, struct pc_doorbell *db, struct pc_vcpu_local *locals,
                                             int threads, uint64_t steps_target, int pagemap_fd, uint64_t ram,
                                             uint64_t ram_size, int *err)
{
    *err = 0;
    if (threads < 1 || threads > PC_GUEST_MAX_THREADS || !db->runs_cap) {
        *err = -EINVAL;
        return NULL;
    }
    if (pc_vm_running(vm)) {
        *err = -EBUSY;
        return NULL;
    }
    struct pc_doorbell_server *s = calloc(1, sizeof(*s));
    if (!s) {
        *err = -ENOMEM;
        return NULL;
    }
    *s = (struct pc_doorbell_server){.vm = vm, .db = db, .locals = locals, .threads = threads,
                                     .pagemap_fd = pagemap_fd, .target = steps_target, .ram = ram,
                                     .ram_size = ram_size, .seen = __atomic_load_n(&db->req, __ATOMIC_ACQUIRE)};
    pc_vm_set_park_hook(vm, on_parked, s); /* the vCPUs are parked (checked above) */
    sigset_t all, old; /* signals go to the guest's other threads */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    const int rc = pthread_create(&s->thread, NULL, serve, s);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc) {
        pc_vm_set_park_hook(vm, NULL, NULL);
        free(s);
        *err = -rc;
        return NULL;
    }
    pthread_setname_np(s->thread, "doorbell");
    return s;
}

int pc_doorbell_join(struct pc_doorbell_server *s, int64_t timeout_ns)
{
    if (timeout_ns < 0) {
        pthread_join(s->thread, NULL);
    } else {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_sec += (time_t)(timeout_ns / 1000000000LL);
        ts.tv_nsec += (long)(timeout_ns % 1000000000LL);
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        if (pthread_timedjoin_np(s->thread, NULL, &ts))
            return 0;
    }
    free(s);
    return 1;
}
