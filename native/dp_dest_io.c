/* dp_dest's loops: the copy path's gated install and the fault loop (see dp_dest.h). */
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "dp_dest.h"
#include "dp_dest_internal.h"
#include "frame_auth.h"
#include "fd_io.h"
#include "uffd_ops.h"

#define RETRY_PIECE (-1)
#define EVENTS_PER_READ 64

static int dp_send_requests(struct pc_dp_table *t, const uint64_t *req, int nruns);

/* First page of [lo, hi) in state, or hi. The gate is held: nothing marks REMOVED now. */
static uint64_t find_state(const struct pc_dp_table *t, uint8_t state, uint64_t lo, uint64_t hi)
{
	const uint8_t *hit = memchr(t->state + lo, state, hi - lo);
	return hit ? (uint64_t)(hit - t->state) : hi;
}

/* A precopy resend of installed pages (nothing runs yet): the PRESENT run from lo
 * (at least one page) written in place. Returns pages handled or < 0. */
static int64_t overwrite(struct pc_dp_table *t, uint64_t lo, uint64_t hi, uint64_t src, int cause)
{
	uint64_t span = 1;
	while (lo + span < hi && t->state[lo + span] == DP_PRESENT)
		span++;
	uint64_t len = span * t->ps, off = 0;
	while (off < len) {
		ssize_t n = pwrite(t->ram_fd, (const void *)(uintptr_t)(src + off), len - off,
		                   (off_t)(t->ram_fd_base + lo * t->ps + off));
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return dp_fail(n < 0 ? -errno : -EIO, "writing pages %lu+%lu in place", (unsigned long)lo,
			               (unsigned long)span);
		off += (uint64_t)n;
	}
	int rc = pc_dp_installed(t, lo, span, cause, dp_now_ns());
	return rc < 0 ? rc : (int64_t)span;
}

/* One UFFDIO_COPY of [lo, hi) (gate held, none REMOVED): pages handled, RETRY_PIECE or < 0. */
static int64_t copy_piece(struct pc_dp_table *t, uint64_t lo, uint64_t hi, uint64_t src, int cause, int over)
{
	uint64_t dst = t->base + lo * t->ps;
	int64_t n = pc_uffd_copy(t->uffd, dst, src, (hi - lo) * t->ps, 0, NULL);
	if (n > 0) {
		int rc = pc_dp_installed(t, lo, (uint64_t)n / t->ps, cause, dp_now_ns());
		return rc < 0 ? rc : n / (int64_t)t->ps;
	}
	if (n == -EEXIST) {
		if (over)
			return overwrite(t, lo, hi, src, cause);
		/* The install that got there first woke the threads waiting then; a thread
		 * that faulted after it may wait on us. */
		pc_uffd_wake(t->uffd, dst, t->ps);
		return 1;
	}
	if (n == -EAGAIN || n == -ENOENT) /* an unmap or remove under way: its event comes */
		return atomic_load(&t->stop) ? dp_fail((int)n, "UFFDIO_COPY: the mapping changed at page %lu",
		                                       (unsigned long)lo)
		                             : RETRY_PIECE;
	return dp_fail((int)n, "UFFDIO_COPY: %s (0x%lx+%#lx)", strerror((int)-n), (unsigned long)dst,
	               (unsigned long)((hi - lo) * t->ps));
}

int pc_dp_install_copy(struct pc_dp_table *t, uint64_t first, uint64_t npages, uint64_t src, int cause,
                       int over)
{
	uint64_t done = 0;
	int retries = 0;
	if (first + npages > t->npages || first + npages < first)
		return dp_fail(-EINVAL, "run %lu+%lu is beyond the guest's %lu pages", (unsigned long)first,
		               (unsigned long)npages, (unsigned long)t->npages);
	while (done < npages) {
		uint64_t lo = first + done;
		uint64_t hi = first + (npages - done < PC_DP_GATED_PAGES ? npages : done + PC_DP_GATED_PAGES);
		pthread_mutex_lock(&t->gate);
		uint64_t removed = find_state(t, DP_REMOVED, lo, hi);
		int64_t handled;
		if (removed == lo) /* the guest dropped it: never filled */
			handled = 1;
		else
			handled = copy_piece(t, lo, removed, src + done * t->ps, cause, over);
		pthread_mutex_unlock(&t->gate);
		if (handled == RETRY_PIECE) {
			if (++retries > PC_DP_MAX_RETRIES)
				return dp_fail(PC_DP_STUCK, "page %lu stayed unmappable (the guest's mapping changed and "
				               "no event explained it)", (unsigned long)lo);
			usleep(200); /* outside the gate: let the fault loop read the event */
			continue;
		}
		if (handled < 0)
			return (int)handled;
		done += (uint64_t)handled;
	}
	return 0;
}

/* UFFDIO_ZEROPAGE at page (EEXIST: mapped already, wake). A changing mapping: wake, the
 * thread faults again once the event is read. */
