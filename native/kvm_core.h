/* kvm_core: the VM object and its few basic helpers (kvm_core.c), shared by the VM
 * (kvm_vm.c: VM, vCPUs, passes), its dirty logs (kvm_dirtylog.c) and their probe
 * (kvm_probe.c). Not exposed to Python: no kvm_core.cdef. Includes go one way:
 * kvm_probe -> kvm_vm -> kvm_dirtylog -> kvm_core. */
#ifndef PC_KVM_CORE_H
#define PC_KVM_CORE_H

#include <linux/kvm.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "kvm_layout.h"

#define SLOT_FW 0
#define SLOT_RAM 1

struct pc_kvm {
    int kvm_fd, vm_fd;
    int nvcpu; /* threads + the service vCPU (the last one) */
    int vcpu_fd[PC_KVM_MAX_VCPUS];
    struct kvm_run *run[PC_KVM_MAX_VCPUS];
    size_t run_size;
    char *fw;
    char *ram;
    uint64_t ram_size, npages, page_size;
    int log_mode;
    uint32_t ring_entries;
    struct kvm_dirty_gfn *ring[PC_KVM_MAX_VCPUS];
    uint32_t ring_fetch[PC_KVM_MAX_VCPUS];
    uint64_t *pending; /* ring: collected since the latest harvest */
    uint64_t *snap;    /* the latest harvest */
    uint64_t bitmap_words;
    pthread_mutex_t ring_lock, service_lock;
    char err[256];
};

/* Record a one-line error in vm->err; returns rc. */
int pc_kvm_fail(struct pc_kvm *vm, int rc, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
uint64_t pc_kvm_now_ns(void);
/* A KVM_SET_USER_MEMORY_REGION of slot; 0 or -errno. */
int pc_kvm_set_slot(struct pc_kvm *vm, uint32_t slot, uint64_t gpa, uint64_t size, void *host, uint32_t flags);

#endif /* PC_KVM_CORE_H */
