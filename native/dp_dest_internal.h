/* dp_dest's table struct, shared by its table (dp_dest.c) and its loops (dp_dest_io.c). */
#ifndef PC_DP_DEST_INTERNAL_H
#define PC_DP_DEST_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "dp_dest_limits.h"

struct pc_frame_auth;

enum { DP_MISSING, DP_REQUESTED, DP_PRESENT, DP_ZERO, DP_REMOVED };

struct dp_waiter {
	uint64_t page;
	int64_t ns; /* when its fault was read */
};

/* A page run being received straight into the page cache (the continue path's one-copy
 * receive, dp_recv_cont.c): page first + i holds bytes not yet authenticated while
 * where[i] & DP_IN_CACHE. Such a page is claimed: no other install writes it, and
 * whatever takes it out of MISSING/REQUESTED meanwhile (a REMOVE, a zero range) punches
 * it out of the page cache first. Read and written under the gate. */
#define DP_CLAIM_SLOTS 2
#define DP_IN_CACHE 1
#define DP_IN_SCRATCH 2
struct dp_claim {
	uint64_t first, npages; /* npages 0: the slot is free */
	const uint8_t *where;
};

struct dp_fault {
	int64_t ns;
	double us;
};

struct pc_dp_table {
	pthread_mutex_t lock; /* everything below but the attach fields and flags */
	pthread_mutex_t gate; /* installs vs the reading of uffd events */
	pthread_cond_t all_in_cond;
	uint64_t npages;
	uint8_t *state;
	uint64_t in;
	uint8_t legal[PC_DP_NSTATES][PC_DP_NSTATES];
	int zero_cause;
	uint64_t pages[PC_DP_MAX_CAUSES];
	uint64_t removed_by_guest;
	struct dp_waiter *waiting;
	size_t nwaiting, cap_waiting;
	struct dp_fault *faults;
	size_t nfaults, cap_faults;
	int64_t tl_start, tl_bucket;
	uint64_t *tl; /* tl_len rows of PC_DP_MAX_CAUSES */
	size_t tl_len, tl_cap;
	/* set once by pc_dp_attach, before any loop runs */
	int uffd, ram_fd, memfd;
	uint64_t base, ps, ram_fd_base;
	atomic_int stop, switched;
	struct dp_claim claims[DP_CLAIM_SLOTS]; /* under the gate */
	/* the urgent channel's send side, while lent (fd -1: Python's) */
	pthread_mutex_t urgent_lock;
	int urgent_fd;
	void *auth; /* struct pc_frame_auth *, or NULL: frames carry no tag */
	uint64_t seq, requests_sent;
	uint8_t request[PC_DP_REQUEST_BYTES];
};

int64_t dp_now_ns(void);
/* Page p is claimed (see struct dp_claim) by a slot other than `except` (-1: any). Gate held. */
int dp_claimed(const struct pc_dp_table *t, uint64_t p, int except);
/* Punches the pages of [lo, hi) claimed by slot (-1: any) that are MISSING or REQUESTED out of the page
 * cache (their bytes are not authenticated: nothing may map them). Gate held. 0 or < 0. */
int dp_punch_claimed(struct pc_dp_table *t, uint64_t lo, uint64_t hi, int slot);
/* Sets this thread's error line; returns code. */
int dp_fail(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif /* PC_DP_DEST_INTERNAL_H */
