/*
 * ram_floor: the C floor of putting received bytes into a new guest's RAM, for
 * `postcopy bench`. A destination must fill RAM it never had, and on a virtual machine
 * a page the host has not backed yet (never touched, or freed long enough for the host
 * to take it back: free page reporting) costs a trip to the hypervisor on first touch,
 * several times the copy itself. The TCP bulk floor reuses one warm buffer and pays
 * none of it, so a push is also measured against these floors of the same run:
 *
 *   pc_ram_target_*: a guest RAM stand-in (a memfd mapped shared, page granularity)
 *   filled one of two ways, the destination's two install paths:
 *     PC_RAM_COPY      registered for missing faults, each chunk installed with one
 *                      UFFDIO_COPY (the copy path: every page allocated as it lands);
 *     PC_RAM_PREFAULT  populated up front (MADV_POPULATE_WRITE: allocated, zeroed,
 *                      mapped; timed apart as prep_ns), chunks received in place (the
 *                      continue path with --prealloc: one copy, no allocation).
 *   net_bench's "into RAM" sessions receive through these; pc_ram_floor() times the
 *   steps alone, without a socket.
 *
 * Functions return 0 on success and -errno on failure.
 */
#ifndef PC_RAM_FLOOR_H
#define PC_RAM_FLOOR_H

#include <stddef.h>
#include <stdint.h>

#define PC_RAM_COPY 1
#define PC_RAM_PREFAULT 2

struct pc_ram_target {
	int kind;
	int memfd, uffd;
	uint8_t *ram;
	uint64_t bytes;    /* rounded up to whole pages */
	uint64_t prep_ns;  /* PREFAULT: populating took this long */
};

/* A fresh target of at least `bytes` bytes. */
int pc_ram_target_open(struct pc_ram_target *t, int kind, uint64_t bytes);
void pc_ram_target_close(struct pc_ram_target *t);
/* COPY: installs len bytes of src at offset off (page aligned, len whole pages). */
int pc_ram_target_install(struct pc_ram_target *t, uint64_t off, const void *src, uint64_t len);

/* The steps alone, each on fresh RAM of `bytes` bytes, in 1 MiB chunks from a warm
 * buffer; nanoseconds of the calling thread's CPU (user + system) and of wall time. */
struct pc_ram_floor {
	uint64_t bytes;
	uint64_t copy_cpu_ns, copy_wall_ns;         /* UFFDIO_COPY into fresh pages */
	uint64_t populate_cpu_ns, populate_wall_ns; /* MADV_POPULATE_WRITE of fresh pages */
	uint64_t continue_cpu_ns, continue_wall_ns; /* UFFDIO_CONTINUE of populated pages (a minor-fault map) */
	uint64_t rewrite_cpu_ns, rewrite_wall_ns;   /* memcpy into populated pages (the in-place receive's copy) */
};
int pc_ram_floor(uint64_t bytes, struct pc_ram_floor *out);

#endif /* PC_RAM_FLOOR_H */
