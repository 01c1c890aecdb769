"""The guest: a process whose whole state lives in its guest RAM.

``postcopy guest`` runs one (see :mod:`postcopy.guest.cli`); :mod:`.runtime` is the
machine (RAM, vCPU threads), :mod:`.control` the control socket's server and protocol,
:mod:`.client` its client, :mod:`.launch` the command line that starts a guest. The
client side is re-exported here and does not load the native helper.
"""
from postcopy.guest.client import GuestClient, wait_for_control
from postcopy.guest.controlwire import GuestError
from postcopy.guest.launch import GuestParams, parse_final_hash, reference_hash

__all__ = ["GuestClient", "GuestError", "GuestParams", "parse_final_hash", "reference_hash", "wait_for_control"]
