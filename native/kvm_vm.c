/* kvm_vm: the KVM micro-VM guest: VM, vCPUs in 64-bit mode, passes of guest code.
 * See kvm_vm.h and kvm_layout.h; the dirty logs are in kvm_dirtylog.c, the basic
 * helpers (errors, memslots, clock) in kvm_core.c. */
#define _GNU_SOURCE

#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "kvm_core.h"
#include "kvm_dirtylog.h"
#include "kvm_guest_code.h"
#include "kvm_vm.h"

_Static_assert(sizeof(pc_kvm_guest_code) <= PC_KVM_CODE_MAX, "guest code overflows its area");
_Static_assert(sizeof(struct pc_kvm_mailbox) == 128, "mailbox layout");
_Static_assert(PC_KVM_MAILBOX_GPA + PC_KVM_MAX_VCPUS * 128 <= PC_KVM_CODE_GPA, "mailboxes overlap code");
_Static_assert(PC_KVM_STACK_GPA + PC_KVM_MAX_VCPUS * PC_KVM_STACK_SIZE <= PC_KVM_LIST_GPA, "stacks overlap list");

#define fail pc_kvm_fail
#define set_slot pc_kvm_set_slot
#define PTE_P 0x1ULL
#define PTE_RW 0x2ULL
#define PTE_A 0x20ULL
#define PTE_D 0x40ULL
#define PTE_PS 0x80ULL
#define PASS_TARGET_NS 2000000ULL /* an unpaced pass lasts about this long */
#define PACE_CATCH_UP_NS 2000000ULL

const char *pc_kvm_error(struct pc_kvm *vm) { return vm->err; }
int *pc_kvm_pause_flag(struct pc_kvm *vm) { return (int *)(vm->fw + PC_KVM_PAUSE_GPA); }

static struct pc_kvm_mailbox *mailbox(struct pc_kvm *vm, int idx)
{
    return (struct pc_kvm_mailbox *)(vm->fw + PC_KVM_MAILBOX_GPA) + idx;
}

/* GDT, identity page tables (2 MiB pages, A and D preset), code, mailboxes. */
static void build_firmware(struct pc_kvm *vm)
{
    uint64_t *gdt = (uint64_t *)(vm->fw + PC_KVM_GDT_GPA);
    gdt[1] = 0x00af9b000000ffffULL; /* 0x08: 64-bit code, present, DPL 0 */
    gdt[2] = 0x00cf93000000ffffULL; /* 0x10: data, present, writable */
    uint64_t *pml4 = (uint64_t *)(vm->fw + PC_KVM_PML4_GPA);
    uint64_t *pdpt = (uint64_t *)(vm->fw + PC_KVM_PDPT_GPA);
    pml4[0] = PC_KVM_PDPT_GPA | PTE_P | PTE_RW | PTE_A;
    uint64_t top = PC_KVM_RAM_GPA + vm->ram_size;
    uint64_t npd = (top + (1ULL << 30) - 1) >> 30;
    for (uint64_t i = 0; i < npd; i++) {
        uint64_t *pd = (uint64_t *)(vm->fw + PC_KVM_PD_GPA + i * 0x1000);
        pdpt[i] = (PC_KVM_PD_GPA + i * 0x1000) | PTE_P | PTE_RW | PTE_A;
        for (uint64_t j = 0; j < 512; j++)
            pd[j] = ((i << 30) | (j << 21)) | PTE_P | PTE_RW | PTE_PS | PTE_A | PTE_D;
    }
    memcpy(vm->fw + PC_KVM_CODE_GPA, pc_kvm_guest_code, sizeof(pc_kvm_guest_code));
    for (int i = 0; i < vm->nvcpu; i++) {
        struct pc_kvm_mailbox *mb = mailbox(vm, i);
        mb->tid = (uint64_t)i;
        mb->ram_gpa = PC_KVM_RAM_GPA;
        mb->page_size = vm->page_size;
        mb->pause_gpa = PC_KVM_PAUSE_GPA;
        mb->list_gpa = PC_KVM_LIST_GPA;
    }
}

