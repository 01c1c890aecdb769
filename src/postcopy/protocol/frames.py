"""Frames of the postcopy wire protocol: the header, the frame types and one message
class per type, each with its validating constructor and its canonical encoding.
See :mod:`postcopy.protocol.wire` for the frame table."""
from __future__ import annotations

import enum
import json
import secrets
import struct
from dataclasses import dataclass, field
from typing import ClassVar, Union

from postcopy.protocol.layout import U64_MAX, layout_problem, pairs

MAGIC = 0x5043  # "PC"
HEADER = struct.Struct("!HBBIQ")
PROTOCOL_VERSION = 2

# The largest page run, in bytes: the one limit senders split runs at, receive buffers
# are sized for, and decoders refuse frames beyond (nothing else comes near it).
MAX_RUN_BYTES = 4 << 20
MAX_PAYLOAD = MAX_RUN_BYTES
MAX_JSON = 1 << 20
MAX_REASON = 4096

SESSION_BYTES = 16
NONCE_BYTES = 32
MAC_BYTES = 32

HELLO_UNAUTHENTICATED = 1  # Hello flag: no tags after the handshake (unsafe; bench only)
HELLO = struct.Struct("!HBBB16s32sII")
RANGE = struct.Struct("!QQ")
U64 = struct.Struct("!Q")

ROLES = {"source": 1, "dest": 2, "primary": 3, "standby": 4}
CHANNELS = {"main": 1, "urgent": 2}


def max_run_pages(page_size: int) -> int:
    """The most pages one PageRun may carry."""
    return MAX_RUN_BYTES // page_size


class FrameType(enum.IntEnum):
    """The type byte of a frame header."""

    HELLO = 1
    AUTH_PROOF = 2
    AUTH_OK = 3
    PAGE_RUN = 4
    ZERO_RANGE = 5
    PAGE_REQUEST = 6
    DISCARD = 7
    SWITCHOVER = 8
    PUSH_DONE = 9
    COMPLETE = 10
    ERROR = 11
    PING = 12
    PONG = 13
    READY_CHECK = 14
    READY = 15
    RECOVERY_END = 16
    RECOVERY_ACK = 17
    EPOCH_BEGIN = 18
    EPOCH_COMMIT = 19
    EPOCH_ACK = 20
    CHECKPOINT_END = 21


class Cause(enum.IntEnum):
    """Why a page run was sent (the flags byte of a PageRun); reports count pages by it."""

    PRECOPY = 0
    RESENT = 1
    DEMAND = 2
    PUSHED = 3
    STATE = 4


def _frame(ftype: FrameType, arg: int = 0, payload: bytes = b"", flags: int = 0) -> bytes:
    return HEADER.pack(MAGIC, ftype, flags, len(payload), arg) + payload


def _check_u64(name: str, value: object, minimum: int = 0) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= U64_MAX:
        raise ValueError(f"{name} {value!r} is not an integer in [{minimum}, 2^64)")


def _check_range(first_page: int, npages: int) -> None:
    _check_u64("first_page", first_page)
    _check_u64("npages", npages, 1)


def _as_bytes(name: str, value: object, size: int) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise ValueError(f"{name} must be bytes, got {type(value).__name__}")
    value = bytes(value)
    if len(value) != size:
        raise ValueError(f"{name} must be {size} bytes, got {len(value)}")
    return value


