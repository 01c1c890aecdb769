/* ckpt_link: a lent receive side of a native epoch loop (see ckpt_link.h). */
#define _GNU_SOURCE
#include "ckpt_link.h"

#include <errno.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>

#include "guest_vm.h"

#define WAIT_MS 100 /* the longest single poll */

int pc_ckpt_rx_fill(struct pc_ckpt_rx *rx, size_t need, int64_t deadline_ns)
{
    if (rx->start == rx->end)
        rx->start = rx->end = 0;
    if (rx->start + need > rx->cap) {
        memmove(rx->buf, rx->buf + rx->start, rx->end - rx->start);
        rx->end -= rx->start;
        rx->start = 0;
    }
    for (;;) {
        ssize_t got = recv(rx->fd, rx->buf + rx->end, rx->cap - rx->end, MSG_DONTWAIT);
        if (got > 0) {
            rx->end += (size_t)got;
            rx->bytes_received += (uint64_t)got;
            rx->last_ns = (int64_t)pc_monotonic_ns();
            return 0;
        }
        if (got == 0)
            return PC_CKPT_RX_CLOSED;
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN)
            return -errno;
        if (!deadline_ns)
            return PC_CKPT_RX_AGAIN;
        const int64_t left = deadline_ns - (int64_t)pc_monotonic_ns();
        if (left <= 0)
            return PC_CKPT_RX_TIMEOUT;
        const int ms = left / 1000000 + 1 < WAIT_MS ? (int)(left / 1000000 + 1) : WAIT_MS;
        struct pollfd pf = {.fd = rx->fd, .events = POLLIN};
        if (poll(&pf, 1, ms) < 0 && errno != EINTR)
            return -errno;
    }
}

void pc_ckpt_rx_consume(struct pc_ckpt_rx *rx, size_t bytes)
{
    rx->start += bytes;
    rx->seq++;
}
