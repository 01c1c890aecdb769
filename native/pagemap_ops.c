/* pagemap_ops: see pagemap_ops.h. */
#define _GNU_SOURCE
#include "pagemap_ops.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static uint64_t page_size(void)
{
	static uint64_t ps;
	if (!ps)
		ps = (uint64_t)sysconf(_SC_PAGESIZE);
	return ps;
}

/* pread the entries of npages pages from page number page_no on; short only at EOF. */
static int64_t read_entries(int fd, uint64_t page_no, uint64_t npages, uint64_t *out)
{
	size_t want = npages * sizeof(uint64_t), got = 0;
	while (got < want) {
		ssize_t n = pread(fd, (char *)out + got, want - got,
				  (off_t)(page_no * sizeof(uint64_t) + got));
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (n == 0)
			break; /* past the end of the address space */
		got += (size_t)n;
	}
	return (int64_t)(got / sizeof(uint64_t));
}

int64_t pc_pagemap_read(int fd, uint64_t addr, uint64_t npages, uint64_t *out)
{
	return read_entries(fd, addr / page_size(), npages, out);
}

int64_t pc_pagemap_runs(int fd, uint64_t addr, uint64_t npages, uint64_t mask, int invert,
			uint64_t *runs, uint64_t max_runs, uint64_t *pages_done)
{
	uint64_t *buf = malloc(PC_PAGEMAP_CHUNK * sizeof(uint64_t));
	uint64_t page0 = addr / page_size();
	uint64_t done = 0, nruns = 0, run_start = 0;
	int in_run = 0;
	int64_t ret;

	if (!buf)
		return -ENOMEM;
	while (done < npages) {
		uint64_t want = npages - done;
		if (want > PC_PAGEMAP_CHUNK)
			want = PC_PAGEMAP_CHUNK;
		int64_t n = read_entries(fd, page0 + done, want, buf);
		if (n < 0) {
			ret = n;
			goto out;
		}
		for (int64_t i = 0; i < n; i++) {
			int match = ((buf[i] & mask) != 0) != (invert != 0);
			if (match && !in_run) {
				if (nruns == max_runs) {
					*pages_done = done + (uint64_t)i;
					ret = (int64_t)nruns;
					goto out;
				}
				run_start = done + (uint64_t)i;
				in_run = 1;
			} else if (!match && in_run) {
				runs[2 * nruns] = run_start;
				runs[2 * nruns + 1] = done + (uint64_t)i - run_start;
				nruns++;
				in_run = 0;
			}
		}
		done += (uint64_t)n;
		if ((uint64_t)n < want)
			break; /* EOF: nothing is mapped past here */
	}
	if (in_run) {
		runs[2 * nruns] = run_start;
		runs[2 * nruns + 1] = done - run_start;
		nruns++;
	}
	*pages_done = npages;
	ret = (int64_t)nruns;
out:
	free(buf);
	return ret;
}

int64_t pc_pagemap_scan(int fd, struct pc_pm_scan_arg *arg)
{
	arg->size = sizeof(*arg);
	long n = ioctl(fd, PAGEMAP_SCAN, arg);
	return n < 0 ? -errno : (int64_t)n;
}

int pc_clear_refs(int pid, int value)
{
	char path[64], text[16];
	if (pid > 0)
		snprintf(path, sizeof(path), "/proc/%d/clear_refs", pid);
	else
		snprintf(path, sizeof(path), "/proc/self/clear_refs");
	int fd = open(path, O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	int len = snprintf(text, sizeof(text), "%d\n", value);
	ssize_t n = write(fd, text, (size_t)len);
	int err = n < 0 ? errno : 0;
	close(fd);
	return err ? -err : 0;
}
