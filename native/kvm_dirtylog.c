/* kvm_dirtylog: KVM's three dirty logs of RAM's memslot. See kvm_dirtylog.h; the probe
 * that tries each on a scratch VM is kvm_probe.c. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "kvm_core.h"
#include "kvm_dirtylog.h"

#define fail pc_kvm_fail
#define set_slot pc_kvm_set_slot

/* ---- dirty ring ------------------------------------------------------------------- */

/* Move every published entry of every ring into vm->pending, then let KVM re-protect
 * those pages (KVM_RESET_DIRTY_RINGS). Called by a harvest and by a vCPU whose ring is
 * full; ring_lock held. */
static int ring_collect_locked(struct pc_kvm *vm)
{
    const uint32_t mask = vm->ring_entries - 1;
    uint64_t taken = 0;
    for (int i = 0; i < vm->nvcpu; i++) {
        for (;;) {
            struct kvm_dirty_gfn *e = &vm->ring[i][vm->ring_fetch[i] & mask];
            uint32_t flags = __atomic_load_n(&e->flags, __ATOMIC_ACQUIRE);
            if (!(flags & KVM_DIRTY_GFN_F_DIRTY))
                break;
            if ((e->slot & 0xffff) == SLOT_RAM && e->offset < vm->npages)
                vm->pending[e->offset >> 6] |= 1ULL << (e->offset & 63);
            __atomic_store_n(&e->flags, KVM_DIRTY_GFN_F_RESET, __ATOMIC_RELEASE);
            vm->ring_fetch[i]++;
            taken++;
        }
    }
    if (taken && ioctl(vm->vm_fd, KVM_RESET_DIRTY_RINGS, 0) < 0)
        return fail(vm, -errno, "KVM_RESET_DIRTY_RINGS: %s", strerror(errno));
    return 0;
}

int pc_kvm_ring_collect(struct pc_kvm *vm)
{
    pthread_mutex_lock(&vm->ring_lock);
    int rc = ring_collect_locked(vm);
    pthread_mutex_unlock(&vm->ring_lock);
    return rc;
}

/* ---- dirty logs ----------------------------------------------------------------------- */

static int set_manual_protect(struct pc_kvm *vm, int on)
{
    struct kvm_enable_cap cap = {.cap = KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                                 .args = {on ? KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE : 0}};
    if (on && ioctl(vm->vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) <= 0)
        return fail(vm, -EOPNOTSUPP, "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 not offered by this KVM");
    if (ioctl(vm->vm_fd, KVM_ENABLE_CAP, &cap))
        return fail(vm, -errno, "KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2): %s", strerror(errno));
    return 0;
}

int pc_kvm_dirty_start(struct pc_kvm *vm, int mode)
{
    if (mode < PC_KVM_LOG_OFF || mode > PC_KVM_LOG_RING)
        return fail(vm, -EINVAL, "unknown dirty log mode %d", mode);
    if ((mode == PC_KVM_LOG_RING) != (vm->ring_entries != 0) && mode != PC_KVM_LOG_OFF)
        return fail(vm, -EINVAL, vm->ring_entries ? "this VM logs to its dirty ring only"
                                                  : "this VM was made without a dirty ring");
    int rc = 0;
    if (vm->log_mode != PC_KVM_LOG_OFF) { /* off first: a restart is a fresh epoch */
        rc = set_slot(vm, SLOT_RAM, PC_KVM_RAM_GPA, vm->ram_size, vm->ram, 0);
        if (rc)
            return fail(vm, rc, "RAM memslot, dirty log off: %s", strerror(-rc));
        vm->log_mode = PC_KVM_LOG_OFF;
    }
    if (mode == PC_KVM_LOG_OFF)
        return 0;
    if (!vm->ring_entries && (rc = set_manual_protect(vm, mode == PC_KVM_LOG_CLEAR)))
        return rc;
    if (mode == PC_KVM_LOG_RING) { /* drop what an earlier epoch left */
        if ((rc = pc_kvm_ring_collect(vm)))
            return rc;
        pthread_mutex_lock(&vm->ring_lock);
        memset(vm->pending, 0, vm->bitmap_words * 8);
        pthread_mutex_unlock(&vm->ring_lock);
    }
    rc = set_slot(vm, SLOT_RAM, PC_KVM_RAM_GPA, vm->ram_size, vm->ram, KVM_MEM_LOG_DIRTY_PAGES);
    if (rc)
        return fail(vm, rc, "RAM memslot with KVM_MEM_LOG_DIRTY_PAGES: %s", strerror(-rc));
    vm->log_mode = mode;
    return 0;
}