static int zero_fill(struct pc_dp_table *t, uint64_t page)
{
	uint64_t addr = t->base + page * t->ps;
	int64_t n = pc_uffd_zeropage(t->uffd, addr, t->ps, 0, NULL);
	if (n == -EAGAIN || n == -ENOENT) {
		pc_uffd_wake(t->uffd, addr, t->ps);
		return 0;
	}
	if (n == -EEXIST)
		n = pc_uffd_wake(t->uffd, addr, t->ps);
	if (n < 0)
		return dp_fail((int)n, "UFFDIO_ZEROPAGE: %s (page %lu)", strerror((int)-n), (unsigned long)page);
	pc_dp_woken(t, page, dp_now_ns());
	return 0;
}

int pc_dp_zero_fill(struct pc_dp_table *t, uint64_t page)
{
	return zero_fill(t, page);
}

/* A minor fault on a page in (continue path): map its page-cache copy, or wake. */
static void settle(struct pc_dp_table *t, uint64_t page, int minor_settle)
{
	uint64_t addr = t->base + page * t->ps;
	if (minor_settle) {
		int64_t n = pc_uffd_continue(t->uffd, addr, t->ps, 0, NULL);
		if (n > 0 || n == -EAGAIN || n == -ENOENT) /* changing: faults again after the event */
			return;
	}
	pc_uffd_wake(t->uffd, addr, t->ps);
}

/* The guest dropped [start, end): those pages read zeros from now on (gate held). */
static int mark_removed(struct pc_dp_table *t, uint64_t start, uint64_t end)
{
	uint64_t first = start > t->base ? (start - t->base) / t->ps : 0;
	uint64_t last = end > t->base ? (end - t->base + t->ps - 1) / t->ps : 0;
	if (last > t->npages)
		last = t->npages;
	if (first >= last)
		return 0;
	/* Bytes received into the page cache for these pages and not yet mapped go first:
	 * after the kernel's zap, nothing of them may be found there. */
	int rc = dp_punch_claimed(t, first, last, -1);
	return rc < 0 ? rc : pc_dp_removed(t, first, last, atomic_load(&t->switched));
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return (x > y) - (x < y);
}

/* One batch of events, gate held: the missing pages go to missing[]; returns how many. */
static int handle_events(struct pc_dp_table *t, const struct pc_uffd_event *ev, int n, int minor_settle,
                         uint64_t *missing)
{
	uint64_t zero[EVENTS_PER_READ], settles[EVENTS_PER_READ];
	int nmissing = 0, nzero = 0, nsettle = 0, rc;
	int64_t now = dp_now_ns();
	for (int i = 0; i < n; i++) {
		if (ev[i].kind == UFFD_EVENT_REMOVE || ev[i].kind == UFFD_EVENT_UNMAP) {
			if ((rc = mark_removed(t, ev[i].address, ev[i].end)) < 0)
				return rc;
			continue;
		}
		if (ev[i].kind != UFFD_EVENT_PAGEFAULT || ev[i].address < t->base)
			continue;
		uint64_t page = (ev[i].address - t->base) / t->ps;
		if (page >= t->npages)
			continue;
		uint8_t state = t->state[page];
		if ((ev[i].flags & UFFD_PAGEFAULT_FLAG_MINOR) && state != DP_MISSING && state != DP_REQUESTED) {
			settles[nsettle++] = page; /* the page cache holds this page's truth */
			continue;
		}
		int old = pc_dp_fault(t, page, now);
		if (old == DP_MISSING)
			missing[nmissing++] = page;
		else if (old == DP_ZERO || old == DP_REMOVED)
			zero[nzero++] = page;
		else if (old == DP_PRESENT)
			pc_uffd_wake(t->uffd, t->base + page * t->ps, t->ps);
	}
	for (int i = 0; i < nzero; i++)
		if ((rc = zero_fill(t, zero[i])) < 0)
			return rc;
	for (int i = 0; i < nsettle; i++)
		settle(t, settles[i], minor_settle);
	return nmissing;
}

/* Sorted pages into runs (first, count) of neighbours; returns the number of runs. */
static int coalesce(uint64_t *pages, int n, uint64_t *req, int max_runs)
{
	qsort(pages, (size_t)n, sizeof(*pages), cmp_u64);
	int runs = 0;
	for (int i = 0; i < n; i++) {
		if (runs && req[2 * (runs - 1)] + req[2 * (runs - 1) + 1] == pages[i]) {
			req[2 * (runs - 1) + 1]++;
		} else if (runs && req[2 * (runs - 1)] + req[2 * (runs - 1) + 1] > pages[i]) {
			continue; /* a duplicate */
		} else if (runs < max_runs) {
			req[2 * runs] = pages[i];
			req[2 * runs + 1] = 1;
			runs++;
		}
	}
	return runs;
}

