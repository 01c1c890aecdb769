"""The namespace testbed: two hosts on a veth pair, shaping, link faults, cleanup."""
from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from postcopy.testbed import namespaces, netns
from postcopy.testbed.netns import Host, Testbed, TestbedError

_REASON = netns.unavailable_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")

# Echo server: listens on HOST:0, prints its port, echoes every connection until EOF.
ECHO_SERVER = r"""
import socket, sys, threading
srv = socket.create_server((sys.argv[1], 0))
print(srv.getsockname()[1], flush=True)
def echo(conn):
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)
while True:
    threading.Thread(target=echo, args=(srv.accept()[0],), daemon=True).start()
"""

ECHO_CLIENT = r"""
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10) as s:
    s.sendall(sys.argv[3].encode())
    s.shutdown(socket.SHUT_WR)
    print(s.makefile().read(), end="")
"""


def start_echo(tb: Testbed, host: Host) -> tuple[subprocess.Popen, int]:
    proc = tb.popen(host, [sys.executable, "-c", ECHO_SERVER, host.address], stdout=subprocess.PIPE, text=True)
    port = int(proc.stdout.readline())
    return proc, port


def netns_names() -> set[str]:
    from pyroute2.netns import listnetns

    names = set(listnetns())
    try:
        names |= set(os.listdir(netns.RUN_DIR))
    except FileNotFoundError:
        pass
    return names


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    """True once ``pid`` is dead (gone, or a zombie nobody reaped yet)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.02)
    return False


def link_state(tb: Testbed, host: Host) -> tuple[dict[str, str], list]:
    """Interface name -> state, and the root qdiscs of the veth end, seen from inside."""
    from pyroute2 import IPRoute

    with tb.in_namespace(host), IPRoute() as ipr:
        links = {link.get("ifname"): link.get("state") for link in ipr.get_links()}
        qdiscs = netns.root_qdiscs(ipr, ipr.link_lookup(ifname=host.ifname)[0])
    return links, qdiscs


def tbf_rate(qdiscs: list) -> int | None:
    for q in qdiscs:
        if q.get("kind") == "tbf":
            return q.get_attr("TCA_OPTIONS").get_attr("TCA_TBF_PARMS")["rate"]
    return None


def test_hosts_namespaces_and_interfaces() -> None:
    with Testbed() as tb:
        assert tb.source.address == "198.18.0.1" and tb.dest.address == "198.18.0.2"
        for host in (tb.source, tb.dest):
            assert host.name.startswith(netns.PREFIX) and str(os.getpid()) in host.name
            assert len(host.ifname) <= 15
            assert host.name in netns_names()
            links, qdiscs = link_state(tb, host)
            # only loopback and our veth end, both up; unshaped
            assert links == {"lo": "up", host.ifname: "up"}
            assert tbf_rate(qdiscs) is None
        # the veth never lives in the caller's namespace
        with open("/proc/net/dev") as f:
            assert tb.source.ifname not in f.read()


def test_in_namespace_moves_only_the_calling_thread() -> None:
    def my_ns() -> int:
        return os.stat("/proc/thread-self/ns/net").st_ino

    before = my_ns()
    with Testbed() as tb:
        target = os.stat(os.path.join(netns.RUN_DIR, tb.dest.name)).st_ino
        seen: dict[str, int] = {}
        go = threading.Event()

        def bystander() -> None:
            go.wait(10)
            seen["bystander"] = my_ns()

        other = threading.Thread(target=bystander)
        other.start()
        with tb.in_namespace(tb.dest):
            assert my_ns() == target
            go.set()
            other.join()
            # a thread started inside the block inherits the namespace (kernel: clone copies it)
            child = threading.Thread(target=lambda: seen.setdefault("child", my_ns()))
            child.start()
            child.join()
            with tb.in_namespace(tb.source):  # nests
                assert my_ns() != target
            assert my_ns() == target
        assert my_ns() == before
        assert seen == {"bystander": before, "child": target}
        with pytest.raises(ZeroDivisionError), tb.in_namespace(tb.source):
            1 / 0
        assert my_ns() == before


def test_tcp_between_hosts_via_popen_run_and_socket() -> None:
    with Testbed() as tb:
        server, port = start_echo(tb, tb.dest)
        result = tb.run(tb.source, [sys.executable, "-c", ECHO_CLIENT, tb.dest.address, str(port), "hello dest"],
                        capture_output=True, text=True, timeout=30, check=True)
        assert result.stdout == "hello dest"
        # socket() made inside the source host reaches dest too ...
        with tb.socket(tb.source) as s:
            s.settimeout(10)
            s.connect((tb.dest.address, port))
            assert s.getsockname()[0] == tb.source.address
            s.sendall(b"via socket()")
            assert s.recv(100) == b"via socket()"
        # ... and a socket made inside dest itself sees its own address locally.
        with tb.socket(tb.dest) as s:
            s.settimeout(10)
            s.connect((tb.dest.address, port))
            assert s.getsockname()[0] == tb.dest.address
        assert server.poll() is None
    assert server.returncode is not None  # killed by close


def test_run_mirrors_subprocess_run() -> None:
    with Testbed() as tb:
        assert tb.run(tb.source, [sys.executable, "-c", "raise SystemExit(3)"]).returncode == 3
        with pytest.raises(subprocess.CalledProcessError):
            tb.run(tb.source, [sys.executable, "-c", "raise SystemExit(3)"], check=True)
        out = tb.run(tb.dest, [sys.executable, "-c", "import sys; print(sys.stdin.read().upper())"],
                     input="abc", capture_output=True, text=True, timeout=30)
        assert out.stdout.strip() == "ABC"
        with pytest.raises(subprocess.TimeoutExpired):
            tb.run(tb.source, [sys.executable, "-c", "import time; time.sleep(60)"], timeout=0.5)


def test_link_down_blocks_and_link_up_restores() -> None:
    with Testbed() as tb:
        _, port = start_echo(tb, tb.dest)
        with tb.socket(tb.source) as s:
            s.settimeout(10)
            s.connect((tb.dest.address, port))
            s.sendall(b"before")
            assert s.recv(100) == b"before"

            tb.link_down()
            assert link_state(tb, tb.source)[0][tb.source.ifname] == "down"
            assert link_state(tb, tb.dest)[0][tb.dest.ifname] == "down"
            s.sendall(b"during")
            s.settimeout(0.5)
            with pytest.raises(socket.timeout):
                s.recv(100)
            # the connected route is gone: a new connection fails at once
            with tb.socket(tb.source) as s2, pytest.raises(OSError) as err:
                s2.settimeout(10)
                s2.connect((tb.dest.address, port))
            assert err.value.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH)

            tb.link_up()
            s.settimeout(30)  # bounded: resumes at the next TCP retransmission
            assert s.recv(100) == b"during"
            s.sendall(b"after")
            assert s.recv(100) == b"after"


def test_set_rate_installs_tbf_both_ways() -> None:
    with Testbed(rate=8_000_000) as tb:
        for host in (tb.source, tb.dest):
            assert tbf_rate(link_state(tb, host)[1]) == 1_000_000  # bytes/s
        tb.set_rate(100_000_000, burst=64 * 1024, latency_ms=20)
        for host in (tb.source, tb.dest):
            assert tbf_rate(link_state(tb, host)[1]) == 12_500_000
        # shaped traffic still flows
        _, port = start_echo(tb, tb.dest)
        with tb.socket(tb.source) as s:
            s.settimeout(30)
            s.connect((tb.dest.address, port))
            s.sendall(b"x" * 100_000)
            got = 0
            while got < 100_000:
                got += len(s.recv(65536))
        tb.set_rate(None)
        for host in (tb.source, tb.dest):
            assert tbf_rate(link_state(tb, host)[1]) is None
        tb.set_rate(None)  # removing twice is fine


@pytest.mark.parametrize("rate", [0, -1, 999, 2**40, 1.5])
def test_set_rate_rejects_bad_rates(rate) -> None:
    with Testbed() as tb:
        with pytest.raises(TestbedError, match="rate"):
            tb.set_rate(rate)
        assert tbf_rate(link_state(tb, tb.source)[1]) is None
    with pytest.raises(TestbedError, match="rate"):
        Testbed(rate=rate)


def test_set_rate_rejects_bad_burst_and_latency() -> None:
    with Testbed() as tb:
        with pytest.raises(TestbedError, match="burst"):
            tb.set_rate(10_000_000, burst=100)  # smaller than a frame
        with pytest.raises(TestbedError, match="burst"):
            tb.set_rate(8000, burst=10**9)  # would take hours to refill
        with pytest.raises(TestbedError, match="latency"):
            tb.set_rate(10_000_000, latency_ms=0)
        tb.set_rate(1000)  # the slowest accepted rate installs
        assert tbf_rate(link_state(tb, tb.dest)[1]) == 125


def test_cleanup_after_exception_kills_processes_and_removes_namespaces() -> None:
    # A child that ignores SIGTERM, and a grandchild in its own session that ignores it too:
    # close() must escalate to SIGKILL and find the grandchild by its namespace.
    stubborn = r"""
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
g = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"],
    start_new_session=True)
