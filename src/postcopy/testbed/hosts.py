"""The testbed's two hosts (addresses, interface names) and its error."""
from __future__ import annotations

from dataclasses import dataclass

SOURCE_ADDRESS = "198.18.0.1"
DEST_ADDRESS = "198.18.0.2"
PREFIXLEN = 30
IFNAMSIZ = 16  # including the NUL: names are at most 15 characters


class TestbedError(RuntimeError):
    """The testbed could not be set up, used or torn down."""

    __test__ = False  # not a pytest test class despite the name


@dataclass(frozen=True)
class Host:
    """One end of the testbed: a network namespace with one veth end."""

    name: str  # namespace name (entry in /run/netns)
    address: str  # IPv4 address of the veth end, without prefix length
    ifname: str  # veth interface name inside the namespace
