/*
 * dp_recv_table: the destination's page table as a dp_recv sink (the copy install path).
 * A page run is installed with pc_dp_install_copy (gated UFFDIO_COPY pieces, pages the
 * guest removed skipped, EEXIST -> wake, or overwrite for precopy resends), counted by
 * the table under the cause Python maps the wire cause to; a zero range is marked ZERO
 * and the threads already waiting on its pages get a UFFDIO_ZEROPAGE (as
 * FaultServer.mark_zero does).
 */
#ifndef PC_DP_RECV_TABLE_H
#define PC_DP_RECV_TABLE_H

#include <stdint.h>

#include "dp_dest.h"
#include "dp_recv.h"

/* Which step failed (for Python's exception). */
#define PC_DP_SINK_INSTALL 1
#define PC_DP_SINK_MARK_ZERO 2
#define PC_DP_SINK_ZERO_FILL 3

struct pc_dp_table_sink {
    struct pc_dp_table *table;
    int8_t cause_index[PC_DP_RECV_CAUSES]; /* the table's cause of each wire cause */
    uint32_t overwrite;                    /* bit c: runs of cause c overwrite installed pages */
    int failed;                            /* out: the step that failed, or 0 */
};

/* sink writes to ctx's table; ctx must outlive it. */
void pc_dp_sink_table(struct pc_dp_sink *sink, struct pc_dp_table_sink *ctx);
/* The table's stop flag, for pc_dp_recv_rules.stop. */
const int *pc_dp_table_stop_flag(struct pc_dp_table *t);

#endif /* PC_DP_RECV_TABLE_H */
