/* kvm_core: the VM object's basic helpers (see kvm_core.h). */
#define _GNU_SOURCE

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <sys/ioctl.h>
#include <time.h>

#include "kvm_core.h"

#define fail pc_kvm_fail
#define set_slot pc_kvm_set_slot

uint64_t pc_kvm_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

int fail(struct pc_kvm *vm, int rc, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(vm->err, sizeof(vm->err), fmt, ap);
    va_end(ap);
    return rc;
}

int set_slot(struct pc_kvm *vm, uint32_t slot, uint64_t gpa, uint64_t size, void *host, uint32_t flags)
{
    struct kvm_userspace_memory_region r = {.slot = slot, .flags = flags, .guest_phys_addr = gpa,
                                            .memory_size = size, .userspace_addr = (uint64_t)(uintptr_t)host};
    return ioctl(vm->vm_fd, KVM_SET_USER_MEMORY_REGION, &r) ? -errno : 0;
}
