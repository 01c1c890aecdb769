/* dp_recv_cont: the continue path's one-copy receive (see dp_recv_cont.h). */
#include "dp_recv_cont.h"

#include <errno.h>
#include <pthread.h>
#include <string.h>
#include <unistd.h>

#include "dp_dest_internal.h"
#include "file_ops.h"
#include "uffd_ops.h"

#define RETRY_PIECE (-1)

static inline int fresh(uint8_t state)
{
	return state == DP_MISSING || state == DP_REQUESTED;
}

static inline uint64_t min_u64(uint64_t a, uint64_t b)
{
	return a < b ? a : b;
}

int dp_claimed(const struct pc_dp_table *t, uint64_t p, int except)
{
	for (int i = 0; i < DP_CLAIM_SLOTS; i++) {
		const struct dp_claim *c = &t->claims[i];
		if (i != except && c->npages && p >= c->first && p - c->first < c->npages &&
		    (c->where[p - c->first] & DP_IN_CACHE))
			return 1;
	}
	return 0;
}

int dp_punch_claimed(struct pc_dp_table *t, uint64_t lo, uint64_t hi, int slot)
{
	if (t->memfd < 0)
		return 0; /* no claims without a memfd */
	for (int i = 0; i < DP_CLAIM_SLOTS; i++) {
		const struct dp_claim *c = &t->claims[i];
		if ((slot >= 0 && i != slot) || !c->npages)
			continue;
		uint64_t p = lo > c->first ? lo : c->first, end = min_u64(hi, c->first + c->npages);
		while (p < end) {
			uint64_t q = p;
			while (q < end && (c->where[q - c->first] & DP_IN_CACHE) && fresh(t->state[q]))
				q++;
			if (q > p) {
				int rc = pc_punch_hole(t->memfd, p * t->ps, (q - p) * t->ps);
				if (rc < 0)
					return dp_fail(rc, "punching pages %lu+%lu out of the page cache: %s", (unsigned long)p,
					               (unsigned long)(q - p), strerror(-rc));
			}
			p = q + 1;
		}
	}
	return 0;
}

/* Where the next bytes of run page i go (gate held): 1 the page cache, 0 scratch. A
 * page keeps the place it started in, unless the page cache is no longer its (a REMOVE or
 * zero range took it over and punched it): its rest goes to scratch, and it is skipped. */
static int to_cache(struct pc_dp_cont_sink *s, struct pc_dp_table *t, uint64_t first, uint64_t i)
{
	uint8_t w = s->where[i], state = t->state[first + i];
	if (!w)
		w = fresh(state) && !dp_claimed(t, first + i, s->slot) ? DP_IN_CACHE : DP_IN_SCRATCH;
	else if (w == DP_IN_CACHE && !fresh(state))
		w |= DP_IN_SCRATCH;
	s->where[i] = w;
	return w == DP_IN_CACHE;
}

/* Writes len bytes at off of the memfd (the page cache). 0 or -errno. */
static int write_cache(struct pc_dp_table *t, const uint8_t *src, uint64_t len, uint64_t off)
{
	while (len) {
		ssize_t n = pwrite(t->memfd, src, len, (off_t)off);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return dp_fail(n < 0 ? -errno : -EIO, "writing the page cache at %#lx: %s", (unsigned long)off,
			               strerror(n < 0 ? errno : EIO));
		src += n;
		off += (uint64_t)n;
		len -= (uint64_t)n;
	}
	return 0;
}

/* In place: receives the run's payload straight into the page cache through the agent's
 * mapping, in gated pieces, what has arrived each time. 0 or a reason. */
static int receive_in_place(struct pc_dp_cont_sink *s, struct pc_dp_table *t, uint64_t first, uint64_t npages,
                            struct pc_dp_stream *in)
{
	uint64_t ps = t->ps, total = npages * ps, off = 0;
	uint64_t piece = (uint64_t)PC_DP_GATED_PAGES * ps;
	while (off < total) {
		uint64_t before = off, piece_end = min_u64(total, (off / piece + 1) * piece);
		int rc = 0;
		pthread_mutex_lock(&t->gate);
		while (off < piece_end && !rc) {
			uint64_t i = off / ps, j = i + 1;
			int cache = to_cache(s, t, first, i);
			while (j * ps < piece_end && to_cache(s, t, first, j) == cache)
				j++;
			uint64_t seg_end = min_u64(piece_end, j * ps);
			uint8_t *dst = cache ? s->cache + first * ps + off : s->scratch + off;
			size_t got;
			rc = pc_dp_stream_read(in, dst, seg_end - off, &got);
			off += got;
			if (off < seg_end)
				break; /* nothing more yet */
		}
		pthread_mutex_unlock(&t->gate);
		if (rc)
			return rc;
		if (off == before && (rc = pc_dp_stream_wait(in))) /* outside the gate */
			return rc;
	}
	return 0;
}

