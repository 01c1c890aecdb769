/* kvm_probe: whether each of KVM's dirty logs works for real here. See kvm_probe.h. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "kvm_core.h"
#include "kvm_dirtylog.h"
#include "kvm_probe.h"
#include "kvm_vm.h"

/* One backend on a scratch VM: the service vCPU writes pages 3 and 7, then 5; each
 * harvest must report exactly those. 0 or a reason in err. */
static int probe_mode(int mode, char *err, int errlen)
{
    const uint64_t npages = 16;
    long ps = sysconf(_SC_PAGESIZE);
    void *ram = mmap(NULL, npages * (uint64_t)ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (ram == MAP_FAILED)
        return snprintf(err, (size_t)errlen, "mmap: %s", strerror(errno)), -ENOMEM;
    struct pc_kvm *vm = pc_kvm_new(ram, npages * (uint64_t)ps, 1, mode == PC_KVM_LOG_RING ? 256 : 0, err, errlen);
    int rc = vm ? 0 : -EIO;
    static const uint64_t first[] = {3, 7}, second[] = {5};
    const uint64_t want[2] = {(1ULL << 3) | (1ULL << 7), 1ULL << 5};
    for (int round = 0; round < 2 && !rc; round++) {
        uint64_t t[2];
        if (round == 0 && (rc = pc_kvm_dirty_start(vm, mode)))
            break;
        if ((rc = pc_kvm_touch(vm, round ? second : first, round ? 1 : 2)))
            break;
        int64_t n = pc_kvm_dirty_harvest(vm, t);
        if (n < 0) {
            rc = (int)n;
            break;
        }
        if (vm->snap[0] != want[round]) {
            snprintf(vm->err, sizeof(vm->err), "harvest %d reported pages %#llx, the guest wrote %#llx", round + 1,
                     (unsigned long long)vm->snap[0], (unsigned long long)want[round]);
            rc = -EIO;
        }
    }
    if (vm && rc)
        snprintf(err, (size_t)errlen, "%s", vm->err);
    pc_kvm_free(vm);
    munmap(ram, npages * (uint64_t)ps);
    return rc;
}

int pc_kvm_probe(int mode, char *err, int errlen)
{
    if (mode < PC_KVM_LOG_BITMAP || mode > PC_KVM_LOG_RING) {
        snprintf(err, (size_t)errlen, "unknown dirty log mode %d", mode);
        return -EINVAL;
    }
    err[0] = 0;
    return probe_mode(mode, err, errlen);
}