/* 64-bit mode from the first instruction: long mode, paging, flat segments. */
static int setup_vcpu(struct pc_kvm *vm, int idx, struct kvm_cpuid2 *cpuid)
{
    int fd = vm->vcpu_fd[idx];
    if (ioctl(fd, KVM_SET_CPUID2, cpuid))
        return fail(vm, -errno, "KVM_SET_CPUID2: %s", strerror(errno));
    struct kvm_sregs s;
    if (ioctl(fd, KVM_GET_SREGS, &s))
        return fail(vm, -errno, "KVM_GET_SREGS: %s", strerror(errno));
    struct kvm_segment code = {.base = 0, .limit = 0xffffffff, .selector = 0x08, .type = 11, .present = 1,
                               .dpl = 0, .db = 0, .s = 1, .l = 1, .g = 1};
    struct kvm_segment data = code;
    data.selector = 0x10;
    data.type = 3;
    data.l = 0;
    data.db = 1;
    s.cs = code;
    s.ds = s.es = s.fs = s.gs = s.ss = data;
    s.gdt.base = PC_KVM_GDT_GPA;
    s.gdt.limit = 3 * 8 - 1;
    s.cr3 = PC_KVM_PML4_GPA;
    s.cr4 = 0x20;                /* PAE */
    s.cr0 = 0x80050033;          /* PG WP NE ET MP PE */
    s.efer = 0x500;              /* LMA LME */
    if (ioctl(fd, KVM_SET_SREGS, &s))
        return fail(vm, -errno, "KVM_SET_SREGS (long mode): %s", strerror(errno));
    struct kvm_regs r;
    memset(&r, 0, sizeof(r));
    r.rip = PC_KVM_CODE_GPA;
    r.rsp = PC_KVM_STACK_GPA + (uint64_t)(idx + 1) * PC_KVM_STACK_SIZE;
    r.rdi = PC_KVM_MAILBOX_GPA + (uint64_t)idx * sizeof(struct pc_kvm_mailbox);
    r.rflags = 2;
    if (ioctl(fd, KVM_SET_REGS, &r))
        return fail(vm, -errno, "KVM_SET_REGS: %s", strerror(errno));
    return 0;
}

static struct kvm_cpuid2 *supported_cpuid(struct pc_kvm *vm)
{
    for (int n = 64; n <= 4096; n *= 2) {
        struct kvm_cpuid2 *c = calloc(1, sizeof(*c) + (size_t)n * sizeof(struct kvm_cpuid_entry2));
        if (!c)
            return NULL;
        c->nent = (uint32_t)n;
        if (ioctl(vm->kvm_fd, KVM_GET_SUPPORTED_CPUID, c) == 0)
            return c;
        free(c);
        if (errno != E2BIG) {
            fail(vm, 0, "KVM_GET_SUPPORTED_CPUID: %s", strerror(errno));
            return NULL;
        }
    }
    return NULL;
}

static int create_vcpus(struct pc_kvm *vm)
{
    struct kvm_cpuid2 *cpuid = supported_cpuid(vm);
    if (!cpuid)
        return -EIO;
    int rc = 0;
    for (int i = 0; i < vm->nvcpu && !rc; i++) {
        vm->vcpu_fd[i] = ioctl(vm->vm_fd, KVM_CREATE_VCPU, i);
        if (vm->vcpu_fd[i] < 0) {
            rc = fail(vm, -errno, "KVM_CREATE_VCPU %d: %s", i, strerror(errno));
            break;
        }
        void *p = mmap(NULL, vm->run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vm->vcpu_fd[i], 0);
        if (p == MAP_FAILED) {
            rc = fail(vm, -errno, "mmap kvm_run: %s", strerror(errno));
            break;
        }
        vm->run[i] = p;
        if (vm->ring_entries) {
            size_t bytes = (size_t)vm->ring_entries * sizeof(struct kvm_dirty_gfn);
            p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, vm->vcpu_fd[i],
                     (off_t)KVM_DIRTY_LOG_PAGE_OFFSET * sysconf(_SC_PAGESIZE));
            if (p == MAP_FAILED) {
                rc = fail(vm, -errno, "mmap dirty ring at KVM_DIRTY_LOG_PAGE_OFFSET: %s", strerror(errno));
                break;
            }
            vm->ring[i] = p;
        }
        rc = setup_vcpu(vm, i, cpuid);
    }
    free(cpuid);
    return rc;
}

