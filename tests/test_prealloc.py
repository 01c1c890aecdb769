"""--prealloc's populate (migration/prealloc.py): every page allocated, errors named,
and the GIL left to the agent's other threads while it runs (a 2 GiB guest takes
seconds; the incoming guest's watchdog keeper must go on renewing meanwhile)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from postcopy.migration.prealloc import map_guest_ram, populate
from conftest import require_uffd

PS = os.sysconf("SC_PAGE_SIZE")


def test_populate_allocates_every_page_of_the_memfd():
    size = 256 * PS
    fd = os.memfd_create("pc-prealloc")
    try:
        os.ftruncate(fd, size)
        ram = map_guest_ram(fd, size)
        assert os.fstat(fd).st_blocks == 0
        assert populate(ram) >= 0
        assert os.fstat(fd).st_blocks * 512 == size  # in the page cache, not holes
        ram.close()
    finally:
        os.close(fd)


def test_populate_leaves_the_gil_to_other_threads():
    """populate blocks on a userfaultfd fault that only another Python thread of the same
    process serves: held, the GIL would keep that thread out and populate would never
    return (the child is then killed and this fails)."""
    require_uffd()
    script = textwrap.dedent(f"""
        import os, threading
        from postcopy.kernel.uffd import Mode, Userfaultfd, address_of
        from postcopy.migration.prealloc import map_guest_ram, populate
        size = 16 * {PS}
        fd = os.memfd_create("pc-prealloc-gil")
        os.ftruncate(fd, size)
        ram = map_guest_ram(fd, size)
        with Userfaultfd() as uffd:
            uffd.register(address_of(ram), size, Mode.MISSING)
            worker = threading.Thread(target=populate, args=(ram,))
            worker.start()
            served = 0
            while worker.is_alive():
                for event in uffd.read_events(timeout=0.05):
                    uffd.zeropage(event.address, {PS})
                    served += 1
            worker.join()
        print(served, os.fstat(fd).st_blocks * 512 == size)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    served, populated = done.stdout.split()
    assert int(served) >= 1 and populated == "True"
