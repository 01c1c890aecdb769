/* dp_dest: the destination's page table (see dp_dest.h). */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "dp_dest.h"
#include "dp_dest_internal.h"

static const char *const state_names[PC_DP_NSTATES] = {"MISSING", "REQUESTED", "PRESENT", "ZERO", "REMOVED"};
static __thread char error_line[256];

static inline int is_in(uint8_t s)
{
	return s == DP_PRESENT || s == DP_ZERO || s == DP_REMOVED;
}

int64_t dp_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

int dp_fail(int code, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(error_line, sizeof(error_line), fmt, ap);
	va_end(ap);
	return code;
}

const char *pc_dp_error(void)
{
	return error_line;
}

struct pc_dp_table *pc_dp_table_new(uint64_t npages, const uint8_t *legal, int zero_cause,
                                    int64_t tl_start_ns, int64_t tl_bucket_ns)
{
	struct pc_dp_table *t = calloc(1, sizeof(*t));
	if (!t)
		return NULL;
	t->state = calloc(npages ? npages : 1, 1); /* zero pages: RSS grows as pages are touched */
	if (!t->state) {
		free(t);
		return NULL;
	}
	pthread_mutex_init(&t->lock, NULL);
	pthread_mutex_init(&t->gate, NULL);
	pthread_mutex_init(&t->urgent_lock, NULL);
	t->urgent_fd = -1;
	pthread_condattr_t attr;
	pthread_condattr_init(&attr);
	pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
	pthread_cond_init(&t->all_in_cond, &attr);
	pthread_condattr_destroy(&attr);
	t->npages = npages;
	memcpy(t->legal, legal, sizeof(t->legal));
	t->zero_cause = zero_cause;
	t->tl_start = tl_start_ns;
	t->tl_bucket = tl_bucket_ns;
	t->uffd = t->ram_fd = t->memfd = -1;
	return t;
}

void pc_dp_table_free(struct pc_dp_table *t)
{
	if (!t)
		return;
	pthread_mutex_destroy(&t->lock);
	pthread_mutex_destroy(&t->gate);
	pthread_mutex_destroy(&t->urgent_lock);
	pthread_cond_destroy(&t->all_in_cond);
	free(t->state);
	free(t->waiting);
	free(t->faults);
	free(t->tl);
	free(t);
}

void pc_dp_attach(struct pc_dp_table *t, int uffd, uint64_t base, uint64_t page_size, int ram_fd,
                  uint64_t ram_fd_base, int memfd)
{
	t->uffd = uffd;
	t->base = base;
	t->ps = page_size;
	t->ram_fd = ram_fd;
	t->ram_fd_base = ram_fd_base;
	t->memfd = memfd;
}

void pc_dp_set_stop(struct pc_dp_table *t) { atomic_store(&t->stop, 1); }
void pc_dp_set_switched(struct pc_dp_table *t) { atomic_store(&t->switched, 1); }
void pc_dp_lock(struct pc_dp_table *t) { pthread_mutex_lock(&t->lock); }
void pc_dp_unlock(struct pc_dp_table *t) { pthread_mutex_unlock(&t->lock); }
void pc_dp_gate_lock(struct pc_dp_table *t) { pthread_mutex_lock(&t->gate); }
void pc_dp_gate_unlock(struct pc_dp_table *t) { pthread_mutex_unlock(&t->gate); }
uint8_t *pc_dp_states(struct pc_dp_table *t) { return t->state; }

uint64_t pc_dp_count_in(struct pc_dp_table *t)
{
	return __atomic_load_n(&t->in, __ATOMIC_RELAXED);
}

int pc_dp_all_in(struct pc_dp_table *t)
{
	return pc_dp_count_in(t) >= t->npages;
}

int pc_dp_wait_all_in(struct pc_dp_table *t, int timeout_ms)
{
	struct timespec until;
	clock_gettime(CLOCK_MONOTONIC, &until);
	until.tv_sec += timeout_ms / 1000;
	until.tv_nsec += (long)(timeout_ms % 1000) * 1000000;
	if (until.tv_nsec >= 1000000000) {
		until.tv_sec++;
		until.tv_nsec -= 1000000000;
	}
	pthread_mutex_lock(&t->lock);
	while (t->in < t->npages)
		if (pthread_cond_timedwait(&t->all_in_cond, &t->lock, &until) == ETIMEDOUT)
			break;
	int done = t->in >= t->npages;
	pthread_mutex_unlock(&t->lock);
	return done;
}

uint64_t pc_dp_pages(struct pc_dp_table *t, int cause)
{
	if (cause < 0 || cause >= PC_DP_MAX_CAUSES)
		return 0;
	pthread_mutex_lock(&t->lock);
	uint64_t n = t->pages[cause];
	pthread_mutex_unlock(&t->lock);
	return n;
}