int pc_dp_fault_loop(struct pc_dp_table *t, int spin, int minor_settle, uint64_t *req, int max_runs)
{
	struct pc_uffd_event ev[EVENTS_PER_READ];
	uint64_t missing[EVENTS_PER_READ];
	struct pollfd pfd = {.fd = t->uffd, .events = POLLIN};
	if (max_runs < EVENTS_PER_READ)
		return dp_fail(-EINVAL, "the fault loop needs room for %d request runs", EVENTS_PER_READ);
	while (!atomic_load(&t->stop)) {
		/* spin: poll without sleeping, and take the gate only when events wait */
		int r = poll(&pfd, 1, spin ? 0 : 50);
		if (r < 0 && errno != EINTR)
			return dp_fail(-errno, "poll(userfaultfd): %s", strerror(errno));
		if (r <= 0)
			continue;
		pthread_mutex_lock(&t->gate);
		int n = pc_uffd_read_events(t->uffd, ev, EVENTS_PER_READ, 0);
		int nmissing = n > 0 ? handle_events(t, ev, n, minor_settle, missing) : 0;
		pthread_mutex_unlock(&t->gate);
		if (n < 0 && n != -EINTR)
			return dp_fail(n, "read(userfaultfd): %s", strerror(-n));
		if (nmissing < 0)
			return nmissing;
		if (nmissing > 0) {
			int runs = coalesce(missing, nmissing, req, max_runs);
			int sent = dp_send_requests(t, req, runs);
			if (sent <= 0)
				return sent < 0 ? sent : runs; /* not lent: Python sends them */
		}
	}
	return 0;
}

/* ---- the urgent channel's send side ---- */

void pc_dp_set_request_template(struct pc_dp_table *t, const uint8_t *frame)
{
	memcpy(t->request, frame, PC_DP_REQUEST_BYTES);
}

static void put_be64(uint8_t *p, uint64_t v)
{
	for (int i = 7; i >= 0; i--, v >>= 8)
		p[i] = (uint8_t)v;
}

/* The template's header (magic, type, flags, length) with arg = first, payload = npages. */
void pc_dp_encode_request(struct pc_dp_table *t, uint64_t first, uint64_t npages, uint8_t *out)
{
	memcpy(out, t->request, PC_DP_REQUEST_BYTES);
	put_be64(out + 8, first);
	put_be64(out + 16, npages);
}

void pc_dp_lend_urgent(struct pc_dp_table *t, int fd, void *auth, uint64_t seq)
{
	pthread_mutex_lock(&t->urgent_lock);
	t->urgent_fd = fd;
	t->auth = auth;
	t->seq = seq;
	pthread_mutex_unlock(&t->urgent_lock);
}

uint64_t pc_dp_take_urgent(struct pc_dp_table *t)
{
	pthread_mutex_lock(&t->urgent_lock);
	t->urgent_fd = -1;
	uint64_t seq = t->seq;
	pthread_mutex_unlock(&t->urgent_lock);
	return seq;
}

uint64_t pc_dp_requests_sent(struct pc_dp_table *t)
{
	pthread_mutex_lock(&t->urgent_lock);
	uint64_t n = t->requests_sent;
	pthread_mutex_unlock(&t->urgent_lock);
	return n;
}

/* Sends the runs on the lent channel: 1 if sent, 0 if not lent (Python sends them),
 * PC_DP_LINK_LOST if a send failed (the channel is taken back). */
static int dp_send_requests(struct pc_dp_table *t, const uint64_t *req, int nruns)
{
	uint8_t frame[PC_DP_REQUEST_BYTES + PC_AUTH_TAG_BYTES];
	int rc = 1;
	pthread_mutex_lock(&t->urgent_lock);
	if (t->urgent_fd < 0) {
		rc = 0;
		goto out;
	}
	for (int i = 0; i < nruns; i++) {
		size_t len = PC_DP_REQUEST_BYTES;
		pc_dp_encode_request(t, req[2 * i], req[2 * i + 1], frame);
		if (t->auth) {
			if (pc_frame_auth_tag(t->auth, t->seq, frame, 16, frame + 16, 8, frame + len)) {
				rc = dp_fail(-EIO, "libcrypto failed to compute a frame tag");
				goto out;
			}
			len += PC_AUTH_TAG_BYTES;
		}
		if (pc_send_full(t->urgent_fd, frame, len) < 0) {
			t->urgent_fd = -1;
			rc = dp_fail(PC_DP_LINK_LOST, "urgent: send failed: %s", strerror(errno));
			goto out;
		}
		t->seq++;
		t->requests_sent++;
	}
out:
	pthread_mutex_unlock(&t->urgent_lock);
	return rc;
}

int pc_dp_send_requests(struct pc_dp_table *t, const uint64_t *req, int nruns)
{
	return dp_send_requests(t, req, nruns);
}
