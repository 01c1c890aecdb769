#define _GNU_SOURCE
#include "file_ops.h"

#include <errno.h>
#include <fcntl.h>

#ifndef FALLOC_FL_KEEP_SIZE
#define FALLOC_FL_KEEP_SIZE 0x01
#endif
#ifndef FALLOC_FL_PUNCH_HOLE
#define FALLOC_FL_PUNCH_HOLE 0x02
#endif

int pc_punch_hole(int fd, uint64_t offset, uint64_t length)
{
    if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)length))
        return -errno;
    return 0;
}
