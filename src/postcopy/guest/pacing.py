"""The guest's pacing commands: throttle (QEMU's auto-converge) and a step-rate cap.
Timing only: neither is guest state, hashed or migrated. Mixed into
:class:`~postcopy.guest.runtime.Guest`, which provides ``_cond``, ``_vcpus``,
``_throttle`` and ``_rate_cap``."""
from __future__ import annotations

from postcopy.guest.params import GuestStateError


class PacingCommands:
    """throttle and rate_cap (see :mod:`postcopy.guest.control`)."""

    def set_throttle(self, percent: int) -> dict:
        """Park each vCPU ``percent`` (0..99) of its time from its next step on (QEMU's
        auto-converge throttle); 0 lifts it. Timing only: not guest state, not migrated."""
        if not isinstance(percent, int) or isinstance(percent, bool) or not 0 <= percent <= 99:
            raise GuestStateError("throttle wants an integer 'percent' 0..99 (0 lifts it)")
        return self._set_pacing(percent, self._rate_cap)

    def set_rate_cap(self, steps_per_s: float) -> dict:
        """Cap each vCPU at ``steps_per_s`` steps/s from its next step on (as ``--rate``,
        the slower of the two holds); 0 lifts it. Not one of the guest's parameters."""
        if (not isinstance(steps_per_s, (int, float)) or isinstance(steps_per_s, bool)
                or not 0 <= steps_per_s <= 1e18):
            raise GuestStateError("rate_cap wants a number 'steps_per_s' >= 0 (0 lifts the cap)")
        return self._set_pacing(self._throttle, float(steps_per_s))

    def _set_pacing(self, throttle: int, rate_cap: float) -> dict:
        with self._cond:
            if self._vcpus is not None:
                self._vcpus.set_pacing(throttle=throttle, rate_cap=rate_cap)
            self._throttle, self._rate_cap = throttle, rate_cap
            return {"throttle_pct": throttle, "rate_cap": rate_cap}
