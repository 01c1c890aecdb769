/* dp_dest's sizes and failure codes: shared by its public header and its table struct
 * (dp_dest_internal.h), which include this and not each other. */
#ifndef PC_DP_DEST_LIMITS_H
#define PC_DP_DEST_LIMITS_H

#define PC_DP_NSTATES 5
#define PC_DP_MAX_CAUSES 8
#define PC_DP_GATED_PAGES 16   /* pages per install while holding the gate */
#define PC_DP_MAX_RETRIES 5000 /* a changing mapping: retries 200 µs apart */

/* Failure codes besides -errno. */
#define PC_DP_ILLEGAL (-100001) /* an illegal transition: nothing changed */
#define PC_DP_STUCK (-100002)   /* a page stayed unmappable (no event explained it) */
#define PC_DP_LINK_LOST (-100003) /* sending a request failed: the urgent channel is taken back */
#define PC_DP_REQUEST_BYTES 24 /* a PageRequest frame without its tag */

#endif /* PC_DP_DEST_LIMITS_H */