uint64_t pc_dp_removed_by_guest(struct pc_dp_table *t)
{
	pthread_mutex_lock(&t->lock);
	uint64_t n = t->removed_by_guest;
	pthread_mutex_unlock(&t->lock);
	return n;
}

uint64_t pc_dp_nfaults(struct pc_dp_table *t)
{
	pthread_mutex_lock(&t->lock);
	uint64_t n = t->nfaults;
	pthread_mutex_unlock(&t->lock);
	return n;
}

uint64_t pc_dp_faults(struct pc_dp_table *t, uint64_t from, int64_t *ns, double *us, uint64_t max)
{
	uint64_t n = 0;
	pthread_mutex_lock(&t->lock);
	for (uint64_t i = from; i < t->nfaults && n < max; i++, n++) {
		ns[n] = t->faults[i].ns;
		us[n] = t->faults[i].us;
	}
	pthread_mutex_unlock(&t->lock);
	return n;
}

uint64_t pc_dp_waiting(struct pc_dp_table *t, uint64_t lo, uint64_t hi, uint64_t *out, uint64_t max)
{
	uint64_t n = 0;
	pthread_mutex_lock(&t->lock);
	for (size_t i = 0; i < t->nwaiting; i++) {
		uint64_t p = t->waiting[i].page;
		if (p >= lo && p < hi) {
			if (n < max)
				out[n] = p;
			n++;
		}
	}
	pthread_mutex_unlock(&t->lock);
	return n;
}

uint64_t pc_dp_timeline_len(struct pc_dp_table *t)
{
	pthread_mutex_lock(&t->lock);
	uint64_t n = t->tl_len;
	pthread_mutex_unlock(&t->lock);
	return n;
}

uint64_t pc_dp_timeline(struct pc_dp_table *t, int cause, uint64_t *out, uint64_t max)
{
	uint64_t n = 0;
	pthread_mutex_lock(&t->lock);
	if (cause >= 0 && cause < PC_DP_MAX_CAUSES)
		for (; n < t->tl_len && n < max; n++)
			out[n] = t->tl[n * PC_DP_MAX_CAUSES + cause];
	pthread_mutex_unlock(&t->lock);
	return n;
}

/* ---- under the lock ---- */

static int grow(void **buf, size_t *cap, size_t need, size_t item)
{
	if (need <= *cap)
		return 0;
	size_t cap2 = *cap ? *cap * 2 : 64;
	while (cap2 < need)
		cap2 *= 2;
	void *p = realloc(*buf, cap2 * item);
	if (!p)
		return dp_fail(-ENOMEM, "page table: out of memory");
	*buf = p;
	*cap = cap2;
	return 0;
}

/* Pages installed per time bucket, as report.Timeline.add (now 0: the clock's now). */
static void timeline_add(struct pc_dp_table *t, int cause, uint64_t pages, int64_t now)
{
	if (t->tl_bucket <= 0 || cause < 0 || cause >= PC_DP_MAX_CAUSES)
		return;
	if (!now)
		now = dp_now_ns();
	int64_t b = (now - t->tl_start) / t->tl_bucket;
	size_t bucket = b > 0 ? (size_t)b : 0;
	if (bucket >= t->tl_len) {
		size_t cap = t->tl_cap;
		if (grow((void **)&t->tl, &cap, bucket + 1, sizeof(uint64_t) * PC_DP_MAX_CAUSES) < 0)
			return; /* out of memory: the picture loses a point, the counts stay exact */
		t->tl_cap = cap;
		memset(t->tl + t->tl_len * PC_DP_MAX_CAUSES, 0,
		       (bucket + 1 - t->tl_len) * PC_DP_MAX_CAUSES * sizeof(uint64_t));
		t->tl_len = bucket + 1;
	}
	t->tl[bucket * PC_DP_MAX_CAUSES + cause] += pages;
}

int pc_dp_move_locked(struct pc_dp_table *t, uint64_t lo, uint64_t hi, int state)
{
	if (hi > t->npages || lo > hi || state < 0 || state >= PC_DP_NSTATES)
		return dp_fail(-EINVAL, "pages [%lu, %lu) -> %d: out of range", (unsigned long)lo,
		               (unsigned long)hi, state);
	uint8_t *s = t->state;
	uint64_t came_in = 0, went_out = 0;
	int new_in = is_in((uint8_t)state);
	for (uint64_t p = lo; p < hi; p++) {
		if (!t->legal[s[p]][state])
			return dp_fail(PC_DP_ILLEGAL, "page %lu: %s -> %s is not allowed", (unsigned long)p,
			               state_names[s[p]], state_names[state]);
		int was_in = is_in(s[p]);
		came_in += new_in && !was_in;
		went_out += !new_in && was_in;
	}
	memset(s + lo, state, hi - lo);
	__atomic_store_n(&t->in, t->in + came_in - went_out, __ATOMIC_RELAXED);
	if (t->in >= t->npages)
		pthread_cond_broadcast(&t->all_in_cond);
	return came_in > (uint64_t)INT32_MAX ? INT32_MAX : (int)came_in;
}

