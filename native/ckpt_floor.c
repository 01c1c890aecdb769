/* ckpt_floor: the C floor of one checkpoint epoch (see ckpt_floor.h). */
#define _GNU_SOURCE
#include "ckpt_floor.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "bench_util.h"
#include "dirtylog_ops.h"
#include "fd_io.h"
#include "uffd_ops.h"

#define VEC_LEN 512

/* An epoch on the wire: this header, nruns (first page, count) pairs, the pages. */
struct floor_head {
    uint64_t epoch, nruns, npages;
};

struct receiver {
    int fd;
    uint8_t *image, *stage;
    uint64_t *runs;
    uint64_t page_size, max_pages, apply_ns;
    int rc;
};

static int write_iov(int fd, struct iovec *iov, int n)
{
    while (n) {
        ssize_t w = writev(fd, iov, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        while (n && (size_t)w >= iov->iov_len) {
            w -= (ssize_t)iov->iov_len;
            iov++;
            n--;
        }
        if (n) {
            iov->iov_base = (uint8_t *)iov->iov_base + w;
            iov->iov_len -= (size_t)w;
        }
    }
    return 0;
}

/* The standby's minimum: stage a whole epoch, apply it, ack its number. */
static void *receive_loop(void *arg)
{
    struct receiver *r = arg;
    for (;;) {
        struct floor_head h;
        int rc = pc_recv_full(r->fd, &h, sizeof(h));
        if (rc == -ECONNRESET)
            break; /* the sender is done */
        if (!rc && (h.nruns > r->max_pages || h.npages > r->max_pages))
            rc = -EPROTO;
        if (!rc)
            rc = pc_recv_full(r->fd, r->runs, h.nruns * 16);
        if (!rc)
            rc = pc_recv_full(r->fd, r->stage, h.npages * r->page_size);
        if (rc) {
            r->rc = rc;
            break;
        }
        const uint64_t t0 = pc_now_ns();
        const uint8_t *at = r->stage;
        for (uint64_t i = 0; i < h.nruns; i++) {
            const uint64_t len = r->runs[2 * i + 1] * r->page_size;
            memcpy(r->image + r->runs[2 * i] * r->page_size, at, len);
            at += len;
        }
        r->apply_ns += pc_now_ns() - t0;
        struct iovec ack = {&h.epoch, sizeof(h.epoch)};
        if ((rc = write_iov(r->fd, &ack, 1))) {
            r->rc = rc;
            break;
        }
    }
    return NULL;
}

/* A connected loopback TCP pair, both ends with TCP_NODELAY. */
static int tcp_pair(int *client, int *server)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t alen = sizeof(a);
    int one = 1, rc = 0;
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    *client = *server = -1;
    if (lfd < 0)
        return -errno;
    if (bind(lfd, (struct sockaddr *)&a, sizeof(a)) || listen(lfd, 1) || getsockname(lfd, (struct sockaddr *)&a, &alen)
        || (*client = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0)) < 0
        || connect(*client, (struct sockaddr *)&a, sizeof(a)) || (*server = accept4(lfd, NULL, NULL, SOCK_CLOEXEC)) < 0)
        rc = -errno;
    close(lfd);
    if (rc)
        return rc;
    setsockopt(*client, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    setsockopt(*server, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    return 0;
}

/* A userfaultfd with async write-protect over [ram, ram + size), all protected. */
static int arm_wp_async(uint8_t *ram, uint64_t size)
{
    const uint64_t need = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
    int fd = pc_uffd_open_registered(0, need, (uint64_t)(uintptr_t)ram, size, UFFDIO_REGISTER_MODE_WP);
    if (fd < 0)
        return fd == -EINVAL ? -EOPNOTSUPP : fd;
    int rc = pc_uffd_writeprotect(fd, (uint64_t)(uintptr_t)ram, size, UFFDIO_WRITEPROTECT_MODE_WP);
    if (rc) {
        close(fd);
        return rc == -EINVAL ? -EOPNOTSUPP : rc;
    }
    return fd;
}

static uint64_t mix(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static uint64_t gcd(uint64_t a, uint64_t b)
{
    while (b) {
        uint64_t t = a % b;
        a = b;
        b = t;
    }
    return a;
}

/* Writes one word of n distinct pages, chosen by a random affine permutation. */
static void write_pages(uint8_t *ram, uint64_t npages, uint64_t page_size, uint64_t n, uint64_t *rng)
{
    uint64_t a = mix(rng) % npages | 1;
    while (gcd(a, npages) != 1)
        a = a + 2 < npages ? a + 2 : 1;
    const uint64_t b = mix(rng) % npages, value = mix(rng);
    for (uint64_t i = 0; i < n; i++) {
        const uint64_t page = (uint64_t)(((unsigned __int128)a * i + b) % npages);
        *(volatile uint64_t *)(ram + page * page_size + (value + i) % (page_size / 8) * 8) = value + i;
    }
}

/* Reads acks until at most `window` epochs are unacknowledged. */
static int take_acks(int fd, uint64_t sent, uint64_t *acked, uint64_t window)
{
    while (sent - *acked > window) {
        uint64_t epoch;
        int rc = pc_recv_full(fd, &epoch, sizeof(epoch));
        if (rc)
            return rc;
        if (epoch != *acked + 1)
            return -EPROTO;
        *acked = epoch;
    }
    return 0;
}

struct sender {
    uint8_t *ram, *buf;
    uint64_t *runs;
    struct pc_page_region *vec;
    uint64_t size, page_size, npages, dirty;
    int pagemap, sock;
};

/* One epoch on the sender's side: write, harvest, copy, send, acks beyond the window. */
static int one_epoch(struct sender *s, uint64_t epoch, uint64_t window, uint64_t *acked, uint64_t *rng,
                     struct pc_ckpt_floor_parts *p)
{
    const uint64_t t0 = pc_now_ns(), base = (uint64_t)(uintptr_t)s->ram;
    write_pages(s->ram, s->npages, s->page_size, s->dirty, rng);
    const uint64_t t1 = pc_now_ns();
    uint64_t next;
    int64_t nruns = pc_wp_harvest(s->pagemap, base, base + s->size, base, s->vec, VEC_LEN, s->runs, s->dirty + 1, &next);
    if (nruns < 0)
        return (int)nruns;
    const uint64_t t2 = pc_now_ns();
    uint64_t npages = 0;
    for (int64_t i = 0; i < nruns; i++)
        npages += s->runs[2 * i + 1];
    p->pages_written += s->dirty;
    p->pages_found += npages;
    p->epochs_short += npages != s->dirty || next < base + s->size;
    if (npages > s->dirty)
        return -EPROTO; /* more than written: the buffer would overflow */
    uint8_t *at = s->buf;
    for (int64_t i = 0; i < nruns; i++) {
        const uint64_t len = s->runs[2 * i + 1] * s->page_size;
        memcpy(at, s->ram + s->runs[2 * i] * s->page_size, len);
        at += len;
    }
    const uint64_t t3 = pc_now_ns();
    struct floor_head h = {epoch, (uint64_t)nruns, npages};
    struct iovec iov[3] = {{&h, sizeof(h)}, {s->runs, (size_t)nruns * 16}, {s->buf, npages * s->page_size}};
    int rc = write_iov(s->sock, iov, 3);
    const uint64_t t4 = pc_now_ns();
    if (!rc)
        rc = take_acks(s->sock, epoch, acked, window);
    const uint64_t t5 = pc_now_ns();
    p->write_ns += t1 - t0;
    p->harvest_ns += t2 - t1;
    p->copy_ns += t3 - t2;
    p->send_ns += t4 - t3;
    p->ack_ns += t5 - t4;
    return rc;
}

int pc_ckpt_floor_run(uint64_t ram_bytes, uint32_t dirty, uint32_t epochs, uint32_t window, uint64_t seed,
                      uint64_t *epoch_ns, struct pc_ckpt_floor_parts *out)
{
    const uint64_t ps = (uint64_t)sysconf(_SC_PAGESIZE);
    memset(out, 0, sizeof(*out));
    if (!ram_bytes || ram_bytes % ps || !dirty || dirty > ram_bytes / ps || !epochs)
        return -EINVAL;
    struct sender s = {.size = ram_bytes, .page_size = ps, .npages = ram_bytes / ps, .dirty = dirty,
                       .pagemap = -1, .sock = -1};
    struct receiver r = {.fd = -1, .page_size = ps, .max_pages = dirty};
    int rc = 0, uffd = -1, mfd = memfd_create("ckpt-floor", MFD_CLOEXEC);
    pthread_t thread;
    int started = 0;
    if (mfd < 0)
        return -errno;
    s.buf = malloc(dirty * ps);
    s.runs = malloc((dirty + 1) * 16);
    s.vec = malloc(VEC_LEN * sizeof(*s.vec));
    r.stage = malloc(dirty * ps);
    r.runs = malloc(dirty * 16);
    r.image = malloc(ram_bytes);
    if (!s.buf || !s.runs || !s.vec || !r.stage || !r.runs || !r.image) {
        rc = -ENOMEM;
        goto out;
    }
    memset(s.buf, 0, dirty * ps); /* faulted in now, not in the first epoch */
    memset(r.stage, 0, dirty * ps);
    if (ftruncate(mfd, (off_t)ram_bytes) < 0) {
        rc = -errno;
        goto out;
    }
    s.ram = mmap(NULL, ram_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
    if (s.ram == MAP_FAILED) {
        s.ram = NULL;
        rc = -errno;
        goto out;
    }
    uint64_t rng = seed;
    for (uint64_t pg = 0; pg < s.npages; pg++) /* populated, as a running guest's RAM is */
        *(uint64_t *)(s.ram + pg * ps) = mix(&rng);
    if ((uffd = arm_wp_async(s.ram, ram_bytes)) < 0) {
        rc = uffd;
        goto out;
    }
    if ((s.pagemap = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC)) < 0) {
        rc = -errno;
        goto out;
    }
    { /* nothing written yet: a harvest that fails here is a kernel without PAGEMAP_SCAN */
        const uint64_t base = (uint64_t)(uintptr_t)s.ram;
        uint64_t next;
        int64_t n = pc_wp_harvest(s.pagemap, base, base + ram_bytes, base, s.vec, VEC_LEN, s.runs, dirty + 1, &next);
        if (n < 0) {
            rc = n == -EINVAL || n == -ENOTTY ? -EOPNOTSUPP : (int)n;
            goto out;
        }
    }
    memcpy(r.image, s.ram, ram_bytes); /* epoch 0: the initial sync */
    if ((rc = tcp_pair(&s.sock, &r.fd)))
        goto out;
    if ((rc = -pthread_create(&thread, NULL, receive_loop, &r)))
        goto out;
    started = 1;
    uint64_t acked = 0;
    const uint64_t t0 = pc_now_ns();
    uint64_t last = t0;
    for (uint64_t e = 1; e <= epochs && !rc; e++) {
        rc = one_epoch(&s, e, e == epochs ? 0 : window, &acked, &rng, out);
        const uint64_t now = pc_now_ns();
        if (epoch_ns)
            epoch_ns[e - 1] = now - last;
        last = now;
        out->epochs = e;
    }
    out->total_ns = pc_now_ns() - t0;
out:
    if (s.sock >= 0)
        shutdown(s.sock, SHUT_WR);
    if (started) {
        pthread_join(thread, NULL);
        if (!rc && r.rc)
            rc = r.rc;
        out->apply_ns = r.apply_ns;
        out->image_matches = !rc && memcmp(r.image, s.ram, ram_bytes) == 0;
    }
    if (s.sock >= 0)
        close(s.sock);
    if (r.fd >= 0)
        close(r.fd);
    if (s.pagemap >= 0)
        close(s.pagemap);
    if (uffd >= 0)
        close(uffd);
    if (s.ram)
        munmap(s.ram, ram_bytes);
    close(mfd);
    free(s.buf);
    free(s.runs);
    free(s.vec);
    free(r.stage);
    free(r.runs);
    free(r.image);
    return rc;
}
