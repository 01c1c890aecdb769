/* net_bench: see net_bench.h. */
#define _GNU_SOURCE
#include "net_bench.h"
#include "bench_util.h"
#include "fd_io.h"
#include "ram_floor.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAGIC 0x50434e42u /* "PCNB" */
#define KIND_BULK 'B'
#define KIND_RTT 'R'
#define KIND_INTO_RAM_COPY 'C'     /* bulk, each chunk installed with UFFDIO_COPY into fresh RAM */
#define KIND_INTO_RAM_PREFAULT 'P' /* bulk, received in place into populated RAM */

/* Both ends run the same build on one machine: host byte order. */
struct hello {          /* client -> server, opens a session */
	uint32_t magic;
	uint32_t kind;
	int32_t server_cpu;
	int32_t rt_priority;
	uint64_t count;
};

struct verdict {        /* server -> client: ready (after pinning), then its figures */
	uint32_t magic;
	int32_t status;     /* 0, or the server's -errno */
	int32_t cpu;
	int32_t fifo;
	uint64_t user_ns;
	uint64_t sys_ns;
	uint64_t prep_ns;   /* into RAM, prefaulted: populating it took this long (before the data phase) */
};

/* Where a thread runs for a session, and how to put it back. */
struct placement {
	struct pc_affinity affinity;
	struct pc_sched sched;
	int fifo;
};

static int place(int cpu, int rt_priority, struct placement *p)
{
	p->sched.saved = 0;
	int r = pc_pin_thread(cpu, &p->affinity);
	if (r < 0)
		return r;
	p->fifo = pc_sched_fifo(rt_priority, &p->sched);
	return 0;
}

static void unplace(struct placement *p)
{
	pc_sched_restore(&p->sched);
	pc_unpin_thread(&p->affinity);
}

/* The agents' options (protocol/channel.py tune): no Nagle; big buffers for bulk. */
static int tune(int fd, int bulk)
{
	int one = 1, size = PC_NET_SOCKET_BUFFER;
	if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) < 0)
		return -errno;
	if (bulk) { /* best effort, as in tune(): capped by net.core.[rw]mem_max */
		setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof(size));
		setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof(size));
	}
	return 0;
}

static int ipv4(const char *addr, int port, struct sockaddr_in *sa)
{
	memset(sa, 0, sizeof(*sa));
	sa->sin_family = AF_INET;
	sa->sin_port = htons((uint16_t)port);
	if (port <= 0 || port > 65535 || inet_pton(AF_INET, addr, &sa->sin_addr) != 1)
		return -EINVAL;
	return 0;
}

int pc_net_listen(const char *addr, int port)
{
	struct sockaddr_in sa;
	int one = 1, r = ipv4(addr, port, &sa);
	if (r < 0)
		return r;
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0 ||
	    bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(fd, 4) < 0) {
		r = -errno;
		close(fd);
		return r;
	}
	return fd;
}

static int is_bulk(uint32_t kind)
{
	return kind == KIND_BULK || kind == KIND_INTO_RAM_COPY || kind == KIND_INTO_RAM_PREFAULT;
}

/* Bulk into a new guest's RAM: chunks received whole, then installed (copy), or
 * received straight into their place (prefaulted). */
static int serve_into_ram(int fd, const struct hello *h, char *buf, struct pc_ram_target *ram)
{
	size_t ps = (size_t)sysconf(_SC_PAGESIZE);
	for (uint64_t off = 0; off < h->count;) {
		size_t want = h->count - off < PC_NET_BULK_CHUNK ? (size_t)(h->count - off) : PC_NET_BULK_CHUNK;
		char *into = ram->kind == PC_RAM_PREFAULT ? (char *)ram->ram + off : buf;
		int r = pc_recv_full(fd, into, want);
		if (r == 0 && ram->kind == PC_RAM_COPY) /* a short last chunk: its page's tail is junk, as RAM allows */
			r = pc_ram_target_install(ram, off, buf, (want + ps - 1) / ps * ps);
		if (r < 0)
			return r;
		off += want;
	}
	return 0;
}