/* Staged: receives each gated piece into scratch (the piece stays in the CPU's cache),
 * then writes its pages that are the run's to take into the page cache, gate held.
 * 0, a reason, or SINK (*sink_rc set). */
static int receive_staged(struct pc_dp_cont_sink *s, struct pc_dp_table *t, uint64_t first, uint64_t npages,
                          struct pc_dp_stream *in, int *sink_rc)
{
	uint64_t ps = t->ps, total = npages * ps, off = 0;
	uint64_t piece = (uint64_t)PC_DP_GATED_PAGES * ps;
	while (off < total) {
		uint64_t start = off, piece_end = min_u64(total, off + piece);
		while (off < piece_end) {
			size_t got;
			int rc = pc_dp_stream_read(in, s->scratch + off, piece_end - off, &got);
			off += got;
			if (rc || (off < piece_end && (rc = pc_dp_stream_wait(in))))
				return rc;
		}
		int rc = 0;
		pthread_mutex_lock(&t->gate);
		for (uint64_t i = start / ps; i < piece_end / ps && !rc;) {
			uint64_t j = i;
			while (j < piece_end / ps && to_cache(s, t, first, j))
				j++;
			if (j > i)
				rc = write_cache(t, s->scratch + i * ps, (j - i) * ps, (first + i) * ps);
			i = j + (j == i); /* a page not the run's stays in scratch */
		}
		pthread_mutex_unlock(&t->gate);
		if (rc) {
			s->base->failed = PC_DP_SINK_INSTALL;
			*sink_rc = rc;
			return PC_DP_RECV_SINK;
		}
	}
	return 0;
}

/* Run page i can be mapped now (gate held): its bytes in the page cache and the page
 * still fresh; or its bytes in scratch (copied in place here) and the page fresh and
 * unclaimed, or installed already and the run's cause overwrites (a precopy resend). */
static int mappable(struct pc_dp_cont_sink *s, struct pc_dp_table *t, uint64_t first, uint64_t i, int over)
{
	uint64_t p = first + i;
	uint8_t state = t->state[p], w = s->where[i];
	if (w == DP_IN_CACHE)
		return fresh(state);
	if (w != DP_IN_SCRATCH || dp_claimed(t, p, s->slot) ||
	    !(fresh(state) || (over && (state == DP_PRESENT || state == DP_ZERO))))
		return 0;
	return write_cache(t, s->scratch + i * t->ps, t->ps, p * t->ps) == 0;
}

/* Maps the mappable pages from run page i on (up to hi), gate held: pages handled,
 * RETRY_PIECE or < 0. */
static int64_t map_piece(struct pc_dp_cont_sink *s, struct pc_dp_table *t, uint64_t first, uint64_t i, uint64_t hi,
                         int cause, int over)
{
	uint64_t ps = t->ps, addr = t->base + (first + i) * ps, j = i;
	while (j < hi && mappable(s, t, first, j, over))
		j++;
	if (j == i) { /* not ours to map: a page installed meanwhile may have a waiter since */
		if (t->state[first + i] == DP_PRESENT)
			pc_uffd_wake(t->uffd, addr, ps);
		return 1;
	}
	int64_t n = pc_uffd_continue(t->uffd, addr, (j - i) * ps, 0, NULL);
	if (n == -EEXIST) { /* mapped already (a resend): the page cache write updated it */
		pc_uffd_wake(t->uffd, addr, ps);
		n = (int64_t)ps;
	} else if (n == -EAGAIN || n == -ENOENT) { /* an unmap or remove under way: its event comes */
		return atomic_load(&t->stop) ? dp_fail((int)n, "UFFDIO_CONTINUE: the mapping changed at page %lu",
		                                       (unsigned long)(first + i))
		                             : RETRY_PIECE;
	} else if (n <= 0) {
		return dp_fail(n ? (int)n : -EIO, "UFFDIO_CONTINUE: %s (0x%lx+%#lx)", strerror(n ? (int)-n : EIO),
		               (unsigned long)addr, (unsigned long)((j - i) * ps));
	}
	int rc = pc_dp_installed(t, first + i, (uint64_t)n / ps, cause, dp_now_ns());
	return rc < 0 ? rc : n / (int64_t)ps;
}