static int get_log(struct pc_kvm *vm)
{
    struct kvm_dirty_log log = {.slot = SLOT_RAM, .dirty_bitmap = vm->snap};
    if (ioctl(vm->vm_fd, KVM_GET_DIRTY_LOG, &log))
        return fail(vm, -errno, "KVM_GET_DIRTY_LOG: %s", strerror(errno));
    return 0;
}

/* Re-protect exactly the pages in snap, PC_KVM_CLEAR_CHUNK pages per ioctl, skipping
 * chunks without a dirty page. */
static int clear_log(struct pc_kvm *vm)
{
    const uint64_t words = PC_KVM_CLEAR_CHUNK / 64;
    for (uint64_t w = 0; w < vm->bitmap_words; w += words) {
        uint64_t end = w + words < vm->bitmap_words ? w + words : vm->bitmap_words, any = 0;
        for (uint64_t k = w; k < end; k++)
            any |= vm->snap[k];
        if (!any)
            continue;
        uint64_t first = w * 64, num = end * 64 > vm->npages ? vm->npages - first : (end - w) * 64;
        struct kvm_clear_dirty_log c = {.slot = SLOT_RAM, .num_pages = (uint32_t)num, .first_page = first,
                                        .dirty_bitmap = vm->snap + w};
        if (ioctl(vm->vm_fd, KVM_CLEAR_DIRTY_LOG, &c))
            return fail(vm, -errno, "KVM_CLEAR_DIRTY_LOG: %s", strerror(errno));
    }
    return 0;
}

int64_t pc_kvm_dirty_harvest(struct pc_kvm *vm, uint64_t *t)
{
    uint64_t t0 = pc_kvm_now_ns();
    int rc = 0;
    t[0] = t[1] = 0;
    switch (vm->log_mode) {
    case PC_KVM_LOG_BITMAP:
        rc = get_log(vm);
        break;
    case PC_KVM_LOG_CLEAR:
        rc = get_log(vm);
        t[0] = pc_kvm_now_ns() - t0;
        if (!rc)
            rc = clear_log(vm);
        t[1] = pc_kvm_now_ns() - t0 - t[0];
        break;
    case PC_KVM_LOG_RING:
        pthread_mutex_lock(&vm->ring_lock);
        rc = ring_collect_locked(vm);
        if (!rc) {
            memcpy(vm->snap, vm->pending, vm->bitmap_words * 8);
            memset(vm->pending, 0, vm->bitmap_words * 8);
        }
        pthread_mutex_unlock(&vm->ring_lock);
        break;
    default:
        return fail(vm, -EINVAL, "the dirty log is off");
    }
    if (rc)
        return rc;
    if (vm->log_mode != PC_KVM_LOG_CLEAR)
        t[0] = pc_kvm_now_ns() - t0;
    int64_t n = 0;
    for (uint64_t k = 0; k < vm->bitmap_words; k++)
        n += __builtin_popcountll(vm->snap[k]);
    return n;
}

int64_t pc_kvm_dirty_runs(struct pc_kvm *vm, uint64_t *runs, uint64_t max_runs, uint64_t *next)
{
    uint64_t pg = *next, n = 0;
    const uint64_t *bm = vm->snap;
    while (pg < vm->npages) {
        uint64_t w = bm[pg >> 6] >> (pg & 63);
        if (!w) { /* skip to the next word */
            pg = (pg | 63) + 1;
            continue;
        }
        pg += (uint64_t)__builtin_ctzll(w);
        if (pg >= vm->npages)
            break;
        if (n == max_runs)
            break;
        uint64_t start = pg;
        while (pg < vm->npages && (bm[pg >> 6] >> (pg & 63)) & 1)
            pg++;
        runs[2 * n] = start;
        runs[2 * n + 1] = pg - start;
        n++;
    }
    *next = pg < vm->npages ? pg : vm->npages;
    return (int64_t)n;
}
