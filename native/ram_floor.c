/* ram_floor: see ram_floor.h. */
#define _GNU_SOURCE
#include "ram_floor.h"
#include "bench_util.h"
#include "file_ops.h"
#include "uffd_ops.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define CHUNK (1u << 20)

static uint64_t page_size(void)
{
	return (uint64_t)sysconf(_SC_PAGESIZE);
}

int pc_ram_target_open(struct pc_ram_target *t, int kind, uint64_t bytes)
{
	uint64_t ps = page_size();
	memset(t, 0, sizeof(*t));
	t->kind = kind;
	t->memfd = t->uffd = -1;
	t->bytes = (bytes + ps - 1) / ps * ps;
	if ((kind != PC_RAM_COPY && kind != PC_RAM_PREFAULT) || !t->bytes)
		return -EINVAL;
	int rc;
	if ((t->memfd = memfd_create("pc-ram-floor", MFD_CLOEXEC)) < 0 || ftruncate(t->memfd, (off_t)t->bytes) < 0)
		goto fail_errno;
	t->ram = mmap(NULL, t->bytes, PROT_READ | PROT_WRITE, MAP_SHARED, t->memfd, 0);
	if (t->ram == MAP_FAILED) {
		t->ram = NULL;
		goto fail_errno;
	}
	madvise(t->ram, t->bytes, MADV_NOHUGEPAGE); /* page granularity, as a guest's RAM */
	if (kind == PC_RAM_COPY) {
		if ((rc = pc_uffd_open_registered(0, 0, (uint64_t)(uintptr_t)t->ram, t->bytes, UFFDIO_REGISTER_MODE_MISSING)) < 0)
			goto fail;
		t->uffd = rc;
		return 0;
	}
	uint64_t start = pc_now_ns();
	if ((rc = pc_populate_write(t->ram, t->bytes)) < 0) /* as dest --prealloc does */
		goto fail;
	t->prep_ns = pc_now_ns() - start;
	return 0;
fail_errno:
	rc = -errno;
fail:
	pc_ram_target_close(t);
	return rc;
}

void pc_ram_target_close(struct pc_ram_target *t)
{
	if (t->uffd >= 0)
		close(t->uffd);
	if (t->ram)
		munmap(t->ram, t->bytes);
	if (t->memfd >= 0)
		close(t->memfd);
	t->uffd = t->memfd = -1;
	t->ram = NULL;
}

int pc_ram_target_install(struct pc_ram_target *t, uint64_t off, const void *src, uint64_t len)
{
	if (t->kind != PC_RAM_COPY || off > t->bytes || len > t->bytes - off)
		return -EINVAL;
	while (len) {
		int64_t n = pc_uffd_copy(t->uffd, (uint64_t)(uintptr_t)t->ram + off, (uint64_t)(uintptr_t)src, len,
					 UFFDIO_COPY_MODE_DONTWAKE, NULL);
		if (n == -EAGAIN || n == -EINTR)
			continue;
		if (n <= 0)
			return n < 0 ? (int)n : -EIO;
		off += (uint64_t)n;
		src = (const uint8_t *)src + n;
		len -= (uint64_t)n;
	}
	return 0;
}

/* CPU (user + system) and wall nanoseconds since *cpu0, *wall0. */
static void lap(uint64_t *cpu, uint64_t *wall, uint64_t cpu0, uint64_t wall0)
{
	uint64_t user, sys;
	pc_thread_cpu_ns(&user, &sys);
	*cpu = user + sys - cpu0;
	*wall = pc_now_ns() - wall0;
}

static void start(uint64_t *cpu0, uint64_t *wall0)
{
	uint64_t user, sys;
	pc_thread_cpu_ns(&user, &sys);
	*cpu0 = user + sys;
	*wall0 = pc_now_ns();
}

/* UFFDIO_CONTINUE over a populated memfd, seen through a second mapping registered for
 * minor faults (the guest's view: page cache present, its page tables empty). */
static int time_continue(struct pc_ram_target *t, struct pc_ram_floor *out)
{
	uint8_t *view = mmap(NULL, t->bytes, PROT_READ | PROT_WRITE, MAP_SHARED, t->memfd, 0);
	if (view == MAP_FAILED)
		return -errno;
	madvise(view, t->bytes, MADV_NOHUGEPAGE);
	int rc = pc_uffd_open_registered(0, UFFD_FEATURE_MINOR_SHMEM, (uint64_t)(uintptr_t)view, t->bytes,
					 UFFDIO_REGISTER_MODE_MINOR);
	if (rc >= 0) {
		int uffd = rc;
		uint64_t cpu0, wall0;
		rc = 0;
		start(&cpu0, &wall0);
		for (uint64_t off = 0; off < t->bytes && rc == 0;) {
			uint64_t len = t->bytes - off < CHUNK ? t->bytes - off : CHUNK;
			int64_t n = pc_uffd_continue(uffd, (uint64_t)(uintptr_t)view + off, len, UFFDIO_CONTINUE_MODE_DONTWAKE,
						     NULL);
			if (n > 0)
				off += (uint64_t)n;
			else if (n != -EAGAIN && n != -EINTR)
				rc = n < 0 ? (int)n : -EIO;
		}
		lap(&out->continue_cpu_ns, &out->continue_wall_ns, cpu0, wall0);
		close(uffd);
	}
	munmap(view, t->bytes);
	return rc;
}

int pc_ram_floor(uint64_t bytes, struct pc_ram_floor *out)
{
	struct pc_ram_target t;
	uint64_t cpu0, wall0;
	uint8_t *chunk = malloc(CHUNK);
	if (!chunk)
		return -ENOMEM;
	memset(chunk, 0x5a, CHUNK); /* warm, as a receive buffer */
	memset(out, 0, sizeof(*out));
	int rc = pc_ram_target_open(&t, PC_RAM_COPY, bytes);
	if (rc < 0)
		goto out;
	out->bytes = t.bytes;
	start(&cpu0, &wall0);
	for (uint64_t off = 0; off < t.bytes && rc == 0; off += CHUNK)
		rc = pc_ram_target_install(&t, off, chunk, t.bytes - off < CHUNK ? t.bytes - off : CHUNK);
	lap(&out->copy_cpu_ns, &out->copy_wall_ns, cpu0, wall0);
	pc_ram_target_close(&t);
	if (rc < 0)
		goto out;
	start(&cpu0, &wall0);
	rc = pc_ram_target_open(&t, PC_RAM_PREFAULT, bytes);
	lap(&out->populate_cpu_ns, &out->populate_wall_ns, cpu0, wall0);
	if (rc < 0)
		goto out;
	start(&cpu0, &wall0);
	for (uint64_t off = 0; off < t.bytes; off += CHUNK)
		memcpy(t.ram + off, chunk, t.bytes - off < CHUNK ? t.bytes - off : CHUNK);
	lap(&out->rewrite_cpu_ns, &out->rewrite_wall_ns, cpu0, wall0);
	rc = time_continue(&t, out);
	pc_ram_target_close(&t);
out:
	free(chunk);
	return rc;
}
