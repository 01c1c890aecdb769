"""Lease keepers (migration/fence.py) made ahead of the switchover: the connection to
the guest is opened when the keeper is made (outside the downtime), and arming it later
sets the promise for the seconds known only then (the destination learns the source's
recovery timeout from the Switchover)."""
from __future__ import annotations

from postcopy.guest import GuestParams
from postcopy.guest.client import GuestClient
from postcopy.migration.fence import WATCHDOG_SLACK_S, fence_keeper, watchdog_seconds


def test_a_keeper_made_ahead_is_armed_for_the_seconds_known_at_the_switchover(launch):
    _, control = launch(GuestParams(ram=4 << 20, threads=1, workload="idle", seed=0, steps=None))
    with GuestClient(control) as owner:
        token = owner.lease()
        keeper = fence_keeper(control, token, 600.0, in_contact=lambda: True)  # connects now (for 600 s + margin)
        try:
            assert owner.status()["fence_remaining_s"] == 0  # made, not armed: no promise yet
            keeper.arm(seconds=30.0)
            assert 25.0 < owner.status()["fence_remaining_s"] <= 30.0
        finally:
            keeper.close()
    assert watchdog_seconds(3.0) == 3.0 + WATCHDOG_SLACK_S and watchdog_seconds(-1) == WATCHDOG_SLACK_S
