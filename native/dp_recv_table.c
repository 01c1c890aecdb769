/* dp_recv_table: the destination's page table as a dp_recv sink (see dp_recv_table.h). */
#include "dp_recv_table.h"

#include <errno.h>
#include <stdlib.h>

#include "dp_dest_internal.h"

#define WAITERS_ON_STACK 64

static int table_run(void *ctx, uint64_t first, uint64_t npages, const uint8_t *data, uint8_t cause)
{
    struct pc_dp_table_sink *s = ctx;
    int rc = pc_dp_install_copy(s->table, first, npages, (uint64_t)(uintptr_t)data, s->cause_index[cause],
                                (int)(s->overwrite >> cause & 1));
    if (rc < 0)
        s->failed = PC_DP_SINK_INSTALL;
    return rc;
}

static int table_zero(void *ctx, uint64_t first, uint64_t npages)
{
    struct pc_dp_table_sink *s = ctx;
    uint64_t some[WAITERS_ON_STACK], *waiters = some;
    int64_t n = pc_dp_mark_zero(s->table, first, npages, some, WAITERS_ON_STACK);
    if (n < 0) {
        s->failed = PC_DP_SINK_MARK_ZERO;
        return (int)n;
    }
    if (n > WAITERS_ON_STACK) { /* rare: many threads wait inside one zero range */
        waiters = malloc((size_t)n * sizeof(*waiters));
        if (!waiters) {
            s->failed = PC_DP_SINK_MARK_ZERO;
            return dp_fail(-ENOMEM, "no memory for %ld waiters", (long)n);
        }
        uint64_t got = pc_dp_waiting(s->table, first, first + npages, waiters, (uint64_t)n);
        if (got < (uint64_t)n) /* woken meanwhile; more since are not copied */
            n = (int64_t)got;
    }
    int rc = 0;
    for (int64_t i = 0; i < n && !rc; i++)
        rc = pc_dp_zero_fill(s->table, waiters[i]);
    if (waiters != some)
        free(waiters);
    if (rc < 0)
        s->failed = PC_DP_SINK_ZERO_FILL;
    return rc;
}

void pc_dp_sink_table(struct pc_dp_sink *sink, struct pc_dp_table_sink *ctx)
{
    sink->run = table_run;
    sink->zero = table_zero;
    sink->ctx = ctx;
}

const int *pc_dp_table_stop_flag(struct pc_dp_table *t)
{
    return (const int *)&t->stop;
}
