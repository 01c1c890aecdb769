"""Fault injection for integration tests: take the link down, flap it, kill or stop an
agent, each at a migration phase that is *observed* (guest and agent state), never
guessed from a timer; then judge the outcome against the documented one.

Events (``postcopy demo --inject EVENT``, repeatable, applied in order)::

    link-down=DURATION@PHASE        both veth ends down for DURATION
    flap=DOWN/UP:TOTAL@PHASE        down DOWN, up UP, again, for TOTAL
    kill-source@PHASE               SIGKILL the source agent
    kill-dest@PHASE                 SIGKILL the destination agent
    stop-dest=DURATION@PHASE        SIGSTOP the destination agent, SIGCONT after DURATION

PHASE is ``precopy`` (agents connected, the guest still running on the source: precopy
and hybrid modes), ``switchover`` (the source has paused its guest) or ``postcopy`` (the
incoming guest runs on the destination while pages still arrive). Durations take
``ms`` or ``s`` (default seconds).

The documented outcomes (README, "Failures"): the migration verifies, or it fails
cleanly: both agents say so, the incoming guest does not run on, and the source guest
is intact (running, or paused with all its RAM after the switchover; the judge then
lets it finish where it is and checks its hash against the reference).
"""
from __future__ import annotations

import glob
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field

from postcopy.guest.control import GuestClient, GuestError

PHASES = ("precopy", "switchover", "postcopy")
KINDS = ("link-down", "flap", "kill-source", "kill-dest", "stop-dest")
_EVENT_RE = re.compile(r"^(?P<kind>[a-z-]+)(?:=(?P<arg>[^@]+))?@(?P<phase>[a-z]+)$")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s)?\s*$")
POLL_S = 0.005


class InjectionError(ValueError):
    """An --inject event that cannot be applied (bad syntax, a phase the mode lacks)."""


def parse_duration(text: str) -> float:
    """``500ms``, ``2s``, ``1.5`` → seconds."""
    match = _DURATION_RE.match(text)
    if not match:
        raise InjectionError(f"duration {text!r} is not like 500ms, 2s or 1.5")
    return float(match.group(1)) / (1000 if match.group(2) == "ms" else 1)


@dataclass(frozen=True)
class Injection:
    """One parsed --inject event."""

    text: str
    kind: str
    phase: str
    down: float = 0.0  # link-down, flap, stop-dest: seconds of outage (per flap)
    up: float = 0.0  # flap: seconds up between outages
    total: float = 0.0  # flap: seconds the flapping lasts


def parse_injection(text: str) -> Injection:
    """Parse one event; raises InjectionError with the accepted forms."""
    match = _EVENT_RE.match(text.strip())
    forms = ("link-down=DURATION@PHASE, flap=DOWN/UP:TOTAL@PHASE, kill-source@PHASE, kill-dest@PHASE, "
             "stop-dest=DURATION@PHASE")
    if not match or match.group("kind") not in KINDS:
        raise InjectionError(f"--inject {text!r} is not one of {forms}")
    kind, arg, phase = match.group("kind"), match.group("arg"), match.group("phase")
    if phase not in PHASES:
        raise InjectionError(f"--inject {text!r}: phase {phase!r} is not one of {', '.join(PHASES)}")
    if kind in ("kill-source", "kill-dest"):
        if arg is not None:
            raise InjectionError(f"--inject {text!r}: {kind} takes no value ({kind}@PHASE)")
        return Injection(text, kind, phase)
    if arg is None:
        raise InjectionError(f"--inject {text!r}: {kind} needs a value (see: {forms})")
    if kind == "flap":
        parts = re.match(r"^([^/]+)/([^:]+):(.+)$", arg)
        if not parts:
            raise InjectionError(f"--inject {text!r}: flap wants DOWN/UP:TOTAL, e.g. flap=200ms/300ms:3s@postcopy")
        down, up, total = (parse_duration(p) for p in parts.groups())
        if down <= 0 or up <= 0 or total < down:
            raise InjectionError(f"--inject {text!r}: DOWN and UP must be positive and TOTAL at least DOWN")
        return Injection(text, kind, phase, down=down, up=up, total=total)
    down = parse_duration(arg)
    if down <= 0:
        raise InjectionError(f"--inject {text!r}: the duration must be positive")
    return Injection(text, kind, phase, down=down)


