/*
 * dp_recv_cont: the continue install path's receive, a placing dp_recv sink. The guest's
 * RAM is a memfd registered for minor faults. A page run's payload goes from the socket
 * into the memfd's page cache at the pages' place, its MAC fed as it arrives; once the
 * tag checks out, one UFFDIO_CONTINUE per run of pages maps them into the guest and
 * wakes its waiters, and the table marks them PRESENT (EEXIST -> wake; a changing
 * mapping -> retry after the fault loop read its event). No UFFDIO_COPY: the only copy
 * into guest RAM is the page cache write.
 *
 * Two ways to the page cache, chosen by `cache`:
 * - staged (cache NULL, the default): each gated piece (PC_DP_GATED_PAGES pages) is
 *   received into scratch, where it stays in the CPU's cache, and written with pwrite.
 *   The write path allocates page cache pages without zeroing them and without
 *   mapping them in this process.
 * - in place (cache: the agent's own MAP_SHARED mapping of the memfd): received
 *   straight into the mapping, one copy, but every new page costs this process a page
 *   fault that allocates and zeroes it. On the 2-CPU test VM that fault path costs
 *   ~1 s per GiB against ~0.6 s per GiB for pwrite's allocation and copy together,
 *   so staged is faster there (see `postcopy bench`).
 *
 * Until the tag checks out the bytes are not trusted, so the pages are claimed (see
 * struct dp_claim in dp_dest_internal.h): the table keeps them MISSING/REQUESTED (a
 * minor fault on them is a request, never a CONTINUE), the other channel's sink does
 * not write them, and a REMOVE event or a zero range that takes them over punches them
 * out of the page cache first. A frame whose tag fails, or that the link cuts, punches
 * the pages it wrote that are still not in: nothing of it is ever mapped, and a later
 * correct copy writes them anew.
 *
 * Bytes reach the page cache only while the install gate is held, and only into pages
 * then MISSING or REQUESTED and not claimed by the other channel: so no write lands
 * after the kernel's zap of a range the fault loop has marked REMOVED. Bytes of other
 * pages stay in scratch: skipped, or for a precopy resend (a cause that overwrites)
 * written in place from there once authenticated.
 */
#ifndef PC_DP_RECV_CONT_H
#define PC_DP_RECV_CONT_H

#include <stdint.h>

#include "dp_dest.h"
#include "dp_recv.h"
#include "dp_recv_table.h"

/* Which step failed (for Python's exception), besides dp_recv_table's. */
#define PC_DP_SINK_CONTINUE 4
#define PC_DP_SINK_PUNCH 5

struct pc_dp_cont_sink {
    struct pc_dp_table_sink *base; /* the table, cause map, overwrite causes; zero ranges as the copy path */
    uint8_t *cache;               /* NULL: staged; else in place, into this mapping of the memfd (page p at cache + p * page size) */
    uint8_t *scratch;             /* max_run_pages pages: bytes of pages not written in place */
    uint8_t *where;               /* max_run_pages bytes: DP_IN_CACHE / DP_IN_SCRATCH per page of the run */
    uint64_t max_run_pages;
    int slot;                     /* this channel's claim slot (0 or 1) */
};

/* sink places page runs through ctx (ctx->base->table attached with its memfd); ctx must outlive it. */
void pc_dp_sink_cont(struct pc_dp_sink *sink, struct pc_dp_cont_sink *ctx);

#endif /* PC_DP_RECV_CONT_H */