@dataclass(frozen=True)
class Hello:
    """First frame of each side: who it is and the RAM it migrates. ``regions`` are byte
    (offset, length) pairs; a side that does not know the layout yet (an incoming
    destination) sends none and adopts its peer's."""

    TYPE: ClassVar[FrameType] = FrameType.HELLO
    version: int
    role: str
    channel: str
    session: bytes
    nonce: bytes
    page_size: int
    regions: tuple[tuple[int, int], ...] = ()
    unauthenticated: bool = False  # frames without tags: unsafe, for measuring the MAC's cost only

    def __post_init__(self) -> None:
        if type(self.unauthenticated) is not bool:
            raise ValueError(f"unauthenticated {self.unauthenticated!r} is not a bool")
        if type(self.version) is not int or not 0 <= self.version <= 0xFFFF:
            raise ValueError(f"protocol version {self.version!r} is not a 16-bit number")
        if self.role not in ROLES:
            raise ValueError(f"role {self.role!r} is not one of {sorted(ROLES)}")
        if self.channel not in CHANNELS:
            raise ValueError(f"channel {self.channel!r} is not one of {sorted(CHANNELS)}")
        object.__setattr__(self, "session", _as_bytes("session", self.session, SESSION_BYTES))
        object.__setattr__(self, "nonce", _as_bytes("nonce", self.nonce, NONCE_BYTES))
        regions = pairs(self.regions)
        problem = layout_problem(self.page_size, regions)
        if problem:
            raise ValueError(problem)
        object.__setattr__(self, "regions", regions)

    def encode(self) -> bytes:
        payload = HELLO.pack(self.version, ROLES[self.role], CHANNELS[self.channel],
                              HELLO_UNAUTHENTICATED if self.unauthenticated else 0, self.session,
                              self.nonce, self.page_size, len(self.regions))
        payload += b"".join(RANGE.pack(offset, length) for offset, length in self.regions)
        return _frame(FrameType.HELLO, 0, payload)


def make_hello(role: str, channel: str, page_size: int, regions=(), session: bytes | None = None,
               unauthenticated: bool = False) -> Hello:
    """A Hello of this protocol version with a fresh nonce (and a fresh session if none)."""
    return Hello(version=PROTOCOL_VERSION, role=role, channel=channel,
                 session=secrets.token_bytes(SESSION_BYTES) if session is None else session,
                 nonce=secrets.token_bytes(NONCE_BYTES), page_size=page_size, regions=regions,
                 unauthenticated=unauthenticated)


@dataclass(frozen=True)
class AuthProof:
    """HMAC-SHA256 over the handshake transcript (see :class:`Handshake`)."""

    TYPE: ClassVar[FrameType] = FrameType.AUTH_PROOF
    mac: bytes

    def __post_init__(self) -> None:
        object.__setattr__(self, "mac", _as_bytes("mac", self.mac, MAC_BYTES))

    def encode(self) -> bytes:
        return _frame(FrameType.AUTH_PROOF, 0, self.mac)


@dataclass(frozen=True)
class AuthOk:
    """The server accepted the client's proof: the connection is authenticated."""

    TYPE: ClassVar[FrameType] = FrameType.AUTH_OK

    def encode(self) -> bytes:
        return _frame(FrameType.AUTH_OK)


def encode_page_run_header(first_page: int, npages: int, cause: Cause, page_size: int) -> bytes:
    """Header of a PageRun frame, for sending the page data from guest RAM without
    copying it: ``sock.sendmsg([header, memoryview_of_pages])``."""
    _check_range(first_page, npages)
    length = npages * page_size
    if length > MAX_RUN_BYTES:
        raise ValueError(f"page run of {npages} pages of {page_size} bytes exceeds the largest run "
                         f"({MAX_RUN_BYTES} bytes)")
    return HEADER.pack(MAGIC, FrameType.PAGE_RUN, Cause(cause), length, first_page)


@dataclass(frozen=True)
class PageRun:
    """``npages`` pages of data starting at ``first_page``. ``data`` is any buffer of
    npages * page_size bytes; when decoded, the very memoryview of the payload."""

    TYPE: ClassVar[FrameType] = FrameType.PAGE_RUN
    first_page: int
    npages: int
    cause: Cause
    data: object = field(repr=False)

    def __post_init__(self) -> None:
        _check_range(self.first_page, self.npages)
        if type(self.cause) is not Cause:
            object.__setattr__(self, "cause", Cause(self.cause))

    def encode(self) -> bytes:
        """The whole frame, pages copied in. Senders of bulk data use
        :func:`encode_page_run_header` instead."""
        view = memoryview(self.data)  # type: ignore[arg-type]
        if view.nbytes % self.npages:
            raise ValueError(f"page run data of {view.nbytes} bytes is not {self.npages} equal pages")
        page_size = view.nbytes // self.npages
        problem = layout_problem(page_size, ())
        if problem:
            raise ValueError(f"page run data of {view.nbytes} bytes for {self.npages} pages: {problem}")
        return encode_page_run_header(self.first_page, self.npages, self.cause, page_size) + view.tobytes()