static int find_waiter(struct pc_dp_table *t, uint64_t page)
{
	for (size_t i = 0; i < t->nwaiting; i++)
		if (t->waiting[i].page == page)
			return (int)i;
	return -1;
}

/* Waiter i was woken at now: one fault record, and it no longer waits. */
static void record_woken(struct pc_dp_table *t, size_t i, int64_t now)
{
	if (grow((void **)&t->faults, &t->cap_faults, t->nfaults + 1, sizeof(struct dp_fault)) == 0)
		t->faults[t->nfaults++] = (struct dp_fault){t->waiting[i].ns, (double)(now - t->waiting[i].ns) / 1e3};
	t->waiting[i] = t->waiting[--t->nwaiting];
}

int pc_dp_fault(struct pc_dp_table *t, uint64_t page, int64_t now)
{
	if (page >= t->npages)
		return dp_fail(-EINVAL, "page %lu is beyond the table", (unsigned long)page);
	pthread_mutex_lock(&t->lock);
	int state = t->state[page];
	if ((state == DP_MISSING || state == DP_ZERO || state == DP_REMOVED) && find_waiter(t, page) < 0 &&
	    grow((void **)&t->waiting, &t->cap_waiting, t->nwaiting + 1, sizeof(struct dp_waiter)) == 0)
		t->waiting[t->nwaiting++] = (struct dp_waiter){page, now};
	if (state == DP_MISSING)
		pc_dp_move_locked(t, page, page + 1, DP_REQUESTED); /* always legal */
	pthread_mutex_unlock(&t->lock);
	return state;
}

int pc_dp_installed(struct pc_dp_table *t, uint64_t first, uint64_t count, int cause, int64_t now)
{
	uint64_t end = first + count;
	pthread_mutex_lock(&t->lock);
	int rc = pc_dp_move_locked(t, first, end, DP_PRESENT);
	if (rc >= 0) {
		if (cause >= 0 && cause < PC_DP_MAX_CAUSES)
			t->pages[cause] += count;
		timeline_add(t, cause, count, now);
		for (size_t i = 0; i < t->nwaiting;) {
			if (t->waiting[i].page >= first && t->waiting[i].page < end)
				record_woken(t, i, now);
			else
				i++;
		}
		rc = 0;
	}
	pthread_mutex_unlock(&t->lock);
	return rc;
}

void pc_dp_woken(struct pc_dp_table *t, uint64_t page, int64_t now)
{
	pthread_mutex_lock(&t->lock);
	int i = find_waiter(t, page);
	if (i >= 0)
		record_woken(t, (size_t)i, now);
	pthread_mutex_unlock(&t->lock);
}

int64_t pc_dp_mark_zero(struct pc_dp_table *t, uint64_t first, uint64_t count, uint64_t *out, uint64_t max)
{
	uint64_t end = first + count;
	if (end > t->npages || end < first)
		return dp_fail(-EINVAL, "pages [%lu, %lu): out of range", (unsigned long)first, (unsigned long)end);
	pthread_mutex_lock(&t->lock);
	for (uint64_t p = first; p < end; p++) { /* all or nothing */
		uint8_t s = t->state[p];
		if (s != DP_PRESENT && !t->legal[s][DP_ZERO]) {
			pthread_mutex_unlock(&t->lock);
			return dp_fail(PC_DP_ILLEGAL, "page %lu: %s -> ZERO is not allowed", (unsigned long)p,
			               state_names[s]);
		}
	}
	uint64_t new = 0, pos = first;
	while (pos < end) { /* spans not PRESENT: installed pages stay as they are */
		while (pos < end && t->state[pos] == DP_PRESENT)
			pos++;
		uint64_t span = pos;
		while (span < end && t->state[span] != DP_PRESENT)
			span++;
		if (span > pos)
			new += (uint64_t)pc_dp_move_locked(t, pos, span, DP_ZERO); /* checked above */
		pos = span;
	}
	t->pages[t->zero_cause] += new;
	timeline_add(t, t->zero_cause, new, 0);
	pthread_mutex_unlock(&t->lock);
	return (int64_t)pc_dp_waiting(t, first, end, out, max);
}

int pc_dp_removed(struct pc_dp_table *t, uint64_t first, uint64_t end, int by_guest)
{
	pthread_mutex_lock(&t->lock);
	int rc = pc_dp_move_locked(t, first, end, DP_REMOVED);
	if (rc >= 0 && by_guest)
		t->removed_by_guest += end - first;
	pthread_mutex_unlock(&t->lock);
	return rc < 0 ? rc : 0;
}

int pc_dp_discard(struct pc_dp_table *t, uint64_t first, uint64_t count)
{
	pthread_mutex_lock(&t->lock);
	int rc = pc_dp_move_locked(t, first, first + count, DP_MISSING);
	pthread_mutex_unlock(&t->lock);
	return rc < 0 ? rc : 0;
}
