/* kvm_layout: guest-physical layout of the KVM micro-VM, shared by the host side
 * (kvm_vm.c) and the guest code (kvm_guest/guest.c).
 *
 * Two memslots. Slot 0, the "firmware" slot at GPA 0, is process memory built afresh
 * on every host (GDT, page tables, code, per-vCPU mailboxes and stacks, the touch list):
 * never logged, never migrated. Slot 1 is guest RAM, the same region (memfd or
 * anonymous) a process guest uses, at PC_KVM_RAM_GPA; only it is dirty-logged. Every
 * page is identity mapped (virtual = guest physical) with 2 MiB pages whose accessed and
 * dirty bits are preset, so the guest's page-table walks write nothing, and the page
 * tables, being in slot 0, can never show up in RAM's dirty log.
 */
#ifndef PC_KVM_LAYOUT_H
#define PC_KVM_LAYOUT_H

#include <stdint.h>

#define PC_KVM_GDT_GPA 0x0000ULL
#define PC_KVM_PML4_GPA 0x1000ULL
#define PC_KVM_PDPT_GPA 0x2000ULL
#define PC_KVM_PD_GPA 0x3000ULL      /* one page directory per GiB of address space */
#define PC_KVM_MAX_PD 64             /* so GPA below 64 GiB */
#define PC_KVM_PAUSE_GPA 0x50000ULL  /* the shared pause word (int) */
#define PC_KVM_MAILBOX_GPA 0x51000ULL
#define PC_KVM_CODE_GPA 0x60000ULL
#define PC_KVM_CODE_MAX 0x10000ULL
#define PC_KVM_STACK_GPA 0x70000ULL
#define PC_KVM_STACK_SIZE 0x4000ULL
#define PC_KVM_MAX_VCPUS 58          /* 56 vCPUs + the service vCPU (touch), rounded */
#define PC_KVM_LIST_GPA 0x200000ULL  /* page list of the touch command */
#define PC_KVM_LIST_MAX (0x200000ULL / 8)
#define PC_KVM_FW_SIZE 0x400000ULL
#define PC_KVM_RAM_GPA 0x40000000ULL /* 1 GiB */

#define PC_KVM_CMD_STEPS 1
#define PC_KVM_CMD_TOUCH 2

/* One per vCPU at PC_KVM_MAILBOX_GPA + tid * sizeof. Written by the host before a pass
 * (cmd .. list_len, seq), by the guest during it (steps_done, done). */
struct pc_kvm_mailbox {
    uint64_t cmd;
    uint64_t tid;
    uint64_t ram_gpa;
    uint64_t page_size;
    uint64_t pause_gpa;
    uint64_t limit;      /* STEPS: stop when the state page's counter reaches it */
    uint64_t now_ns;     /* STEPS: heartbeat stored with each step (host clock at entry) */
    uint64_t list_gpa;   /* TOUCH: page indexes (uint64) */
    uint64_t list_len;
    uint64_t seq;        /* pass number, echoed in done when the pass ends */
    uint64_t steps_done; /* STEPS: the counter after the latest step */
    uint64_t done;
    uint64_t pad[4];
};

#endif /* PC_KVM_LAYOUT_H */
