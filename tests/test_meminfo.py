"""An agent's peak RSS is its own: VmHWM of its address space, not getrusage's
ru_maxrss, which Linux carries over exec from the address space it replaces (with
vfork, as subprocess starts children, the parent's)."""
from __future__ import annotations

import json
import mmap
import subprocess
import sys

from postcopy.kernel.meminfo import peak_rss_kib

CHILD = ("import json, resource; from postcopy.kernel.meminfo import peak_rss_kib; "
         "print(json.dumps([peak_rss_kib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss]))")


def test_a_child_of_a_large_parent_reports_its_own_peak():
    big = mmap.mmap(-1, 256 << 20)
    for offset in range(0, len(big), mmap.PAGESIZE):  # resident here, in the parent
        big[offset] = 1
    try:
        assert peak_rss_kib() >= 256 << 10
        own, carried = json.loads(subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                                                 check=True).stdout)
    finally:
        big.close()
    assert carried >= 256 << 10  # what ru_maxrss would have said: the parent's
    assert own < 128 << 10  # the child's own interpreter
