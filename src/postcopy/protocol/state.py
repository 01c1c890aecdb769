"""The protocol as a table (in the manner of h11's ``_state.py``): for each protocol,
phase and role, the frames that role may send. A frame is legal to receive when the
peer may send it in the receiver's phase. One :class:`Session` per migration (or per
checkpoint stream) checks every frame either channel sends or receives against the
table, and moves the phase on the frames that change it; anything else raises a
:class:`StateError` that names the role, the phase and the frame.

A page run's kind includes its cause (``PAGE_RUN/PRECOPY``): a precopy or resent run
is legal only before the switchover, so one arriving later (when the guest runs on
the destination) is refused instead of being written into the running guest.
"""
from __future__ import annotations

import enum
import threading

from postcopy._native import ffi
from postcopy.protocol.errors import StateError
from postcopy.protocol.frames import HEADER, Cause, FrameType, Message


class Phase(str, enum.Enum):
    """Phases of a session. Migration: handshake, precopy, switchover, postcopy,
    recovery, done, error. Checkpointing: handshake, sync (the initial copy), idle
    (between epochs), epoch (an epoch's runs are arriving), done, error."""

    HANDSHAKE = "handshake"
    PRECOPY = "precopy"
    SWITCHOVER = "switchover"
    POSTCOPY = "postcopy"
    RECOVERY = "recovery"
    SYNC = "sync"
    IDLE = "idle"
    EPOCH = "epoch"
    DONE = "done"
    ERROR = "error"


MIGRATION = "migration"
CHECKPOINT = "checkpoint"
# Who is the client of the handshake in each protocol (it connects), who the server.
ROLES = {MIGRATION: ("source", "dest"), CHECKPOINT: ("primary", "standby")}
_FIRST_PHASE = {MIGRATION: Phase.PRECOPY, CHECKPOINT: Phase.SYNC}


def kind_of(ftype: int, flags: int = 0) -> str:
    """The table's name of a frame: its type, and a page run's cause."""
    ftype = FrameType(ftype)
    if ftype is FrameType.PAGE_RUN:
        return f"PAGE_RUN/{Cause(flags).name}"
    return ftype.name


def kind(message: Message) -> str:
    """The table's name of a message."""
    return kind_of(message.TYPE, getattr(message, "cause", 0))


def header_kind(header) -> str:
    """The table's name of an encoded frame, from its header bytes."""
    _, ftype, flags, _, _ = HEADER.unpack_from(header)
    return kind_of(ftype, flags)


def _set(*names: str) -> frozenset[str]:
    return frozenset(names)


_HS_CLIENT = _set("HELLO", "AUTH_PROOF", "ERROR")
_HS_SERVER = _set("HELLO", "AUTH_PROOF", "AUTH_OK", "ERROR")
_NOTHING = frozenset()
_ERROR_ONLY = _set("ERROR")  # after an error, telling the peer why is all that is left

# SENDS[protocol][phase][role]: the frames that role may send in that phase.
SENDS: dict[str, dict[Phase, dict[str, frozenset[str]]]] = {
    MIGRATION: {
        Phase.HANDSHAKE: {"source": _HS_CLIENT, "dest": _HS_SERVER},
        Phase.PRECOPY: {
            "source": _set("PAGE_RUN/PRECOPY", "PAGE_RUN/RESENT", "ZERO_RANGE", "DISCARD", "READY_CHECK",
                           "PAGE_RUN/STATE", "ERROR"),
            "dest": _set("READY", "ERROR")},
        Phase.SWITCHOVER: {"source": _set("SWITCHOVER", "ERROR"), "dest": _ERROR_ONLY},
        Phase.POSTCOPY: {
            "source": _set("PAGE_RUN/DEMAND", "PAGE_RUN/PUSHED", "ZERO_RANGE", "PUSH_DONE", "ERROR"),
            "dest": _set("PAGE_REQUEST", "COMPLETE", "ERROR")},
        Phase.RECOVERY: {"source": _HS_CLIENT | _set("RECOVERY_ACK"),
                         "dest": _HS_SERVER | _set("PAGE_REQUEST", "RECOVERY_END")},
        Phase.DONE: {"source": _NOTHING, "dest": _NOTHING},
        Phase.ERROR: {"source": _ERROR_ONLY, "dest": _ERROR_ONLY},
    },
    CHECKPOINT: {
        Phase.HANDSHAKE: {"primary": _HS_CLIENT, "standby": _HS_SERVER},
        Phase.SYNC: {"primary": _set("PAGE_RUN/PRECOPY", "EPOCH_COMMIT", "PING", "ERROR"),
                     "standby": _set("PONG", "ERROR")},
        Phase.IDLE: {"primary": _set("EPOCH_BEGIN", "CHECKPOINT_END", "PING", "ERROR"),
                     "standby": _set("EPOCH_ACK", "PONG", "ERROR")},
        Phase.EPOCH: {"primary": _set("PAGE_RUN/RESENT", "EPOCH_COMMIT", "PING", "ERROR"),
                      "standby": _set("EPOCH_ACK", "PONG", "ERROR")},
        # The standby's last acknowledgements may cross the primary's CheckpointEnd.
        Phase.DONE: {"primary": _NOTHING, "standby": _set("EPOCH_ACK", "PONG")},
        Phase.ERROR: {"primary": _ERROR_ONLY, "standby": _ERROR_ONLY},
    },
}

