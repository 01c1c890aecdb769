"""A guest runs in exactly one place (DESIGN.md, "Invariants"): a destination agent
stopped after the Switchover reached it, but before it acted on it, must not wake up
after the source's fence ended and run its guest. A scripted source makes the order
exact: the destination is stopped while holding its incoming guest, the Switchover is
queued in its socket, and it is woken only once the fence it would have had to respect
is long over."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

from conftest import pid_gone, require_uffd
from postcopy.guest import GuestClient
from postcopy.migration.fence import WATCHDOG_SLACK_S
from postcopy.protocol import wire
from postcopy.protocol.channel import Channel, handshake

RAM = 4 << 20


def _wait_for(predicate, what: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
    return value


def _open(port: int, key: bytes, session: wire.Session, layout: wire.Layout, name: str, sid: bytes) -> Channel:
    channel = Channel(socket.create_connection(("127.0.0.1", port), timeout=60), name, layout, session)
    handshake(channel, "client", key, wire.make_hello("source", name, layout.page_size, layout.regions, sid))
    return channel


def test_destination_stopped_before_acting_on_the_switchover_never_runs_its_guest(tmp_path):
    require_uffd()
    key = wire.new_key()
    key_file = tmp_path / "key"
    key_file.write_bytes(key)
    os.chmod(key_file, 0o600)
    workdir = tmp_path / "work"
    workdir.mkdir()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dest = subprocess.Popen([sys.executable, "-m", "postcopy", "dest", "--listen", f"127.0.0.1:{port}",
                             "--key-file", str(key_file), "--workdir", str(workdir), "--recovery-timeout", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    channels: list[Channel] = []
    try:
        assert dest.stdout.readline().startswith("listening on")
        page = os.sysconf("SC_PAGE_SIZE")
        layout = wire.Layout(page_size=page, regions=((0, RAM),))
        protocol = wire.Session(wire.MIGRATION, "source")
        sid = os.urandom(wire.SESSION_BYTES)
        main = _open(port, key, protocol, layout, "main", sid)
        channels.append(main)
        channels.append(_open(port, key, protocol, layout, "urgent", sid))
        protocol.established()
        main.send(wire.ReadyCheck())
        assert isinstance(main.recv(), wire.Ready)  # its incoming guest is up, its fault server runs
        guest_pid = int(_wait_for(lambda: re.search(r"incoming guest pid (\d+)", dest.stderr.readline()),
                                  "the destination to name its incoming guest").group(1))
        incoming = str(next(workdir.glob("postcopy-dest-*/incoming.sock")))
        with GuestClient(incoming) as client:
            status = client.status()
        # Armed before any Switchover can have come: the fix under test.
        assert status["state"] == "incoming" and status["watchdog_remaining_s"], status

        os.kill(dest.pid, signal.SIGSTOP)
        try:
            # What the source does at its switchover; the stopped agent's socket keeps it.
            main.send(wire.PageRun(first_page=0, npages=1, cause=wire.Cause.STATE, data=bytes(page)))
            main.send(wire.Switchover(info={"recovery_timeout_s": 1.0, "mode": "postcopy", "paused_ns": 0,
                                            "last_heartbeat_ns": 0, "steps": [0], "guest": {}}))
            # Nobody renews the watchdog: the guest stops itself, never having run here.
            _wait_for(lambda: pid_gone(guest_pid), "the incoming guest to stop itself while its agent is stopped",
                      timeout=60 * WATCHDOG_SLACK_S)
        finally:
            os.kill(dest.pid, signal.SIGCONT)
        out, err = dest.communicate(timeout=120)
        assert dest.returncode == 1, (out, err)
        assert "did not renew the watchdog" in err and "had already exited" in err, err
        assert "Traceback" not in err, err
        assert '"final_hash"' not in out, out
    finally:
        for channel in channels:
            channel.close()
        if dest.poll() is None:
            dest.kill()
            dest.communicate()
