"""The veth link between the testbed's hosts, over rtnetlink (pyroute2): addresses,
link state and tbf shaping."""
from __future__ import annotations

from postcopy.testbed.hosts import PREFIXLEN, Host, TestbedError

_MTU = 1500
# pyroute2 encodes the tbf rate in the 32-bit tc_ratespec field (no TCA_TBF_RATE64).
MAX_RATE = (2**32 - 1) * 8
# Below this the tbf bucket of a single frame takes minutes to fill.
MIN_RATE = 1000
_TC_H_ROOT = 0xFFFFFFFF


def ipr_client():
    from pyroute2 import IPRoute  # imported lazily: ~0.1 s, not needed by every command

    return IPRoute()


def ifindex(ipr, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise TestbedError(f"interface {ifname} not found")
    return found[0]


def default_burst(rate_bytes: int) -> int:
    # 10 ms worth of tokens, at least a few full frames so a single packet always fits.
    return max(rate_bytes // 100, 4 * (_MTU + 14))


def configure(ipr, host: Host) -> None:
    ipr.link("set", index=ifindex(ipr, "lo"), state="up")
    index = ifindex(ipr, host.ifname)
    ipr.addr("add", index=index, address=host.address, prefixlen=PREFIXLEN)
    ipr.link("set", index=index, state="up")


def root_qdiscs(ipr, index: int) -> list:
    """The root qdisc messages of interface ``index`` (pyroute2 ``tcmsg``)."""
    return [q for q in ipr.get_qdiscs(index=index) if q["parent"] == _TC_H_ROOT]


def shape(ipr, ifname: str, rate: int | None, burst: int, latency_ms: float) -> None:
    index = ifindex(ipr, ifname)
    if rate is None:
        if any(q.get("kind") == "tbf" for q in root_qdiscs(ipr, index)):
            ipr.tc("del", index=index, root=True)
        return
    # pyroute2 takes the rate in bytes/s and the latency in microseconds
    ipr.tc("replace", "tbf", index, "1:", rate=rate // 8, burst=burst, latency=int(latency_ms * 1000))
