"""The guest: a process whose whole state lives in its guest RAM.

``postcopy guest`` runs one (see :mod:`postcopy.guest.cli`); :mod:`.runtime` is the
machine (RAM, vCPU threads), :mod:`.control` the control socket and its client. The
client side is re-exported here and does not load the native helper.
"""
from postcopy.guest.control import (
    GuestClient,
    GuestError,
    GuestParams,
    parse_final_hash,
    reference_hash,
    wait_for_control,
)

__all__ = ["GuestClient", "GuestError", "GuestParams", "parse_final_hash", "reference_hash", "wait_for_control"]