def check_mode(injections: list[Injection], mode: str) -> None:
    """Refuse a phase this migration mode does not have."""
    for inj in injections:
        if inj.phase == "precopy" and mode == "postcopy":
            raise InjectionError(f"--inject {inj.text}: --mode postcopy has no precopy phase "
                                 f"(use --mode precopy or hybrid, or @switchover / @postcopy)")
        if inj.phase == "postcopy" and mode == "precopy":
            raise InjectionError(f"--inject {inj.text}: --mode precopy has no postcopy phase "
                                 f"(use --mode postcopy or hybrid, or @precopy / @switchover)")


# -- observing the phase -------------------------------------------------------------------
def _guest_state(control: str) -> str | None:
    try:
        with GuestClient(control, timeout=5) as client:
            return client.status().get("state")
    except GuestError:
        return None


def _established(pid: int, port: int) -> int:
    """TCP connections established to ``port`` in the network namespace of ``pid``."""
    count = 0
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        count += 1
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            pass
    return count


@dataclass
class PhaseWatch:
    """Tells the migration's phase from what can be seen: the source guest's state,
    the destination's connections, the incoming guest's state. The destination must run
    with ``--workdir dest_workdir`` so its incoming guest's control socket can be found."""

    source_control: str
    dest: subprocess.Popen
    port: int
    dest_workdir: str

    def incoming_control(self) -> str | None:
        found = glob.glob(os.path.join(self.dest_workdir, "*", "incoming.sock"))
        return found[0] if found else None

    def incoming_state(self) -> str | None:
        control = self.incoming_control()
        return _guest_state(control) if control else None

    def current(self) -> str | None:
        """The phase now, or None before the agents are connected (or after the end)."""
        if self.incoming_state() in ("running", "finished"):
            return "postcopy"
        state = _guest_state(self.source_control)
        if state == "paused":
            return "switchover"
        if state == "running" and self.dest.poll() is None and _established(self.dest.pid, self.port) >= 2:
            return "precopy"
        return None

    def wait(self, phase: str, timeout: float, alive: list[subprocess.Popen]) -> str:
        """Block until ``phase`` (or a later one) is seen; returns the phase seen.
        Raises InjectionError if an agent exits or the timeout passes first."""
        deadline = time.monotonic() + timeout
        wanted = PHASES.index(phase)
        while True:
            seen = self.current()
            if seen is not None and PHASES.index(seen) >= wanted:
                return seen
            for proc in alive:
                if proc.poll() is not None:
                    raise InjectionError(f"phase {phase} never came: an agent exited first (exit {proc.returncode})")
            if time.monotonic() > deadline:
                raise InjectionError(f"phase {phase} never came within {timeout:.0f} s")
            time.sleep(POLL_S)


# -- applying events -----------------------------------------------------------------------
@dataclass
class Applied:
    """What was injected, when (ms after the agents started), and in which phase."""

    event: str
    phase_seen: str | None = None
    at_ms: float | None = None
    actions: list[str] = field(default_factory=list)
    error: str | None = None

    def as_dict(self) -> dict:
        return {"event": self.event, "phase_seen": self.phase_seen, "at_ms": self.at_ms,
                "actions": self.actions, "error": self.error}


class Injector:
    """Applies the events in order from a thread, each when its phase is seen."""

    def __init__(self, bed, injections: list[Injection], watch: PhaseWatch, source: subprocess.Popen,
                 dest: subprocess.Popen, timeout: float = 120.0):
        self.bed, self.injections, self.watch = bed, injections, watch
        self.source, self.dest = source, dest
        self.timeout = timeout
        self.applied = [Applied(inj.text) for inj in injections]
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="injector", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self) -> list[dict]:
        self._thread.join()
        return [a.as_dict() for a in self.applied]

    def _ms(self) -> float:
        return round((time.monotonic() - self._started) * 1e3, 1)

    def _run(self) -> None:
        for inj, record in zip(self.injections, self.applied):
            try:
                record.phase_seen = self.watch.wait(inj.phase, self.timeout, [self.source, self.dest])
                record.at_ms = self._ms()
                self._apply(inj, record)
            except InjectionError as exc:
                record.error = str(exc)
                return

    def _apply(self, inj: Injection, record: Applied) -> None:
        note = record.actions.append
        if inj.kind in ("kill-source", "kill-dest"):
            proc = self.source if inj.kind == "kill-source" else self.dest
            os.kill(proc.pid, signal.SIGKILL)
            note(f"{self._ms():.0f} ms: SIGKILL to the {inj.kind[5:]} agent (pid {proc.pid})")
        elif inj.kind == "stop-dest":
            os.kill(self.dest.pid, signal.SIGSTOP)
            note(f"{self._ms():.0f} ms: SIGSTOP to the dest agent (pid {self.dest.pid})")
            time.sleep(inj.down)  # the outage itself is the injected event
            os.kill(self.dest.pid, signal.SIGCONT)
            note(f"{self._ms():.0f} ms: SIGCONT to the dest agent")
        elif inj.kind == "link-down":
            self._outage(inj.down, note)
        else:  # flap
            end = time.monotonic() + inj.total
            while time.monotonic() + inj.down <= end:
                self._outage(inj.down, note)
                time.sleep(min(inj.up, max(0.0, end - time.monotonic())))

    def _outage(self, seconds: float, note) -> None:
        self.bed.link_down()
        note(f"{self._ms():.0f} ms: link down")
        try:
            time.sleep(seconds)
        finally:
            self.bed.link_up()
            note(f"{self._ms():.0f} ms: link up")