/* The data phase of one session on the server's side. */
static int serve_data(int fd, const struct hello *h, char *buf, struct pc_ram_target *ram)
{
	if (ram)
		return serve_into_ram(fd, h, buf, ram);
	if (h->kind == KIND_BULK) {
		for (uint64_t left = h->count; left;) {
			size_t want = left < PC_NET_BULK_CHUNK ? (size_t)left : PC_NET_BULK_CHUNK;
			ssize_t n = recv(fd, buf, want, 0);
			if (n < 0 && errno == EINTR)
				continue;
			if (n <= 0)
				return n < 0 ? -errno : -EPIPE;
			left -= (uint64_t)n;
		}
		return 0;
	}
	for (uint64_t i = 0; i < h->count; i++) {
		int r = pc_recv_full(fd, buf, PC_NET_RTT_REQUEST);
		if (r == 0)
			r = pc_send_full(fd, buf + PC_NET_RTT_REQUEST, PC_NET_RTT_REPLY);
		if (r < 0)
			return r;
	}
	return 0;
}

static int serve_one(int fd, char *buf)
{
	struct hello h;
	struct verdict v = { .magic = MAGIC };
	struct placement saved;
	uint64_t u0, s0, u1, s1;
	int r = pc_recv_full(fd, &h, sizeof(h));
	if (r < 0)
		return r;
	if (h.magic != MAGIC || (!is_bulk(h.kind) && h.kind != KIND_RTT))
		return -EPROTO;
	if ((r = tune(fd, is_bulk(h.kind))) < 0)
		return r;
	/* The guest RAM stand-in is made (and populated) before the data phase. */
	struct pc_ram_target ram, *into = NULL;
	if (h.kind == KIND_INTO_RAM_COPY || h.kind == KIND_INTO_RAM_PREFAULT) {
		v.status = pc_ram_target_open(&ram, h.kind == KIND_INTO_RAM_COPY ? PC_RAM_COPY : PC_RAM_PREFAULT,
					      h.count);
		into = v.status == 0 ? &ram : NULL;
		v.prep_ns = into ? ram.prep_ns : 0;
	}
	if (v.status == 0)
		v.status = place(h.server_cpu, h.rt_priority, &saved);
	if ((r = pc_send_full(fd, &v, sizeof(v))) < 0 || v.status < 0) {
		if (v.status == 0)
			unplace(&saved);
		if (into)
			pc_ram_target_close(into);
		return r < 0 ? r : 0; /* the client reports the failure; go on serving */
	}
	pc_thread_cpu_ns(&u0, &s0);
	r = serve_data(fd, &h, buf, into);
	pc_thread_cpu_ns(&u1, &s1);
	if (into)
		pc_ram_target_close(into);
	v.cpu = sched_getcpu();
	v.fifo = saved.fifo;
	unplace(&saved);
	if (r < 0)
		return r;
	v.user_ns = u1 - u0;
	v.sys_ns = s1 - s0;
	return pc_send_full(fd, &v, sizeof(v));
}

int pc_net_serve(int listen_fd, int sessions)
{
	size_t size = PC_NET_BULK_CHUNK;
	char *buf = malloc(size);
	int r = 0;
	if (!buf)
		return -ENOMEM;
	memset(buf, 0x5a, size); /* real pages, not the shared zero page */
	for (int i = 0; i < sessions && r == 0; i++) {
		int fd = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC);
		if (fd < 0) {
			if (errno == EINTR) {
				i--;
				continue;
			}
			r = -errno;
			break;
		}
		r = serve_one(fd, buf);
		close(fd);
	}
	free(buf);
	return r;
}

/* Connect, pin, open the session and wait until the server is placed. */
static int open_session(const char *host, int port, uint32_t kind, uint64_t count, int client_cpu,
			int server_cpu, int rt_priority, struct placement *saved, uint64_t *prep_ns)
{
	struct sockaddr_in sa;
	struct hello h = { .magic = MAGIC, .kind = kind, .server_cpu = server_cpu, .rt_priority = rt_priority,
			   .count = count };
	struct verdict v;
	int r = ipv4(host, port, &sa);
	if (r < 0)
		return r;
	if ((r = place(client_cpu, rt_priority, saved)) < 0)
		return r;
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		r = -errno;
		goto fail;
	}
	if ((r = tune(fd, is_bulk(kind))) < 0)
		goto fail;
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		r = -errno;
		goto fail;
	}
	if ((r = pc_send_full(fd, &h, sizeof(h))) < 0 || (r = pc_recv_full(fd, &v, sizeof(v))) < 0)
		goto fail;
	r = v.magic != MAGIC ? -EPROTO : v.status;
	if (r < 0)
		goto fail;
	if (prep_ns)
		*prep_ns = v.prep_ns;
	return fd;