/* Maps the authenticated run into the guest, gated pieces. 0 or < 0. */
static int commit(struct pc_dp_cont_sink *s, struct pc_dp_table *t, uint64_t first, uint64_t npages, int cause,
                  int over)
{
	uint64_t done = 0;
	int retries = 0;
	while (done < npages) {
		uint64_t hi = min_u64(npages, done + PC_DP_GATED_PAGES);
		pthread_mutex_lock(&t->gate);
		int64_t handled = map_piece(s, t, first, done, hi, cause, over);
		pthread_mutex_unlock(&t->gate);
		if (handled == RETRY_PIECE) {
			if (++retries > PC_DP_MAX_RETRIES)
				return dp_fail(PC_DP_STUCK, "page %lu stayed unmappable (the guest's mapping changed and "
				               "no event explained it)", (unsigned long)(first + done));
			usleep(200); /* outside the gate: let the fault loop read the event */
			continue;
		}
		if (handled < 0)
			return (int)handled;
		done += (uint64_t)handled;
	}
	return 0;
}

static int cont_place(void *ctx, uint64_t first, uint64_t npages, uint8_t cause, struct pc_dp_stream *in,
                      int *sink_rc)
{
	struct pc_dp_cont_sink *s = ctx;
	struct pc_dp_table *t = s->base->table;
	if (npages > s->max_run_pages || t->memfd < 0 || first + npages > t->npages) {
		s->base->failed = PC_DP_SINK_INSTALL;
		*sink_rc = dp_fail(-EINVAL, "run %lu+%lu: beyond the sink's %lu pages or the guest's %lu, or no memfd",
		                   (unsigned long)first, (unsigned long)npages, (unsigned long)s->max_run_pages,
		                   (unsigned long)t->npages);
		return PC_DP_RECV_SINK;
	}
	memset(s->where, 0, npages);
	pthread_mutex_lock(&t->gate);
	t->claims[s->slot] = (struct dp_claim){first, npages, s->where};
	pthread_mutex_unlock(&t->gate);
	int rc = s->cache ? receive_in_place(s, t, first, npages, in) : receive_staged(s, t, first, npages, in, sink_rc);
	if (!rc)
		rc = pc_dp_stream_finish(in);
	if (!rc) {
		int failed = commit(s, t, first, npages, s->base->cause_index[cause], (int)(s->base->overwrite >> cause & 1));
		if (failed < 0) {
			s->base->failed = PC_DP_SINK_CONTINUE;
			*sink_rc = failed;
			rc = PC_DP_RECV_SINK;
		}
	}
	/* What was received in place and not mapped (a forged or cut frame, a failed map)
	 * leaves the page cache before the claim goes: a minor fault never finds it. */
	pthread_mutex_lock(&t->gate);
	int punched = dp_punch_claimed(t, first, first + npages, s->slot);
	t->claims[s->slot].npages = 0;
	pthread_mutex_unlock(&t->gate);
	if (punched < 0 && rc != PC_DP_RECV_SINK) {
		s->base->failed = PC_DP_SINK_PUNCH;
		*sink_rc = punched;
		rc = PC_DP_RECV_SINK;
	}
	return rc;
}

static int cont_zero(void *ctx, uint64_t first, uint64_t npages)
{
	struct pc_dp_cont_sink *s = ctx;
	struct pc_dp_table *t = s->base->table;
	struct pc_dp_sink table;
	pc_dp_sink_table(&table, s->base);
	/* Claimed pages become ZERO here: their unauthenticated bytes leave the page cache
	 * first (a minor fault on a ZERO page maps what the page cache holds). */
	pthread_mutex_lock(&t->gate);
	int rc = dp_punch_claimed(t, first, first + npages, -1);
	if (rc < 0)
		s->base->failed = PC_DP_SINK_PUNCH;
	else
		rc = table.zero(table.ctx, first, npages);
	pthread_mutex_unlock(&t->gate);
	return rc;
}

static int cont_run(void *ctx, uint64_t first, uint64_t npages, const uint8_t *data, uint8_t cause)
{
	struct pc_dp_cont_sink *s = ctx;
	s->base->failed = PC_DP_SINK_INSTALL;
	return dp_fail(-EINVAL, "the continue sink places page runs itself");
}

void pc_dp_sink_cont(struct pc_dp_sink *sink, struct pc_dp_cont_sink *ctx)
{
	sink->run = cont_run;
	sink->zero = cont_zero;
	sink->place = cont_place;
	sink->ctx = ctx;
}
