/* kvm_guest/guest.c: the code that runs INSIDE the KVM micro-VM (freestanding x86-64).
 *
 * NOT part of the cffi build (that compiles native/ *.c only): scripts/gen-kvm-guest compiles it with
 * gcc -ffreestanding into a flat binary linked at PC_KVM_CODE_GPA and writes the bytes,
 * with the disassembly as comments, to native/kvm_guest_code.h, which kvm_vm.c embeds.
 * Regenerate after any change here (a test checks that the header matches).
 *
 * The vCPU enters at _start with %rdi = its mailbox (struct pc_kvm_mailbox, in the
 * firmware slot, not in guest RAM). Each pass runs one command and halts (KVM_EXIT_HLT);
 * the host re-enters with KVM_RUN and the next pass reads the mailbox again. All guest
 * state lives in guest RAM (state page: step counter, RNG, heartbeat), so a pass can be
 * started on any host: there are no registers to migrate.
 *
 * The step is exactly pc_vcpu_run's (native/guest_vm.c) without the free-page swap: the
 * RAM after K steps is the same as the process guest's, byte for byte.
 */
#include <stdint.h>

#include "../guest_vm.h"
#include "../kvm_layout.h"

__asm__(".section .text.entry,\"ax\"\n"
        ".globl _start\n"
        "_start:\n"
        "  mov %rdi, %r15\n"          /* r15 is callee-saved: survives guest_main */
        "1: mov %r15, %rdi\n"
        "  call guest_main\n"
        "  hlt\n"                    /* KVM_EXIT_HLT: the pass is over */
        "  jmp 1b\n"
        ".text\n");

static inline uint64_t rotl64(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
static inline uint64_t mulhi(uint64_t r, uint64_t n) { return (uint64_t)(((unsigned __int128)r * n) >> 64); }

static void run_steps(volatile struct pc_kvm_mailbox *mb)
{
    char *ram = (char *)mb->ram_gpa;
    const struct pc_guest_hdr *h = (const struct pc_guest_hdr *)ram;
    const uint64_t tid = mb->tid, limit = mb->limit;
    const volatile int *pause = (const volatile int *)mb->pause_gpa;
    const uint64_t page_size = h->page_size;
    const uint64_t words_mask = page_size / 8 - 1;
    int page_shift = 0; /* log2(words per page), without tzcnt/bsf */
    while ((8ULL << page_shift) < page_size)
        page_shift++;
    const uint64_t *shared = (const uint64_t *)(ram + h->shared_off);
    const uint64_t shared_words = h->shared_len / 8;
    uint64_t *slice = (uint64_t *)(ram + h->slice_off + tid * h->slice_len);
    const uint64_t used = h->ws_pages, hot = h->hot_pages;
    const uint32_t wl = h->workload;
    struct pc_vcpu_state *v = (struct pc_vcpu_state *)(ram + PC_GUEST_VCPU_OFFSET) + tid;
    uint64_t s0 = v->rng[0], s1 = v->rng[1], s2 = v->rng[2], s3 = v->rng[3];
    uint64_t steps = v->steps_done;
    uint64_t seq = steps % used;

    while (steps < limit && !*pause) {
        const uint64_t r = rotl64(s1 * 5, 7) * 9; /* xoshiro256** */
        const uint64_t t = s1 << 17;
        s2 ^= s0;
        s3 ^= s1;
        s1 ^= s2;
        s0 ^= s3;
        s2 ^= t;
        s3 = rotl64(s3, 45);
        const uint64_t sh = ((const volatile uint64_t *)shared)[mulhi(rotl64(r, 21), shared_words)];
        uint64_t page;
        if (wl == PC_WL_RANDOM_WRITE) {
            page = mulhi(r, used);
        } else if (wl == PC_WL_SEQUENTIAL) {
            page = seq;
            if (++seq == used)
                seq = 0;
        } else if (wl == PC_WL_HOTSPOT) {
            page = ((r >> 9) & 1023) < 922 ? mulhi(r, hot) : mulhi(r, used);
        } else {
            page = UINT64_MAX;
        }
        if (page != UINT64_MAX)
            ((volatile uint64_t *)slice)[(page << page_shift) | (r & words_mask)] += r ^ sh;
        steps++;
        v->rng[0] = s0;
        v->rng[1] = s1;
        v->rng[2] = s2;
        v->rng[3] = s3;
        ((volatile struct pc_vcpu_state *)v)->steps_done = steps;
        ((volatile struct pc_vcpu_state *)v)->heartbeat_ns = mb->now_ns;
        mb->steps_done = steps; /* the host reads progress here, never in guest RAM */
    }
    mb->steps_done = steps;
}

/* A write that leaves each listed page unchanged (atomic OR of 0 into its first word),
 * as pc_guest_touch does from the host: but made by the guest, so KVM logs it. */
static void touch_pages(volatile struct pc_kvm_mailbox *mb)
{
    const uint64_t *pages = (const uint64_t *)mb->list_gpa;
    const uint64_t n = mb->list_len, ps = mb->page_size;
    char *ram = (char *)mb->ram_gpa;
    for (uint64_t i = 0; i < n; i++)
        __atomic_fetch_or((uint64_t *)(ram + pages[i] * ps), 0, __ATOMIC_RELAXED);
}

void guest_main(volatile struct pc_kvm_mailbox *mb)
{
    if (mb->cmd == PC_KVM_CMD_STEPS)
        run_steps(mb);
    else if (mb->cmd == PC_KVM_CMD_TOUCH)
        touch_pages(mb);
    mb->done = mb->seq;
}
