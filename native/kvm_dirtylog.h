/* kvm_dirtylog: KVM's own dirty logs of the RAM memslot (memslot 1) of a kvm_vm VM,
 * one at a time:
 *   PC_KVM_LOG_BITMAP  KVM_GET_DIRTY_LOG: get and clear (re-protect) in one ioctl
 *   PC_KVM_LOG_CLEAR   KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: KVM_GET_DIRTY_LOG only reads,
 *                      KVM_CLEAR_DIRTY_LOG re-protects the reported pages chunk by chunk
 *   PC_KVM_LOG_RING    KVM_CAP_DIRTY_LOG_RING: per-vCPU rings of dirty GFNs mmapped at
 *                      KVM_DIRTY_LOG_PAGE_OFFSET, collected and KVM_RESET_DIRTY_RINGS;
 *                      chosen when the VM is created (ring_entries > 0), exclusive
 *                      with the other two
 * A harvest fills a bitmap of RAM pages; pc_kvm_dirty_runs reads it as runs.
 */
#ifndef PC_KVM_DIRTYLOG_H
#define PC_KVM_DIRTYLOG_H

#include <stdint.h>

struct pc_kvm;

#define PC_KVM_LOG_OFF 0
#define PC_KVM_LOG_BITMAP 1
#define PC_KVM_LOG_CLEAR 2
#define PC_KVM_LOG_RING 3

/* Pages re-protected per KVM_CLEAR_DIRTY_LOG (a multiple of 64). */
#define PC_KVM_CLEAR_CHUNK 16384

/* Turn RAM's dirty log on (mode PC_KVM_LOG_*) or off (PC_KVM_LOG_OFF): 0 or -errno
 * (reason in pc_kvm_error). PC_KVM_LOG_RING needs a VM made with ring_entries. */
int pc_kvm_dirty_start(struct pc_kvm *vm, int mode);
/* Harvest: the pages written since the previous harvest (or the start), cleared
 * (re-protected) before it returns. Returns their number or -errno; times in ns:
 * t[0] getting the log, t[1] clearing it (clear mode). */
int64_t pc_kvm_dirty_harvest(struct pc_kvm *vm, uint64_t *t);
/* Runs (first page, count) of the latest harvest from page *next on, into
 * runs[2 * max_runs]; *next is where to continue (RAM's page count when done). */
int64_t pc_kvm_dirty_runs(struct pc_kvm *vm, uint64_t *runs, uint64_t max_runs, uint64_t *next);

/* For kvm_vm.c (a vCPU whose ring is full), not in the cdef: collect every vCPU's dirty
 * ring into the pending set and reset them (takes ring_lock). 0 or -errno. */
int pc_kvm_ring_collect(struct pc_kvm *vm);

#endif /* PC_KVM_DIRTYLOG_H */