print(g.pid, flush=True)
time.sleep(120)
"""
    with pytest.raises(RuntimeError, match="boom"):
        with Testbed() as tb:
            tb.kill_grace = 0.2
            names = {tb.source.name, tb.dest.name}
            proc = tb.popen(tb.dest, [sys.executable, "-c", stubborn], stdout=subprocess.PIPE, text=True)
            grandchild = int(proc.stdout.readline())
            raise RuntimeError("boom")
    assert tb.closed
    assert proc.returncode == -signal.SIGKILL
    proc.stdout.close()
    assert wait_gone(grandchild)
    assert not names & netns_names()
    with pytest.raises(TestbedError, match="closed"):
        tb.popen(tb.source, ["true"])
    tb.close()  # idempotent


def test_cleanup_on_keyboard_interrupt() -> None:
    with pytest.raises(KeyboardInterrupt):
        with Testbed() as tb:
            proc = tb.popen(tb.source, [sys.executable, "-c", "import time; time.sleep(120)"])
            names = {tb.source.name, tb.dest.name}
            raise KeyboardInterrupt
    assert proc.returncode is not None
    assert not names & netns_names()


def test_sigterm_through_cli_handler_cleans_up(tmp_path) -> None:
    # The CLI turns SIGTERM into KeyboardInterrupt; the with block then cleans up.
    script = tmp_path / "holder.py"
    script.write_text(
        "import signal, sys, time\n"
        "from postcopy.cli import _terminate\n"
        "from postcopy.testbed.netns import Testbed\n"
        "signal.signal(signal.SIGTERM, _terminate)\n"
        "try:\n"
        "    with Testbed() as tb:\n"
        "        p = tb.popen(tb.dest, [sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        "        print(tb.source.name, tb.dest.name, p.pid, flush=True)\n"
        "        time.sleep(120)\n"
        "except KeyboardInterrupt:\n"
        "    sys.exit(130)\n")
    holder = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        src, dst, child = holder.stdout.readline().split()
        assert {src, dst} <= netns_names()
        holder.send_signal(signal.SIGTERM)
        assert holder.wait(timeout=30) == 130
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert not {src, dst} & netns_names()
    assert wait_gone(int(child))


def test_two_testbeds_at_once_do_not_collide() -> None:
    beds: list[Testbed] = []
    errors: list[BaseException] = []

    def make() -> None:
        try:
            beds.append(Testbed())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=make) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors
        names = [h.name for tb in beds for h in (tb.source, tb.dest)]
        ifnames = [h.ifname for tb in beds for h in (tb.source, tb.dest)]
        assert len(set(names)) == 6 and len(set(ifnames)) == 6
        # same addresses in every testbed, yet each link is its own
        ports = [start_echo(tb, tb.dest)[1] for tb in beds]
        for i, tb in enumerate(beds):
            msg = f"bed {i}"
            out = tb.run(tb.source, [sys.executable, "-c", ECHO_CLIENT, tb.dest.address, str(ports[i]), msg],
                         capture_output=True, text=True, timeout=30, check=True)
            assert out.stdout == msg
        beds[0].link_down()  # a fault in one testbed leaves the others alone
        out = beds[1].run(beds[1].source, [sys.executable, "-c", ECHO_CLIENT, beds[1].dest.address,
                                           str(ports[1]), "still up"], capture_output=True, text=True,
                          timeout=30, check=True)
        assert out.stdout == "still up"
    finally:
        for tb in beds:
            tb.close()
    assert not set(names) & netns_names()


def test_stale_namespaces_of_dead_processes_are_removed() -> None:
    # A process makes a testbed, starts a child in it, and dies by SIGKILL: no cleanup ran.
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "from postcopy.testbed.netns import Testbed\n"
         "tb = Testbed()\n"
         "p = tb.popen(tb.dest, [sys.executable, '-c', 'import time; time.sleep(120)'])\n"
         "print(tb.source.name, tb.dest.name, p.pid, flush=True)\n"
         "time.sleep(120)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        src, dst, child = holder.stdout.readline().split()
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    # A namespace with our prefix whose creator is alive must survive the sweep ...
    sleeper = subprocess.Popen(["sleep", "120"])
    alive_name = f"{netns.PREFIX}{sleeper.pid}-0-src"
    # ... but one carrying our own pid that this process did not make is from an
    # earlier process that had our pid.
    reused_name = f"{netns.PREFIX}{os.getpid()}-999999-dst"
    try:
        namespaces.create_netns(alive_name)
        namespaces.create_netns(reused_name)
        with Testbed():  # creation sweeps stale namespaces (another worker may have already)
            pass
        assert not {src, dst, reused_name} & netns_names()
        assert wait_gone(int(child))
        assert alive_name in netns_names()
    finally:
        namespaces.remove_netns(alive_name)
        namespaces.remove_netns(reused_name)
        sleeper.kill()
        sleeper.wait()
    assert alive_name not in netns_names()


def test_unknown_host_is_rejected() -> None:
    with Testbed() as tb, Testbed() as other:
        with pytest.raises(TestbedError, match="not a host"):
            tb.run(other.source, ["true"])


def test_ctrl_c_at_any_point_leaves_nothing(tmp_path) -> None:
    # SIGINT lands at a different moment of setup, use or teardown in each round.
    marker = f"postcopy-ctrl-c-{os.getpid()}-{tmp_path.name}"
    script = tmp_path / "interrupt.py"
    script.write_text(
        "import os, signal, sys, threading, time\n"
        "from postcopy.testbed.netns import Testbed, RUN_DIR\n"
        "for i in range(60):\n"
        "    t = threading.Timer(0.0002 + i * 0.0003, os.kill, (os.getpid(), signal.SIGINT))\n"
        "    try:\n"
        "        t.start()\n"
        "        with Testbed(rate=10_000_000) as tb:\n"
        "            tb.popen(tb.dest, [sys.executable, '-c', 'import time; time.sleep(60)', sys.argv[1]])\n"
        "            del tb\n"
        "        t.join()\n"
        "        time.sleep(0.002)\n"
        "    except KeyboardInterrupt:\n"
        "        pass\n"
        "    while True:  # absorb a late signal outside the testbed\n"
        "        try:\n"
        "            t.join()\n"
        "            time.sleep(0.002)\n"
        "            break\n"
        "        except KeyboardInterrupt:\n"
        "            pass\n"
        "    left = [n for n in os.listdir(RUN_DIR) if n.startswith(f'postcopy-{os.getpid()}-')]\n"
        "    if left:\n"
        "        sys.exit(f'round {i}: left {left}')\n"
        "print('clean', flush=True)\n")
    result = subprocess.run([sys.executable, str(script), marker], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "clean\n"
    leftovers = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    leftovers.append(entry)
        except OSError:
            continue
    assert leftovers == [] or all(wait_gone(int(pid)) for pid in leftovers)


def test_forgotten_testbed_is_removed_at_exit_but_not_by_a_forked_child() -> None:
    code = (
        "import os, sys\n"
        "from postcopy.testbed.netns import Testbed, RUN_DIR\n"
        "tb = Testbed()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    sys.exit(0)  # runs atexit handlers in the child\n"
        "os.waitpid(pid, 0)\n"
        "assert {tb.source.name, tb.dest.name} <= set(os.listdir(RUN_DIR)), 'child tore it down'\n"
        "print(tb.source.name, tb.dest.name, flush=True)\n")  # exits without close()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    src, dst = result.stdout.split()
    assert not {src, dst} & netns_names()
