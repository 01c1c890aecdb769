/*
 * dp_dest: the destination's page table and install gate in C, so the per-page and
 * per-fault work (installs, fault events) runs without the GIL.
 *
 * One struct pc_dp_table per migration holds a byte per page (the states of
 * postcopy.migration.pagetable.PageState), the count of pages in, pages in by cause,
 * the pages the guest removed, the pages threads wait on (with the ns their fault was
 * read) and the (fault ns, µs to wake) records, all behind its own mutex. A second
 * mutex is the install gate: installs hold it per piece, the fault loop while it reads
 * and handles one batch of events, so no install that checked a range lands after the
 * kernel's zap of that range (see migration/install.py).
 *
 * The legal-transition matrix comes from Python (PageTable's LEGAL) at creation.
 * Functions that can fail return a negative code; pc_dp_error() then says why (per
 * thread).
 */
#ifndef PC_DP_DEST_H
#define PC_DP_DEST_H

#include <stdint.h>

#include "dp_dest_limits.h"

struct pc_dp_table;

/* legal[old * 5 + new] != 0 when a page in state old may become new. tl_bucket_ns 0:
 * no timeline; zero_cause: the cause index of pages marked zero. NULL: no memory. */
struct pc_dp_table *pc_dp_table_new(uint64_t npages, const uint8_t *legal, int zero_cause,
                                    int64_t tl_start_ns, int64_t tl_bucket_ns);
void pc_dp_table_free(struct pc_dp_table *t);
/* The guest this table's pages live in (for installs and the fault loop). */
void pc_dp_attach(struct pc_dp_table *t, int uffd, uint64_t base, uint64_t page_size, int ram_fd,
                  uint64_t ram_fd_base, int memfd);
void pc_dp_set_stop(struct pc_dp_table *t);
void pc_dp_set_switched(struct pc_dp_table *t);
/* The last failure of this thread, as one line. */
const char *pc_dp_error(void);

/* Locks (for Python's context managers; C callers take them themselves). */
void pc_dp_lock(struct pc_dp_table *t);
void pc_dp_unlock(struct pc_dp_table *t);
void pc_dp_gate_lock(struct pc_dp_table *t);
void pc_dp_gate_unlock(struct pc_dp_table *t);

/* Reading. pc_dp_states: the state bytes themselves (read without the lock). */
uint8_t *pc_dp_states(struct pc_dp_table *t);
uint64_t pc_dp_count_in(struct pc_dp_table *t);
int pc_dp_all_in(struct pc_dp_table *t);
/* Waits up to timeout_ms for every page to be in: 1 if so, 0 if not yet. */
int pc_dp_wait_all_in(struct pc_dp_table *t, int timeout_ms);
uint64_t pc_dp_pages(struct pc_dp_table *t, int cause);
uint64_t pc_dp_removed_by_guest(struct pc_dp_table *t);
uint64_t pc_dp_nfaults(struct pc_dp_table *t);
/* Copies up to max fault records from index `from`; returns how many. */
uint64_t pc_dp_faults(struct pc_dp_table *t, uint64_t from, int64_t *ns, double *us, uint64_t max);
/* Pages threads wait on in [lo, hi): copies up to max, returns how many there are. */
uint64_t pc_dp_waiting(struct pc_dp_table *t, uint64_t lo, uint64_t hi, uint64_t *out, uint64_t max);
uint64_t pc_dp_timeline_len(struct pc_dp_table *t);
uint64_t pc_dp_timeline(struct pc_dp_table *t, int cause, uint64_t *out, uint64_t max);

/* Transitions (each takes the table lock unless _locked). */
int pc_dp_move_locked(struct pc_dp_table *t, uint64_t lo, uint64_t hi, int state);
int pc_dp_fault(struct pc_dp_table *t, uint64_t page, int64_t now);
int pc_dp_installed(struct pc_dp_table *t, uint64_t first, uint64_t count, int cause, int64_t now);
void pc_dp_woken(struct pc_dp_table *t, uint64_t page, int64_t now);
/* Returns the number of waiters in the range (their pages: up to max in out), or < 0. */
int64_t pc_dp_mark_zero(struct pc_dp_table *t, uint64_t first, uint64_t count, uint64_t *out, uint64_t max);
int pc_dp_removed(struct pc_dp_table *t, uint64_t first, uint64_t end, int by_guest);
int pc_dp_discard(struct pc_dp_table *t, uint64_t first, uint64_t count);

/* Copy path: installs pages [first, first+npages) from src in gated pieces of UFFDIO_COPY
 * (REMOVED pages skipped; EEXIST -> wake, or for overwrite a pwrite to ram_fd; a
 * changing mapping -> retry after the fault loop read its event). 0 or < 0. */
int pc_dp_install_copy(struct pc_dp_table *t, uint64_t first, uint64_t npages, uint64_t src, int cause,
                       int overwrite);
/* Zero-fills `page` (or wakes it when it is mapped already); records its waiter woken. */
int pc_dp_zero_fill(struct pc_dp_table *t, uint64_t page);

/*
 * The fault loop: polls the userfaultfd (spin != 0: busy-polls), reads events in
 * batches under the gate: REMOVE/UNMAP marks, zero fill of ZERO/REMOVED pages, wake of
 * PRESENT ones, settle (UFFDIO_CONTINUE, else wake) of minor faults on pages in
 * (minor_settle), and MISSING pages become REQUESTED. Returns when the stop flag is set
 * (0) or when pages must be asked for: n > 0 runs (first, count) in req (neighbours
 * coalesced; at most max_runs). < 0 on a failure.
 */
int pc_dp_fault_loop(struct pc_dp_table *t, int spin, int minor_settle, uint64_t *req, int max_runs);

/*
 * The urgent channel's send side, lent to the fault loop: while lent, the loop sends
 * each request run itself (a PageRequest frame made from the Python-encoded template,
 * tagged with auth, a struct pc_frame_auth or NULL, at sequence seq, then seq + 1) and
 * keeps serving; a failed send takes the channel back and returns PC_DP_LINK_LOST.
 * pc_dp_take_urgent returns the next sequence number (the Python sealer's from then on).
 */
void pc_dp_set_request_template(struct pc_dp_table *t, const uint8_t *frame);
void pc_dp_encode_request(struct pc_dp_table *t, uint64_t first, uint64_t npages, uint8_t *out);
void pc_dp_lend_urgent(struct pc_dp_table *t, int fd, void *auth, uint64_t seq);
uint64_t pc_dp_take_urgent(struct pc_dp_table *t);
uint64_t pc_dp_requests_sent(struct pc_dp_table *t);
/* Sends runs (first, count pairs) on the lent urgent channel: 1 if sent, 0 if it is
 * not lent, PC_DP_LINK_LOST if a send failed (then it is taken back). */
int pc_dp_send_requests(struct pc_dp_table *t, const uint64_t *req, int nruns);

#endif /* PC_DP_DEST_H */