# (protocol, phase, frame) -> the phase it leads to (whoever sends it). An Error frame
# leads to Phase.ERROR from anywhere.
TRANSITIONS: dict[tuple[str, Phase, str], Phase] = {
    (MIGRATION, Phase.PRECOPY, "PAGE_RUN/STATE"): Phase.SWITCHOVER,
    (MIGRATION, Phase.SWITCHOVER, "SWITCHOVER"): Phase.POSTCOPY,
    (MIGRATION, Phase.POSTCOPY, "COMPLETE"): Phase.DONE,
    (MIGRATION, Phase.RECOVERY, "RECOVERY_ACK"): Phase.POSTCOPY,
    (CHECKPOINT, Phase.SYNC, "EPOCH_COMMIT"): Phase.IDLE,
    (CHECKPOINT, Phase.IDLE, "EPOCH_BEGIN"): Phase.EPOCH,
    (CHECKPOINT, Phase.EPOCH, "EPOCH_COMMIT"): Phase.IDLE,
    (CHECKPOINT, Phase.IDLE, "CHECKPOINT_END"): Phase.DONE,
}


def peer_of(protocol: str, role: str) -> str:
    client, server = ROLES[protocol]
    return server if role == client else client


def allowed(protocol: str, phase: Phase, role: str, direction: str) -> frozenset[str]:
    """Frames ``role`` may send (direction "send") or receive ("receive") in ``phase``."""
    sender = role if direction == "send" else peer_of(protocol, role)
    return SENDS[protocol][phase][sender]


class Session:
    """The protocol state of one migration (or checkpoint stream) on one side, shared by
    its channels (main, urgent, and those of each reconnect). Thread safe.

    :attr:`phase_word` is a 64-bit cell in C memory that counts the phase changes: a
    native loop that was told which frames are self-loops of the phase (see
    :meth:`loops`) reads it before taking each frame, and hands back to Python once it
    moved (another thread changed the phase: the table decides again)."""

    def __init__(self, protocol: str, role: str):
        if protocol not in ROLES or role not in ROLES[protocol]:
            raise ValueError(f"no role {role!r} in the {protocol!r} protocol")
        self.protocol = protocol
        self.role = role
        self._phase = Phase.HANDSHAKE
        self.phase_word = ffi.new("uint64_t *")  # changed only under _lock
        self._lock = threading.Lock()

    @property
    def phase(self) -> Phase:
        return self._phase

    @phase.setter
    def phase(self, phase: Phase) -> None:
        """Every change of phase counts in :attr:`phase_word` (callers hold the lock)."""
        if phase is not self._phase:
            self._phase = phase
            self.phase_word[0] += 1

    def loops(self, kinds, direction: str = "receive") -> tuple[frozenset[str], int]:
        """Of the frames ``kinds``, those legal in the current phase (in ``direction``)
        that leave the phase as it is, and the :attr:`phase_word` they hold for."""
        with self._lock:
            phase = self._phase
            legal = allowed(self.protocol, phase, self.role, direction)
            loops = frozenset(k for k in kinds if k in legal and k != "ERROR"
                              and TRANSITIONS.get((self.protocol, phase, k), phase) is phase)
            return loops, self.phase_word[0]

    def __repr__(self) -> str:
        return f"Session({self.protocol}, {self.role}, {self.phase.value})"

    def established(self) -> None:
        """The handshake of every channel is done: the protocol proper begins."""
        self._move({Phase.HANDSHAKE}, _FIRST_PHASE[self.protocol], "the handshake completed")

    def link_lost(self) -> None:
        """The link broke after the switchover: reconnect and recover (migration only)."""
        self._move({Phase.POSTCOPY, Phase.RECOVERY}, Phase.RECOVERY, "the link was lost")

    def fail(self) -> None:
        """Something failed on this side: only an Error frame may still be sent."""
        with self._lock:
            self.phase = Phase.ERROR

    def sent(self, frame: str, channel: str = "") -> None:
        """Check a frame about to be sent (its :func:`kind`); apply its transition."""
        self._check(frame, "send", channel)

    def received(self, frame: str, channel: str = "") -> None:
        """Check a frame just received (its :func:`kind`); apply its transition."""
        self._check(frame, "receive", channel)

    def _check(self, frame: str, direction: str, channel: str) -> None:
        with self._lock:
            phase = self.phase
            if frame not in allowed(self.protocol, phase, self.role, direction):
                self.phase = Phase.ERROR
                where = f" on the {channel} channel" if channel else ""
                verb = "sent" if direction == "send" else "received"
                raise StateError(f"protocol error: the {self.role} {verb} a {frame} frame{where} in phase "
                                 f"{phase.value}, where it may {direction} only "
                                 f"{', '.join(sorted(allowed(self.protocol, phase, self.role, direction))) or 'nothing'}")
            if frame == "ERROR":
                self.phase = Phase.ERROR
            else:
                self.phase = TRANSITIONS.get((self.protocol, phase, frame), phase)

    def _move(self, sources: set[Phase], target: Phase, why: str) -> None:
        with self._lock:
            if self.phase not in sources:
                phase = self.phase
                self.phase = Phase.ERROR
                raise StateError(f"protocol error: {why} in phase {phase.value} of the {self.role}")
            self.phase = target