@dataclass(frozen=True)
class ZeroRange:
    """Pages that hold only zeros on the source; their data is never sent."""

    TYPE: ClassVar[FrameType] = FrameType.ZERO_RANGE
    first_page: int
    npages: int

    def __post_init__(self) -> None:
        _check_range(self.first_page, self.npages)

    def encode(self) -> bytes:
        return _frame(FrameType.ZERO_RANGE, self.first_page, U64.pack(self.npages))


@dataclass(frozen=True)
class PageRequest:
    """The destination needs these pages now (a guest thread faulted on them)."""

    TYPE: ClassVar[FrameType] = FrameType.PAGE_REQUEST
    first_page: int
    npages: int

    def __post_init__(self) -> None:
        _check_range(self.first_page, self.npages)

    def encode(self) -> bytes:
        return _frame(FrameType.PAGE_REQUEST, self.first_page, U64.pack(self.npages))


@dataclass(frozen=True)
class Discard:
    """(first_page, npages) ranges the destination must drop: stale since last sent."""

    TYPE: ClassVar[FrameType] = FrameType.DISCARD
    ranges: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        ranges = pairs(self.ranges)
        for first_page, npages in ranges:
            _check_range(first_page, npages)
        object.__setattr__(self, "ranges", ranges)

    def encode(self) -> bytes:
        payload = b"".join(RANGE.pack(first, n) for first, n in self.ranges)
        return _frame(FrameType.DISCARD, len(self.ranges), payload)


def canonical_json(info: dict) -> bytes:
    """The one encoding of a JSON frame's payload; the decoder refuses any other spelling."""
    return json.dumps(info, separators=(",", ":"), allow_nan=False).encode()


def _encode_json(ftype: FrameType, info: dict) -> bytes:
    payload = canonical_json(info)
    if len(payload) > MAX_JSON:
        raise ValueError(f"{ftype.name} information of {len(payload)} bytes exceeds {MAX_JSON} bytes")
    return _frame(ftype, 0, payload)


def _check_info(info: object) -> None:
    if not isinstance(info, dict):
        raise ValueError(f"info must be a dict, got {type(info).__name__}")


@dataclass(frozen=True)
class Switchover:
    """The guest is paused on the source; ``info`` has its timing and parameters."""

    TYPE: ClassVar[FrameType] = FrameType.SWITCHOVER
    info: dict

    def __post_init__(self) -> None:
        _check_info(self.info)

    def encode(self) -> bytes:
        return _encode_json(FrameType.SWITCHOVER, self.info)


@dataclass(frozen=True)
class PushDone:
    """The source has sent every non-zero page once; ``pages`` is the count."""

    TYPE: ClassVar[FrameType] = FrameType.PUSH_DONE
    pages: int

    def __post_init__(self) -> None:
        _check_u64("pages", self.pages)

    def encode(self) -> bytes:
        return _frame(FrameType.PUSH_DONE, self.pages)


@dataclass(frozen=True)
class Complete:
    """The destination has every page installed; ``info`` has its figures."""

    TYPE: ClassVar[FrameType] = FrameType.COMPLETE
    info: dict

    def __post_init__(self) -> None:
        _check_info(self.info)

    def encode(self) -> bytes:
        return _encode_json(FrameType.COMPLETE, self.info)


@dataclass(frozen=True)
class Error:
    """The sender gives up; ``reason`` is for humans (cut to MAX_REASON bytes)."""

    TYPE: ClassVar[FrameType] = FrameType.ERROR
    code: int
    reason: str

    def __post_init__(self) -> None:
        _check_u64("code", self.code)
        if not isinstance(self.reason, str):
            raise ValueError(f"reason must be a str, got {type(self.reason).__name__}")
        # Cut to the limit at a character boundary; lone surrogates become "?".
        text = self.reason.encode("utf-8", "replace")[:MAX_REASON].decode("utf-8", "ignore")
        if text != self.reason:
            object.__setattr__(self, "reason", text)

    def encode(self) -> bytes:
        return _frame(FrameType.ERROR, self.code, self.reason.encode())