static int open_vm(struct pc_kvm *vm)
{
    vm->kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (vm->kvm_fd < 0)
        return fail(vm, -errno, "/dev/kvm: %s", strerror(errno));
    if (ioctl(vm->kvm_fd, KVM_GET_API_VERSION, 0) != KVM_API_VERSION)
        return fail(vm, -EINVAL, "/dev/kvm: unexpected KVM API version");
    int sz = ioctl(vm->kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (sz <= 0)
        return fail(vm, -EINVAL, "KVM_GET_VCPU_MMAP_SIZE failed");
    vm->run_size = (size_t)sz;
    vm->vm_fd = ioctl(vm->kvm_fd, KVM_CREATE_VM, 0);
    if (vm->vm_fd < 0)
        return fail(vm, -errno, "KVM_CREATE_VM: %s", strerror(errno));
    if (vm->ring_entries) {
        int max = ioctl(vm->vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_DIRTY_LOG_RING);
        uint64_t bytes = (uint64_t)vm->ring_entries * sizeof(struct kvm_dirty_gfn);
        if (max <= 0)
            return fail(vm, -EOPNOTSUPP, "KVM_CAP_DIRTY_LOG_RING not offered by this KVM");
        if (bytes > (uint64_t)max || (vm->ring_entries & (vm->ring_entries - 1)))
            return fail(vm, -EINVAL, "dirty ring of %u entries: want a power of two up to %d bytes",
                        vm->ring_entries, max);
        struct kvm_enable_cap cap = {.cap = KVM_CAP_DIRTY_LOG_RING, .args = {bytes}};
        if (ioctl(vm->vm_fd, KVM_ENABLE_CAP, &cap))
            return fail(vm, -errno, "KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING): %s", strerror(errno));
    }
    int rc = set_slot(vm, SLOT_FW, 0, PC_KVM_FW_SIZE, vm->fw, 0);
    if (rc)
        return fail(vm, rc, "firmware memslot: %s", strerror(-rc));
    rc = set_slot(vm, SLOT_RAM, PC_KVM_RAM_GPA, vm->ram_size, vm->ram, 0);
    if (rc)
        return fail(vm, rc, "RAM memslot: %s", strerror(-rc));
    return create_vcpus(vm);
}

struct pc_kvm *pc_kvm_new(void *ram, uint64_t ram_size, int threads, uint32_t ring_entries, char *err,
                          int errlen)
{
    struct pc_kvm *vm = calloc(1, sizeof(*vm));
    if (!vm) {
        snprintf(err, (size_t)errlen, "out of memory");
        return NULL;
    }
    vm->kvm_fd = vm->vm_fd = -1;
    for (int i = 0; i < PC_KVM_MAX_VCPUS; i++)
        vm->vcpu_fd[i] = -1;
    vm->page_size = (uint64_t)sysconf(_SC_PAGESIZE);
    vm->ram = ram;
    vm->ram_size = ram_size;
    vm->npages = ram_size / vm->page_size;
    vm->nvcpu = threads + 1;
    vm->ring_entries = ring_entries;
    vm->bitmap_words = (vm->npages + 63) / 64;
    pthread_mutex_init(&vm->ring_lock, NULL);
    pthread_mutex_init(&vm->service_lock, NULL);
    int rc = 0;
    if (threads < 1 || vm->nvcpu > PC_KVM_MAX_VCPUS)
        rc = fail(vm, -EINVAL, "KVM guest: 1..%d vCPUs", PC_KVM_MAX_VCPUS - 1);
    else if (ram_size % vm->page_size || !ram_size || PC_KVM_RAM_GPA + ram_size > ((uint64_t)PC_KVM_MAX_PD << 30))
        rc = fail(vm, -EINVAL, "KVM guest: RAM must be page aligned and at most %llu MiB",
                  (unsigned long long)((((uint64_t)PC_KVM_MAX_PD << 30) - PC_KVM_RAM_GPA) >> 20));
    if (!rc) {
        vm->fw = mmap(NULL, PC_KVM_FW_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        vm->pending = calloc(vm->bitmap_words, 8);
        vm->snap = calloc(vm->bitmap_words, 8);
        if (vm->fw == MAP_FAILED || !vm->pending || !vm->snap) {
            if (vm->fw == MAP_FAILED)
                vm->fw = NULL;
            rc = fail(vm, -ENOMEM, "out of memory");
        }
    }
    if (!rc) {
        build_firmware(vm);
        rc = open_vm(vm);
    }
    if (rc) {
        snprintf(err, (size_t)errlen, "%s", vm->err);
        pc_kvm_free(vm);
        return NULL;
    }
    return vm;
}

void pc_kvm_free(struct pc_kvm *vm)
{
    if (!vm)
        return;
    for (int i = 0; i < PC_KVM_MAX_VCPUS; i++) {
        if (vm->ring[i])
            munmap(vm->ring[i], (size_t)vm->ring_entries * sizeof(struct kvm_dirty_gfn));
        if (vm->run[i])
            munmap(vm->run[i], vm->run_size);
        if (vm->vcpu_fd[i] >= 0)
            close(vm->vcpu_fd[i]);
    }
    if (vm->vm_fd >= 0)
        close(vm->vm_fd);
    if (vm->kvm_fd >= 0)
        close(vm->kvm_fd);
    if (vm->fw)
        munmap(vm->fw, PC_KVM_FW_SIZE);
    free(vm->pending);
    free(vm->snap);
    pthread_mutex_destroy(&vm->ring_lock);
    pthread_mutex_destroy(&vm->service_lock);
    free(vm);
}

/* ---- running passes ----------------------------------------------------------------- */

/* KVM_RUN until the guest halts at the end of the pass. */
static int run_pass(struct pc_kvm *vm, int idx)
{
    struct kvm_run *run = vm->run[idx];
    for (;;) {
        if (ioctl(vm->vcpu_fd[idx], KVM_RUN, 0) < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            return fail(vm, PC_KVM_ERUN, "KVM_RUN (vCPU %d): %s", idx, strerror(errno));
        }
        switch (run->exit_reason) {
        case KVM_EXIT_HLT:
            return 0;
        case KVM_EXIT_DIRTY_RING_FULL:
            if (pc_kvm_ring_collect(vm))
                return PC_KVM_ERUN;
            continue;
        case KVM_EXIT_INTR:
            continue;
        case KVM_EXIT_INTERNAL_ERROR:
            return fail(vm, PC_KVM_EEXIT, "vCPU %d: KVM internal error, suberror %u (emulation failed?)", idx,
                        run->internal.suberror);
        case KVM_EXIT_SHUTDOWN:
            return fail(vm, PC_KVM_EEXIT, "vCPU %d: triple fault (shutdown)", idx);
        default:
            return fail(vm, PC_KVM_EEXIT, "vCPU %d: unexpected exit reason %u", idx, run->exit_reason);
        }
    }
}

static void note_progress(struct pc_vcpu_local *local, uint64_t steps, uint64_t now)
{
    const uint64_t prev = __atomic_load_n(&local->last_step_ns, __ATOMIC_RELAXED);
    if (prev && now > prev) {
        uint64_t gap = now - prev, max = __atomic_load_n(&local->max_gap_ns, __ATOMIC_RELAXED);
        while (gap > max && !__atomic_compare_exchange_n(&local->max_gap_ns, &max, gap, 1, __ATOMIC_RELAXED,
                                                         __ATOMIC_RELAXED))
            ;
    }
    if (!__atomic_load_n(&local->first_step_ns, __ATOMIC_RELAXED))
        __atomic_store_n(&local->first_step_ns, now, __ATOMIC_RELAXED);
    __atomic_store_n(&local->steps_done, steps, __ATOMIC_RELAXED);
    __atomic_store_n(&local->last_step_ns, now, __ATOMIC_RELEASE);
}

static int pace(uint64_t deadline, volatile int *pause_flag)
{
    for (;;) {
        if (__atomic_load_n(pause_flag, __ATOMIC_ACQUIRE))
            return 1;
        uint64_t now = pc_kvm_now_ns();
        if (now >= deadline)
            return 0;
        uint64_t until = deadline - now > 10000000ULL ? now + 10000000ULL : deadline;
        struct timespec ts = {.tv_sec = (time_t)(until / 1000000000ULL), .tv_nsec = (long)(until % 1000000000ULL)};
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
    }
}

/* The dirty ring must never overflow. KVM stops a vCPU at the ring's soft limit
 * (KVM_EXIT_DIRTY_RING_FULL) only when it re-enters the guest; a guest run through KVM's
 * instruction emulator (small guests on this kind of nested host) writes on without
 * re-entering, and past the hard limit KVM drops entries (a WARN in
 * kvm_dirty_ring_push). So between two collections a vCPU writes at most a quarter of
 * its ring in distinct pages: passes are capped and the vCPU collects its ring itself. */
static uint64_t ring_budget(const struct pc_kvm *vm) { return vm->ring_entries / 4; }

int pc_kvm_vcpu_run(struct pc_kvm *vm, int tid, uint64_t limit, struct pc_vcpu_local *local)
{
    struct pc_guest_info info;
    int rc = pc_guest_check(vm->ram, vm->ram_size, vm->page_size, &info);
    if (rc)
        return rc;
    if (tid < 0 || (uint32_t)tid >= info.threads || tid >= vm->nvcpu - 1)
        return PC_GUEST_EPARAM;
    if (info.free_fraction > 0.0)
        return fail(vm, PC_KVM_EFREE, "the KVM guest has no free pages (--free-fraction)");
    double rate = info.rate;
    if (rate <= 0.0 && info.workload == PC_WL_IDLE)
        rate = 1000.0;
    const uint64_t interval = rate > 0.0 ? (uint64_t)(1e9 / rate) : 0;
    volatile int *pause = pc_kvm_pause_flag(vm);
    struct pc_kvm_mailbox *mb = mailbox(vm, tid);
    uint64_t steps = ((const struct pc_vcpu_state *)(vm->ram + PC_GUEST_VCPU_OFFSET))[tid].steps_done;
    uint64_t batch = interval ? 1 + 1000000ULL / interval : 16; /* paced: ~1 ms of steps per pass */
    uint64_t next = pc_kvm_now_ns();
    uint64_t pushed = 0; /* ring: entries this vCPU may have pushed since it collected (<= 2 a step) */
    __atomic_store_n(&local->first_step_ns, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&local->steps_done, steps, __ATOMIC_RELAXED);
    while (steps < limit) {
        if (__atomic_load_n(pause, __ATOMIC_ACQUIRE))
            return PC_VCPU_PAUSED;
        if (interval && pace(next, pause))
            return PC_VCPU_PAUSED;
        uint64_t pass = batch;
        if (vm->ring_entries) {
            pass = batch < ring_budget(vm) / 4 ? batch : ring_budget(vm) / 4;
            if (pushed + 2 * pass + 1 > ring_budget(vm)) {
                if ((rc = pc_kvm_ring_collect(vm)))
                    return rc;
                pushed = 0;
            }
            pushed += 2 * pass + 1;
        }
        uint64_t t0 = pc_kvm_now_ns();
        mb->cmd = PC_KVM_CMD_STEPS;
        mb->limit = limit - steps < pass ? limit : steps + pass;
        mb->now_ns = t0;
        mb->seq++;
        rc = run_pass(vm, tid);
        if (rc)
            return rc;
        uint64_t t1 = pc_kvm_now_ns(), done = mb->steps_done;
        if (done > steps)
            note_progress(local, done, t1);
        if (interval) {
            next += (done - steps) * interval;
            if (t1 > next + PACE_CATCH_UP_NS)
                next = t1;
        } else if (done - steps == pass && pass == batch) { /* aim at PASS_TARGET_NS per pass */
            uint64_t want = t1 > t0 ? batch * PASS_TARGET_NS / (t1 - t0) : batch * 2;
            batch = want < 1 ? 1 : want > batch * 2 ? batch * 2 : want > (1ULL << 24) ? (1ULL << 24) : want;
        }
        steps = done;
    }
    return PC_VCPU_LIMIT;
}

int pc_kvm_touch(struct pc_kvm *vm, const uint64_t *pages, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++)
        if (pages[i] >= vm->npages)
            return fail(vm, -EINVAL, "touch: page %llu beyond RAM", (unsigned long long)pages[i]);
    int svc = vm->nvcpu - 1, rc = 0;
    struct pc_kvm_mailbox *mb = mailbox(vm, svc);
    const uint64_t chunk = vm->ring_entries ? ring_budget(vm) : PC_KVM_LIST_MAX; /* see ring_budget */
    pthread_mutex_lock(&vm->service_lock);
    for (uint64_t off = 0; off < n && !rc; off += chunk) {
        uint64_t len = n - off < chunk ? n - off : chunk;
        if (vm->ring_entries && off && (rc = pc_kvm_ring_collect(vm)))
            break;
        memcpy(vm->fw + PC_KVM_LIST_GPA, pages + off, len * 8);
        mb->cmd = PC_KVM_CMD_TOUCH;
        mb->list_len = len;
        mb->seq++;
        rc = run_pass(vm, svc);
    }
    pthread_mutex_unlock(&vm->service_lock);
    return rc;
}

int pc_kvm_vcpu_runner(void *ctx, int tid, uint64_t limit, struct pc_vcpu_local *local)
{
    return pc_kvm_vcpu_run(ctx, tid, limit, local);
}
