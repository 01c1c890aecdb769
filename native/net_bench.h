/*
 * net_bench: the C floor of the network data plane, for `postcopy bench`.  One
 * process per host (the testbed's two namespaces), as the agents run:
 *
 *   server: pc_net_listen() then pc_net_serve() answers a fixed number of sessions;
 *   client: pc_net_bulk() sends N bytes in 1 MiB send(2) calls (the server recv(2)s
 *           them into a 1 MiB buffer; pc_net_bulk_into(): into a new guest's RAM,
 *           see ram_floor.h), pc_net_rtt() times N round trips of a 16-byte
 *           request and a 4 KiB reply (a demand fault's shape).
 *
 * Socket options are the agents' (protocol/channel.py `tune`): TCP_NODELAY on both
 * kinds, 8 MiB SO_SNDBUF/SO_RCVBUF on bulk sockets.  Each session places both ends:
 * the client pins its thread to client_cpu and asks the server to pin its thread to
 * server_cpu (-1: leave unpinned); both restore their previous affinity afterwards.
 * With rt_priority > 0 both ends also run SCHED_FIFO at that priority, as the agents'
 * demand and bulk threads do (best effort: without the privilege they run as they
 * are, and report so).  Each side measures its own thread's user and system CPU time
 * (RUSAGE_THREAD) over the data phase; the server sends its figures back, so the
 * client reports both.
 *
 * Functions return 0 (or a descriptor) on success and -errno on failure; -EPROTO
 * when the peer breaks the session protocol.  All block: call them without the GIL
 * (cffi releases it).
 */
#ifndef PC_NET_BENCH_H
#define PC_NET_BENCH_H

#include <stdint.h>

#define PC_NET_BULK_CHUNK (1u << 20)
#define PC_NET_RTT_REQUEST 16u
#define PC_NET_RTT_REPLY 4096u
#define PC_NET_SOCKET_BUFFER (8u << 20)

struct pc_net_result {
	uint64_t count;          /* bulk: bytes moved; rtt: round trips */
	uint64_t elapsed_ns;     /* client wall time of the data phase */
	uint64_t client_user_ns; /* CPU time of each side's thread over the data phase */
	uint64_t client_sys_ns;
	uint64_t server_user_ns;
	uint64_t server_sys_ns;
	int32_t client_cpu;      /* CPU each side ran on at the end (sched_getcpu) */
	int32_t server_cpu;
	int32_t client_fifo;     /* 1 if that side ran SCHED_FIFO */
	int32_t server_fifo;
	uint64_t server_prep_ns; /* bulk into prefaulted RAM: the server populated it in this long, before */
};

/* A listening TCP socket on IPv4 address addr ("0.0.0.0": any), port. */
int pc_net_listen(const char *addr, int port);

/* Serve `sessions` client sessions on listen_fd one after the other, then return 0. */
int pc_net_serve(int listen_fd, int sessions);

/* Send nbytes to the server at host:port; out gets the figures of both sides. */
int pc_net_bulk(const char *host, int port, uint64_t nbytes, int client_cpu, int server_cpu,
		int rt_priority, struct pc_net_result *out);

/* Where the server puts bulk bytes: one reused buffer (the raw link), or a new guest's
 * RAM (see ram_floor.h): each chunk installed with UFFDIO_COPY into fresh pages, or
 * received in place into RAM populated before the data phase (out->server_prep_ns). */
#define PC_NET_INTO_BUFFER 0
#define PC_NET_INTO_RAM_COPY 1
#define PC_NET_INTO_RAM_PREFAULT 2
int pc_net_bulk_into(const char *host, int port, uint64_t nbytes, int into, int client_cpu, int server_cpu,
		     int rt_priority, struct pc_net_result *out);

/* count round trips; lat_ns[i] gets the i-th round trip's nanoseconds. */
int pc_net_rtt(const char *host, int port, uint64_t count, int client_cpu, int server_cpu,
	       int rt_priority, uint64_t *lat_ns, struct pc_net_result *out);

#endif /* PC_NET_BENCH_H */