@dataclass(frozen=True)
class Ping:
    """Liveness probe; answered by a Pong with the same token."""

    TYPE: ClassVar[FrameType] = FrameType.PING
    token: int

    def __post_init__(self) -> None:
        _check_u64("token", self.token)

    def encode(self) -> bytes:
        return _frame(FrameType.PING, self.token)


@dataclass(frozen=True)
class Pong:
    """Answer to a Ping."""

    TYPE: ClassVar[FrameType] = FrameType.PONG
    token: int

    def __post_init__(self) -> None:
        _check_u64("token", self.token)

    def encode(self) -> bytes:
        return _frame(FrameType.PONG, self.token)


def _arg_frame(name: str, ftype: FrameType, field_name: str, doc: str):
    """A frame whose only content is one u64 in the header's arg."""
    def __post_init__(self) -> None:
        _check_u64(field_name, getattr(self, field_name))

    def encode(self) -> bytes:
        return _frame(ftype, getattr(self, field_name))

    cls = type(name, (), {"__doc__": doc, "__annotations__": {field_name: int, "TYPE": ClassVar[FrameType]},
                          "TYPE": ftype, "__post_init__": __post_init__, "encode": encode,
                          "__module__": __name__})
    return dataclass(frozen=True)(cls)


def _empty_frame(name: str, ftype: FrameType, doc: str):
    """A frame with no content but its type."""
    def encode(self) -> bytes:
        return _frame(ftype)

    cls = type(name, (), {"__doc__": doc, "__annotations__": {"TYPE": ClassVar[FrameType]}, "TYPE": ftype,
                          "encode": encode, "__module__": __name__})
    return dataclass(frozen=True)(cls)


def _json_frame(name: str, ftype: FrameType, doc: str):
    """A frame carrying one JSON object."""
    def __post_init__(self) -> None:
        _check_info(self.info)

    def encode(self) -> bytes:
        return _encode_json(ftype, self.info)

    cls = type(name, (), {"__doc__": doc, "__annotations__": {"info": dict, "TYPE": ClassVar[FrameType]},
                          "TYPE": ftype, "__post_init__": __post_init__, "encode": encode,
                          "__module__": __name__})
    return dataclass(frozen=True)(cls)


# Migration control (replacing the Ping tokens of version 1).
ReadyCheck = _empty_frame("ReadyCheck", FrameType.READY_CHECK,
                          "Source: answer Ready once everything sent before this is handled.")
Ready = _empty_frame("Ready", FrameType.READY,
                     "Destination: the incoming guest is up and every earlier frame is handled.")
RecoveryEnd = _empty_frame("RecoveryEnd", FrameType.RECOVERY_END,
                           "Destination, after a reconnect: the PageRequests listing what it lacks are all sent.")
RecoveryAck = _empty_frame("RecoveryAck", FrameType.RECOVERY_ACK,
                           "Source: the outstanding list is taken; postcopy resumes.")
# Continuous checkpointing (primary -> standby, acknowledgements back).
EpochBegin = _arg_frame("EpochBegin", FrameType.EPOCH_BEGIN, "epoch",
                        "Primary: the page runs of this epoch follow (staged, not applied, until its commit).")
EpochCommit = _json_frame("EpochCommit", FrameType.EPOCH_COMMIT,
                          "Primary: the epoch is whole; ``info`` has its number, page count, steps. Epoch 0 "
                          "is the initial sync.")
EpochAck = _json_frame("EpochAck", FrameType.EPOCH_ACK,
                       "Standby: the epoch in ``info`` is applied to the image (its steps too).")
CheckpointEnd = _arg_frame("CheckpointEnd", FrameType.CHECKPOINT_END, "epoch",
                           "Primary: a clean stop after this epoch.")


Message = Union[Hello, AuthProof, AuthOk, PageRun, ZeroRange, PageRequest, Discard, Switchover,
                PushDone, Complete, Error, Ping, Pong, ReadyCheck, Ready, RecoveryEnd, RecoveryAck,
                EpochBegin, EpochCommit, EpochAck, CheckpointEnd]
# Messages that need the RAM layout, refused before the handshake sets it.
PAGE_BEARING = (PageRun, ZeroRange, PageRequest, Discard)
