/* Whole-buffer send and receive on a blocking socket, retried over EINTR; shared by the
 * helpers that speak on a plain socket (benches, the fault loop's request sender). */
#ifndef PC_FD_IO_H
#define PC_FD_IO_H

#include <errno.h>
#include <stddef.h>
#include <sys/socket.h>
#include <sys/types.h>

/* 0 once all of buf is sent, else -errno (never SIGPIPE). */
static inline int pc_send_full(int fd, const void *buf, size_t len)
{
    const char *p = buf;
    while (len) {
        ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* 0 once len bytes arrived, -ECONNRESET if the peer closed first, else -errno. */
static inline int pc_recv_full(int fd, void *buf, size_t len)
{
    char *p = buf;
    while (len) {
        ssize_t n = recv(fd, p, len, 0);
        if (n == 0)
            return -ECONNRESET;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

#endif /* PC_FD_IO_H */
