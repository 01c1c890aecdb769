/* kvm_vm: the KVM micro-VM guest.
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
 * KVM's dirty logs of the RAM memslot are kvm_dirtylog.h, their probe kvm_probe.h.
 */
#ifndef PC_KVM_VM_H
#define PC_KVM_VM_H

#include <stdint.h>

#include "guest_vm.h"

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

#endif /* PC_KVM_VM_H */
