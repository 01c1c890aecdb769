"""CPU time of the migration agents during a benchmark migration, read from outside:
a thread samples /proc/PID/stat (utime + stime, the whole process) of this process's
``postcopy source`` and ``postcopy dest`` children every few milliseconds, so the CPU
an agent spent in any time window (the push, say) can be read off afterwards without
the agents reporting anything."""
from __future__ import annotations

import bisect
import os
import threading
import time

ROLES = ("source", "dest")
_TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    return text[text.rindex(")") + 2:].split()  # fields from 3 (state) on


def _agent_role(pid: int, parent: int) -> str | None:
    """"source"/"dest" if pid is a ``python -m postcopy source|dest`` child of parent."""
    try:
        if int(_stat_fields(pid)[1]) != parent:
            return None
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
    except (OSError, ValueError, IndexError):
        return None
    return argv[3] if argv[1:3] == ["-m", "postcopy"] and len(argv) > 3 and argv[3] in ROLES else None


class AgentCpu:
    """Context manager: samples the agents' CPU while the block runs. Samples are
    (monotonic ns, user s, sys s) per role; an agent's CPU seconds only grow."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.samples: dict[str, list[tuple[int, float, float]]] = {role: [] for role in ROLES}
        self._pids: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="agent-cpu", daemon=True)

    def __enter__(self) -> "AgentCpu":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _find(self) -> None:
        me = os.getpid()
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) not in self._pids.values():
                role = _agent_role(int(entry), me)
                if role and role not in self._pids:
                    self._pids[role] = int(entry)

    def _run(self) -> None:
        last_scan = 0.0
        while not self._stop.wait(self.interval):
            if len(self._pids) < len(ROLES) and time.monotonic() - last_scan > 0.05:
                self._find()
                last_scan = time.monotonic()
            for role, pid in self._pids.items():
                try:
                    fields = _stat_fields(pid)
                except OSError:  # exited: its last sample stands
                    continue
                if fields[0] == "Z":
                    continue
                now = time.monotonic_ns()
                self.samples[role].append((now, int(fields[11]) * _TICK_S, int(fields[12]) * _TICK_S))

    def between(self, role: str, start_ns: int, end_ns: int) -> dict | None:
        """User and system CPU seconds the agent spent from start_ns to end_ns (the
        samples at or just before each end), or None without samples around both."""
        samples = self.samples[role]
        times = [t for t, _, _ in samples]
        i, j = bisect.bisect_right(times, start_ns) - 1, bisect.bisect_right(times, end_ns) - 1
        if i < 0 or j <= i:
            return None
        return {"user_s": samples[j][1] - samples[i][1], "sys_s": samples[j][2] - samples[i][2]}

    def total(self, role: str) -> dict | None:
        """The agent's CPU seconds over its whole life (its last sample)."""
        samples = self.samples[role]
        return {"user_s": samples[-1][1], "sys_s": samples[-1][2]} if samples else None


def _push_buckets(result: dict) -> tuple[dict, list[int]]:
    """The report's timeline and the indices of its buckets with pushed pages."""
    timeline = result.get("timeline") or {}
    pushed = (timeline.get("installed") or {}).get("pushed") or []
    return timeline, [i for i, pages in enumerate(pushed) if pages]


def push_window_ns(result: dict) -> tuple[int, int] | None:
    """When the pusher's pages were installed on the destination (monotonic ns, to the
    timeline's bucket), from a migration report; None if nothing was pushed."""
    timeline, buckets = _push_buckets(result)
    if not buckets:
        return None
    bucket_ns = int(timeline["bucket_ms"] * 1e6)
    start = timeline["start_ns"]
    return start + buckets[0] * bucket_ns, start + (buckets[-1] + 1) * bucket_ns


def pages_moved_in_push_window(result: dict) -> int:
    """Pages pushed, plus the demand pages installed within the push window: the agents
    serve both in that window (a guest that faults more while the pusher runs costs the
    source more CPU; counted against pushed bytes alone, that would read as a slower
    pusher)."""
    timeline, buckets = _push_buckets(result)
    pushed = (result.get("pages") or {}).get("pushed", 0)
    if not buckets:
        return pushed
    demand = (timeline.get("installed") or {}).get("demand") or []
    return pushed + sum(demand[buckets[0]:buckets[-1] + 1])


def push_cpu_per_gib(monitor: AgentCpu, result: dict, page_size: int) -> dict:
    """Each agent's user+sys CPU seconds per GiB moved (pushed, and demand pages in the
    same window) over the push window."""
    window = push_window_ns(result)
    pushed = (result.get("pages") or {}).get("pushed", 0) * page_size
    moved = pages_moved_in_push_window(result) * page_size
    out: dict = {"pushed_bytes": pushed, "moved_bytes": moved,
                 "window_s": window and (window[1] - window[0]) / 1e9}
    for role in ROLES:
        cpu = monitor.between(role, *window) if window else None
        if cpu is not None and moved:
            cpu["cpu_s_per_gib"] = (cpu["user_s"] + cpu["sys_s"]) / (moved / (1 << 30))
        out[role] = cpu
        out[f"{role}_total"] = monitor.total(role)
    return out
