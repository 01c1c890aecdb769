/* vcpu_threads: the guest's persistent vCPU threads.
 *
 * A pc_vm owns one pthread per vCPU, created once when the guest's state page is
 * known and alive as long as the process. A vCPU thread waits on a futex (the run
 * generation) while parked; pc_vm_resume hands every vCPU its step limit and wakes
 * them all with one FUTEX_WAKE; each runs pc_vcpu_run until its limit or the pause
 * flag, records when it parked and decrements the running count, the last one waking
 * whoever waits in pc_vm_wait_parked. A pause raises the flag and wakes paced vCPUs
 * sleeping on it (their sleeps are futex waits on the flag), so a pause answers within
 * one step (or one fault) instead of a sleep slice. No thread is created per resume.
 *
 * The vCPU threads block every signal: signals go to the process's other threads.
 */
#ifndef PC_VCPU_THREADS_H
#define PC_VCPU_THREADS_H

#include <stdint.h>

#include "guest_vm.h"

struct pc_vm;

/* What a vCPU thread runs instead of pc_vcpu_run (a KVM vCPU): run vCPU tid until its
 * steps reach limit or its own pause word is raised; PC_VCPU_LIMIT, PC_VCPU_PAUSED or < 0. */
typedef int (*pc_vcpu_runner)(void *ctx, int tid, uint64_t limit, struct pc_vcpu_local *local);

/* Start `threads` vCPU threads on this RAM, parked; returns once all are parked. locals
 * (threads records) must outlive the vm. NULL with *err = -errno on failure. */
struct pc_vm *pc_vm_new(void *ram, uint64_t ram_size, int threads, struct pc_vcpu_local *locals, int *err);
/* As pc_vm_new followed by pc_vm_resume(limits, notify), without the wait for the new
 * threads to park and the wake-up after it: each thread starts in its first run (an
 * incoming guest's resume: two scheduling rounds fewer inside a migration's downtime).
 * Returns at once; the threads run on the vm's own step loop and pacing (none yet). */
struct pc_vm *pc_vm_new_running(void *ram, uint64_t ram_size, int threads, struct pc_vcpu_local *locals,
                                const uint64_t *limits, int notify, int *err);
/* Release every parked vCPU t to run until its steps_done reaches limits[t]; with
 * notify, the end of this run is an event (pc_vm_wait_event). 0, or -EBUSY while some
 * vCPU has not parked yet. */
int pc_vm_resume(struct pc_vm *vm, const uint64_t *limits, int notify);
/* Raise the pause flag and wake paced sleepers; the vCPUs park at their next step
 * boundary. Does not wait (see pc_vm_wait_parked). */
void pc_vm_request_pause(struct pc_vm *vm);
/* While every vCPU is parked: run `runner` (NULL: pc_vcpu_run) and use pause_flag (NULL:
 * the vm's own) as the pause word from the next resume; the flag's value carries over.
 * 0, or -EBUSY while some vCPU runs. */
int pc_vm_set_runner(struct pc_vm *vm, pc_vcpu_runner runner, void *ctx, int *pause_flag);
/* What the last vCPU to park runs, on its own thread, before anyone waiting in
 * pc_vm_wait_parked wakes (an epoch's harvest and answer, without a thread hop); NULL:
 * nothing. The vCPUs may be resumed from inside the hook's effects: it must not assume
 * they stay parked after it returns. 0, or -EBUSY while some vCPU runs. */
typedef void (*pc_vm_park_hook)(void *ctx);
int pc_vm_set_park_hook(struct pc_vm *vm, pc_vm_park_hook hook, void *ctx);
/* Run-time pacing of pc_vcpu_run (not guest state): park percent (0..99) of the time;
 * cap each vCPU at steps_per_s (0 lifts it). 0, or -EINVAL. Seen at the next step. */
int pc_vm_set_throttle(struct pc_vm *vm, int percent);
int pc_vm_set_rate_cap(struct pc_vm *vm, double steps_per_s);
int pc_vm_throttle(struct pc_vm *vm);
/* Wait until every vCPU is parked: 1 when parked, 0 after timeout_ns (< 0: no limit). */
int pc_vm_wait_parked(struct pc_vm *vm, int64_t timeout_ns);
/* vCPUs that have not parked since the latest resume. */
int pc_vm_running(struct pc_vm *vm);
/* The latest run's result of vCPU t (PC_VCPU_LIMIT, PC_VCPU_PAUSED or PC_GUEST_E*). */
int pc_vm_result(struct pc_vm *vm, int t);
/* OS thread id (gettid) of vCPU t. */
int pc_vm_thread_id(struct pc_vm *vm, int t);
/* CLOCK_MONOTONIC ns: the latest resume, the latest pause request, and when the last
 * vCPU parked after them (0 = never). */
uint64_t pc_vm_resumed_ns(struct pc_vm *vm);
uint64_t pc_vm_pause_requested_ns(struct pc_vm *vm);
uint64_t pc_vm_parked_ns(struct pc_vm *vm);

/* Events for a thread that waits for "something happened" (a free run ended, quit)
 * without waking at every epoch: bump, read the count, wait for it to move (1) or
 * for timeout_ns (0). */
void pc_vm_notify(struct pc_vm *vm);
uint32_t pc_vm_events(struct pc_vm *vm);
int pc_vm_wait_event(struct pc_vm *vm, uint32_t seen, int64_t timeout_ns);

#endif /* PC_VCPU_THREADS_H */