fail:
	if (fd >= 0)
		close(fd);
	unplace(saved);
	return r;
}

/* Read the server's figures and fill out; closes fd and restores the affinity. */
static int close_session(int fd, struct placement *saved, uint64_t count, uint64_t t0, uint64_t u0,
			 uint64_t s0, struct pc_net_result *out)
{
	struct verdict v;
	int r = pc_recv_full(fd, &v, sizeof(v));
	uint64_t t1 = pc_now_ns(), u1, s1;
	pc_thread_cpu_ns(&u1, &s1);
	out->client_cpu = sched_getcpu();
	out->client_fifo = saved->fifo;
	unplace(saved);
	close(fd);
	if (r < 0)
		return r;
	if (v.magic != MAGIC)
		return -EPROTO;
	out->count = count;
	out->elapsed_ns = t1 - t0;
	out->client_user_ns = u1 - u0;
	out->client_sys_ns = s1 - s0;
	out->server_user_ns = v.user_ns;
	out->server_sys_ns = v.sys_ns;
	out->server_cpu = v.cpu;
	out->server_fifo = v.fifo;
	return 0;
}

int pc_net_bulk(const char *host, int port, uint64_t nbytes, int client_cpu, int server_cpu,
		int rt_priority, struct pc_net_result *out)
{
	return pc_net_bulk_into(host, port, nbytes, PC_NET_INTO_BUFFER, client_cpu, server_cpu, rt_priority, out);
}

int pc_net_bulk_into(const char *host, int port, uint64_t nbytes, int into, int client_cpu, int server_cpu,
		     int rt_priority, struct pc_net_result *out)
{
	uint32_t kind = into == PC_NET_INTO_RAM_COPY ? KIND_INTO_RAM_COPY
		      : into == PC_NET_INTO_RAM_PREFAULT ? KIND_INTO_RAM_PREFAULT : KIND_BULK;
	uint64_t prep_ns = 0;
	struct placement saved;
	uint64_t u0, s0;
	char *buf = malloc(PC_NET_BULK_CHUNK);
	if (!buf)
		return -ENOMEM;
	memset(buf, 0xa5, PC_NET_BULK_CHUNK);
	int fd = open_session(host, port, kind, nbytes, client_cpu, server_cpu, rt_priority, &saved, &prep_ns);
	if (fd < 0) {
		free(buf);
		return fd;
	}
	out->server_prep_ns = prep_ns;
	uint64_t t0 = pc_now_ns();
	pc_thread_cpu_ns(&u0, &s0);
	int r = 0;
	for (uint64_t left = nbytes; left && r == 0;) {
		size_t n = left < PC_NET_BULK_CHUNK ? (size_t)left : PC_NET_BULK_CHUNK;
		r = pc_send_full(fd, buf, n);
		left -= n;
	}
	free(buf);
	if (r < 0) {
		unplace(&saved);
		close(fd);
		return r;
	}
	return close_session(fd, &saved, nbytes, t0, u0, s0, out);
}

int pc_net_rtt(const char *host, int port, uint64_t count, int client_cpu, int server_cpu,
	       int rt_priority, uint64_t *lat_ns, struct pc_net_result *out)
{
	struct placement saved;
	char request[PC_NET_RTT_REQUEST] = { 0 }, reply[PC_NET_RTT_REPLY];
	uint64_t u0, s0;
	int fd = open_session(host, port, KIND_RTT, count, client_cpu, server_cpu, rt_priority, &saved, NULL);
	if (fd < 0)
		return fd;
	uint64_t t0 = pc_now_ns();
	pc_thread_cpu_ns(&u0, &s0);
	int r = 0;
	for (uint64_t i = 0; i < count && r == 0; i++) {
		uint64_t start = pc_now_ns();
		r = pc_send_full(fd, request, sizeof(request));
		if (r == 0)
			r = pc_recv_full(fd, reply, sizeof(reply));
		lat_ns[i] = pc_now_ns() - start;
	}
	if (r < 0) {
		unplace(&saved);
		close(fd);
		return r;
	}
	return close_session(fd, &saved, count, t0, u0, s0, out);
}
