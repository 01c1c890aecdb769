/*
 * epoch_doorbell: checkpoint epochs driven through shared memory instead of a control
 * request per epoch.
 *
 * The guest maps a small memfd (struct pc_doorbell) and hands it to the checkpointing
 * primary. A C thread of the guest (the server) waits on the doorbell's request word
 * (a futex in shared memory: the two processes wake each other directly); each request
 * is one epoch: every vCPU does exactly `steps` more steps (fewer at its target) and
 * parks. The last vCPU to park (a park hook, vcpu_threads.h) harvests the guest's dirty
 * log right there (PAGEMAP_SCAN of its own pagemap, WP_MATCHING: reported and
 * re-protected) into the doorbell and wakes the primary. So an epoch costs three wakes
 * (primary -> server -> vCPU -> primary) and no control line, JSON or Python on the
 * guest's side.
 *
 * The answer is written while every vCPU is parked and the guest stays parked until the
 * next request: the primary reads the runs and the RAM at one step boundary. A session
 * ends on a STOP request (the server answers it once the vCPUs are parked), when the
 * guest reaches its step target (FINISHED) or a vCPU fails (ERROR); then the park hook
 * is removed and the server thread exits.
 */
#ifndef PC_EPOCH_DOORBELL_H
#define PC_EPOCH_DOORBELL_H

#include <stdint.h>

#include "guest_vm.h"
#include "vcpu_threads.h"

enum { PC_DB_RUN = 1, PC_DB_STOP = 2 };
enum { PC_DB_PARKED = 1, PC_DB_FINISHED = 2, PC_DB_ENDED = 3, PC_DB_ERROR = 4 };

/* The shared page(s): the primary writes the request fields then bumps req; the server
 * writes the answer fields then sets done = req. */
struct pc_doorbell {
    uint32_t req, done;  /* futexes */
    uint32_t cmd, harvest;
    uint64_t steps;
    int32_t state, error; /* answer: PC_DB_*, -errno or a vCPU's negative result */
    uint64_t paused_ns, harvest_ns;
    uint64_t nruns, runs_cap; /* runs_cap set by the guest at the start */
    uint64_t steps_done[PC_GUEST_MAX_THREADS];
    uint64_t runs[]; /* 2 * runs_cap: (first page, count), sorted and merged */
};

/* Bytes of a doorbell holding runs_cap runs. */
uint64_t pc_doorbell_bytes(uint64_t runs_cap);

struct pc_doorbell_server;

/* Start the server thread of a parked guest: db (mapped, zeroed, runs_cap set) drives
 * vm's `threads` vCPUs (their steps in locals); steps_target 0: unlimited; pagemap_fd:
 * /proc/self/pagemap, [ram, ram + ram_size) registered for async write-protect.
 * NULL with *err = -errno on failure. */
struct pc_doorbell_server *pc_doorbell_start(struct pc_vm *vm, struct pc_doorbell *db, struct pc_vcpu_local *locals,
                                             int threads, uint64_t steps_target, int pagemap_fd, uint64_t ram,
                                             uint64_t ram_size, int *err);
/* Wait (up to timeout_ns, < 0: no limit) for the server thread to end; 1 when it
 * ended (then freed: the state is in the doorbell), 0 on timeout. */
int pc_doorbell_join(struct pc_doorbell_server *server, int64_t timeout_ns);

/* Either side: post a request (cmd, steps, harvest) and wake the server. Returns the
 * request's number. */
uint32_t pc_doorbell_ring(struct pc_doorbell *db, uint32_t cmd, uint64_t steps, uint32_t harvest);
/* Primary: wait up to timeout_ns (< 0: no limit) for request `req` to be answered;
 * 1 answered, 0 timeout. */
int pc_doorbell_wait(struct pc_doorbell *db, uint32_t req, int64_t timeout_ns);

#endif /* PC_EPOCH_DOORBELL_H */
