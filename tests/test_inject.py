"""Fault injection (``postcopy demo --inject``): events parse with clear errors, each is
applied at the phase it names (observed, not timed), and the outcome is the documented
one. The guests park at a known step until migrated, so a busy host changes nothing."""
from __future__ import annotations

import pytest

from conftest import SLOWDOWN, require_netns, require_uffd
from postcopy.guest import GuestParams
from postcopy.testbed import inject
from postcopy.testbed.demo import DemoOptions, run_demo

PARAMS = GuestParams(ram=32 << 20, threads=2, workload="random-write", seed=31, steps=400_000 * SLOWDOWN,
                     rate=200_000)


@pytest.mark.parametrize("text, expected", [
    ("link-down=2s@postcopy", inject.Injection("link-down=2s@postcopy", "link-down", "postcopy", down=2.0)),
    ("flap=200ms/300ms:3s@precopy",
     inject.Injection("flap=200ms/300ms:3s@precopy", "flap", "precopy", down=0.2, up=0.3, total=3.0)),
    ("kill-source@switchover", inject.Injection("kill-source@switchover", "kill-source", "switchover")),
    ("stop-dest=1.5@postcopy", inject.Injection("stop-dest=1.5@postcopy", "stop-dest", "postcopy", down=1.5)),
])
def test_events_parse(text, expected):
    assert inject.parse_injection(text) == expected


@pytest.mark.parametrize("text, words", [
    ("link-down@postcopy", "needs a value"),
    ("kill-dest=1s@postcopy", "takes no value"),
    ("link-down=2s@later", "phase 'later'"),
    ("unplug@postcopy", "is not one of"),
    ("flap=1s@postcopy", "DOWN/UP:TOTAL"),
    ("link-down=soon@postcopy", "duration"),
])
def test_bad_events_are_refused_clearly(text, words):
    with pytest.raises(inject.InjectionError, match=words):
        inject.parse_injection(text)


def test_a_phase_the_mode_lacks_is_refused():
    with pytest.raises(inject.InjectionError, match="no precopy phase"):
        inject.check_mode([inject.parse_injection("kill-dest@precopy")], "postcopy")
    with pytest.raises(inject.InjectionError, match="no postcopy phase"):
        inject.check_mode([inject.parse_injection("kill-dest@postcopy")], "precopy")


def _injected(*events: str, source_options: tuple[str, ...] = ()) -> dict:
    require_netns()
    require_uffd()
    # The guest parks at step 1000 until migrated; the pusher waits 3 s, so postcopy
    # (demand faults only) lasts long enough to be seen and hit.
    options = DemoOptions(params=PARAMS, hold_at=1000, push_delay=3.0 * SLOWDOWN, timeout=240 * SLOWDOWN,
                          inject=[inject.parse_injection(e) for e in events], source_options=source_options)
    section = run_demo(options)["injection"]
    print(inject.format_injection(section))
    return section


@pytest.mark.loaded
def test_link_down_in_postcopy_is_recovered_and_verified():
    section = _injected("link-down=1s@postcopy")
    assert section["events"][0]["phase_seen"] == "postcopy"
    assert [a.split(": ", 1)[1] for a in section["events"][0]["actions"]] == ["link down", "link up"]
    assert section["outcome"] == "verified" and section["documented"], section


def test_flap_in_postcopy_is_recovered_and_verified():
    section = _injected("flap=300ms/300ms:1500ms@postcopy")
    assert sum("link down" in a for a in section["events"][0]["actions"]) >= 2
    assert section["outcome"] == "verified" and section["documented"], section


@pytest.mark.loaded
def test_source_killed_in_postcopy_fails_cleanly_and_the_source_guest_finishes_verified():
    # A short recovery timeout: the source guest is fenced until the destination surely
    # gave up (that timeout plus a margin), and only then may the demo resume it.
    section = _injected("kill-source@postcopy", source_options=("--recovery-timeout", "3"))
    assert section["agents"]["dest"]["exit"] == 1
    assert any("incoming guest was stopped" in line for line in section["agents"]["dest"]["said"]), section
    assert section["source_guest"] == "paused"
    assert section["outcome"].startswith("clean failure") and section["documented"], section


def test_dest_stopped_in_postcopy_resumes_and_verifies():
    section = _injected("stop-dest=1s@postcopy")
    assert "SIGCONT" in section["events"][0]["actions"][-1]
    assert section["outcome"] == "verified" and section["documented"], section


def test_dest_killed_in_postcopy_fails_cleanly():
    section = _injected("kill-dest@postcopy", source_options=("--recovery-timeout", "3"))
    assert section["source_guest"] == "paused"
    assert section["documented"], section


def test_a_hung_agent_is_killed_with_its_stacks(tmp_path):
    """An agent past the demo's deadline is asked for its threads' stacks (SIGUSR1)
    before it is killed, so the report says where it hung."""
    import subprocess
    import sys

    from postcopy.guest.control import wait_for_control
    from postcopy.testbed.demo import _kill_hung

    control = str(tmp_path / "g.sock")
    proc = subprocess.Popen([sys.executable, "-m", "postcopy", "guest", "--ram", "4M", "--rate", "10",
                             "--control", control], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_control(control, timeout=30 * SLOWDOWN, proc=proc)  # up: its signal handlers are set
    finally:
        _kill_hung(proc)
    err = proc.stderr.read()
    assert proc.returncode == -9 and "most recent call first" in err and "wait" in err, err