class OutputReader:
    """Collects a process's stdout and stderr in threads."""

    def __init__(self, proc: subprocess.Popen):
        self._parts: dict[str, list[str]] = {"out": [], "err": []}
        self._threads = [threading.Thread(target=self._read, args=(stream, self._parts[key]), daemon=True)
                         for key, stream in (("out", proc.stdout), ("err", proc.stderr)) if stream is not None]
        for thread in self._threads:
            thread.start()

    @staticmethod
    def _read(stream, sink: list[str]) -> None:
        for line in stream:
            sink.append(line)

    def text(self, grace: float = 2.0) -> tuple[str, str]:
        """(stdout, stderr) read so far, after waiting up to ``grace`` for the end."""
        for thread in self._threads:
            thread.join(timeout=grace)
        return "".join(self._parts["out"]), "".join(self._parts["err"])


# -- judging the outcome ---------------------------------------------------------------------
_NOTABLE = re.compile(r"link lost|recovered|reconnect|failed|stopped|refused|dropped|migrated|kept paused|goes on")


def agent_said(out: str | None, err: str | None, limit: int = 6) -> list[str]:
    """The lines of an agent's output that tell what it did (its last line always)."""
    lines = [line.strip() for line in (err or "").splitlines() + (out or "").splitlines() if line.strip()]
    notable = [line for line in lines if _NOTABLE.search(line)]
    return (notable or lines[-1:])[-limit:]


def judge(*, source_rc: int, dest_rc: int, verified: bool, source_state: str | None,
          incoming_state: str | None, source_guest_hash_ok: bool | None) -> tuple[str, bool]:
    """(outcome, documented) from what the agents and guests did."""
    if source_rc == 0 and dest_rc == 0:
        return ("verified", True) if verified else ("migrated but the final hash is WRONG", False)
    if incoming_state == "running":
        return "failed, and the incoming guest still runs: the guest may run in two places", False
    if incoming_state is not None:
        return f"failed, and the incoming guest outlived its destination agent (state {incoming_state})", False
    if source_guest_hash_ok is None:
        return f"failed, and the source guest is not intact (state {source_state})", False
    if not source_guest_hash_ok:
        return "failed, and the source guest finished with a WRONG hash", False
    where = "kept paused on the source, then finished there" if source_state == "paused" else \
        "went on running on the source"
    return f"clean failure: the guest {where}, verified", True


def format_injection(section: dict) -> str:
    """Human summary of a report's ``injection`` section."""
    lines = []
    for event in section["events"]:
        seen = f"seen in {event['phase_seen']} at {event['at_ms']:.0f} ms" if event["at_ms"] is not None else "not applied"
        lines.append(f"injected {event['event']}: {seen}" + (f" ({event['error']})" if event["error"] else ""))
        lines += [f"  {action}" for action in event["actions"]]
    for name, agent in section["agents"].items():
        lines.append(f"{name} agent: exit {agent['exit']}")
        lines += [f"  {line}" for line in agent["said"]]
    verdict = "DOCUMENTED" if section["documented"] else "NOT DOCUMENTED"
    lines.append(f"outcome: {section['outcome']} -> {verdict}")
    return "\n".join(lines)
