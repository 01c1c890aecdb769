#ifndef PC_FILE_OPS_H
#define PC_FILE_OPS_H
#include <stdint.h>

/* Punch a hole in a file (a guest's memfd): its pages are freed and unmapped from
 * every mapping, so a userfaultfd-registered shmem range faults them in as missing.
 * Returns 0 or -errno. */
int pc_punch_hole(int fd, uint64_t offset, uint64_t length);

#endif
