/* kvm_vm: the KVM micro-VM guest and KVM's own dirty logs.
 *
 * The VM runs the guest workloads of guest_vm.h inside KVM: guest RAM is the process
 * guest's region (memfd or anonymous, the same layout and state page) in memslot 1,
 * the code, page tables, mailboxes and stacks in memslot 0 (see kvm_layout.h). A vCPU
 * thread drives one KVM vCPU in passes: it writes a step limit into the vCPU's mailbox,
 * KVM_RUN runs the guest code until the limit, the shared pause word or the end of the
 * batch, and the guest halts. Between passes the host paces the rate and keeps the
 * process-local step mirror (struct pc_vcpu_local), so status never reads guest RAM.
 * One more vCPU, the service vCPU, runs the touch command: guest-made writes that
 * KVM's dirty log sees (writes through the host mapping are invisible to it).
 *
 * Dirty logs of memslot 1 (one at a time):
 *   PC_KVM_LOG_BITMAP  KVM_GET_DIRTY_LOG: get and clear (re-protect) in one ioctl
 *   PC_KVM_LOG_CLEAR   KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: KVM_GET_DIRTY_LOG only reads,
 *                      KVM_CLEAR_DIRTY_LOG re-protects the reported pages chunk by chunk
 *   PC_KVM_LOG_RING    KVM_CAP_DIRTY_LOG_RING: per-vCPU rings of dirty GFNs mmapped at
 *                      KVM_DIRTY_LOG_PAGE_OFFSET, collected and KVM_RESET_DIRTY_RINGS;
 *                      chosen when the VM is created (ring_entries > 0), exclusive
 *                      with the other two
 * A harvest fills a bitmap of RAM pages; pc_kvm_dirty_runs reads it as runs.
 * (Code: kvm_vm.c for the VM and its passes, kvm_dirtylog.c for the logs.)
 */
#ifndef PC_KVM_VM_H
#define PC_KVM_VM_H

#include <stdint.h>

#include "guest_vm.h"

#define PC_KVM_LOG_OFF 0
#define PC_KVM_LOG_BITMAP 1
#define PC_KVM_LOG_CLEAR 2
#define PC_KVM_LOG_RING 3

/* Pages re-protected per KVM_CLEAR_DIRTY_LOG (a multiple of 64). */
#define PC_KVM_CLEAR_CHUNK 16384

/* pc_kvm_vcpu_run / pc_kvm_touch errors beyond the PC_GUEST_E* codes */
#define PC_KVM_EEXIT (-20)   /* an exit the VM does not expect: see pc_kvm_error */
#define PC_KVM_ERUN (-21)    /* KVM_RUN failed: see pc_kvm_error */
#define PC_KVM_EFREE (-22)   /* free pages (--free-fraction) are not in the KVM guest code */

struct pc_kvm;

/* Create the VM over ram (ram_size bytes, page aligned) with threads vCPUs plus the
 * service vCPU. ring_entries > 0 enables the dirty ring (a power of two; needs
 * KVM_CAP_DIRTY_LOG_RING). NULL on failure with a one-line reason in err. */
struct pc_kvm *pc_kvm_new(void *ram, uint64_t ram_size, int threads, uint32_t ring_entries,
                          char *err, int errlen);
void pc_kvm_free(struct pc_kvm *vm);
/* The pause word the guest reads before every step (in the firmware slot). */
int *pc_kvm_pause_flag(struct pc_kvm *vm);
/* The latest error of a failed call, one line. */
const char *pc_kvm_error(struct pc_kvm *vm);

/* Like pc_vcpu_run: run vCPU tid until its counter reaches limit (PC_VCPU_LIMIT) or
 * the pause word is set (PC_VCPU_PAUSED); negative PC_GUEST_E* / PC_KVM_E* on error. */
int pc_kvm_vcpu_run(struct pc_kvm *vm, int tid, uint64_t limit, struct pc_vcpu_local *local);
/* pc_kvm_vcpu_run as a pc_vcpu_runner (ctx: the struct pc_kvm) for the persistent vCPU threads. */
int pc_kvm_vcpu_runner(void *ctx, int tid, uint64_t limit, struct pc_vcpu_local *local);
/* The service vCPU writes (atomic OR 0) the first word of each page: 0 or negative. */
int pc_kvm_touch(struct pc_kvm *vm, const uint64_t *pages, uint64_t n);

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

/* Try one dirty log (PC_KVM_LOG_*) for real on a scratch VM: the guest writes pages 3
 * and 7, then 5, and each harvest must report exactly those. 0, or negative with the
 * reason in err (naming /dev/kvm or the capability). */
int pc_kvm_probe(int mode, char *err, int errlen);

#endif /* PC_KVM_VM_H */
